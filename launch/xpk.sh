#!/usr/bin/env bash
# Submits hs2p as a GKE workload with xpk (one container per TPU host; jax.distributed finds the
# slice's hosts itself, so no dist.* keys are needed).
#
#   CLUSTER=my-cluster TPU_TYPE=v5p-128 ZONE=us-east5-a PROJECT=my-project \
#     launch/xpk.sh [--dry-run] configs/paper/llama-3.1-70b/regression_helpfulness.yaml \
#     gs://BUCKET/runs/regression-70b [--set train.steps=10 ...]
#
# The container is DOCKER_IMAGE (one with this project installed) or, by default, BASE_IMAGE with
# this checkout copied in by xpk (--script-dir), installed with jax[tpu] before the run.
# OUT must be a directory every host shares (a GCS FUSE or Filestore volume of the cluster).
# Env: CLUSTER, TPU_TYPE (required); NUM_SLICES (default 1); WORKLOAD (default hs2p-MMDD-HHMMSS);
# ZONE; PROJECT; DOCKER_IMAGE or BASE_IMAGE (default python:3.11); PYTHON (default python3);
# HS2P_COMMAND (default train-rm); DRY_RUN=1 (same as --dry-run: print the command, run nothing);
# MAX_RESUMES (default 3): each container reruns hs2p while it exits 75 (preempted, or a process of
# the run was lost), and the JobSet restarts the workload as often when a host goes away;
# COMPILE_CACHE (default OUT/compile_cache).

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
USAGE="CLUSTER=NAME TPU_TYPE=v5p-128 $0 [--dry-run] CONFIG OUT [HS2P ARGS...]"
parse_args "$@"
require CLUSTER TPU_TYPE
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

xpk=(xpk workload create --cluster "$CLUSTER" --workload "${WORKLOAD:-hs2p-$(date +%m%d-%H%M%S)}"
     --tpu-type "$TPU_TYPE" --num-slices "${NUM_SLICES:-1}" --max-restarts "${MAX_RESUMES:-3}")
if [[ -n ${ZONE:-} ]]; then xpk+=(--zone "$ZONE"); fi
if [[ -n ${PROJECT:-} ]]; then xpk+=(--project "$PROJECT"); fi

hs2p_command
command=$(resume_loop "$(quote "${HS2P_CMD[@]}")")
if [[ -n ${DOCKER_IMAGE:-} ]]; then
  xpk+=(--docker-image "$DOCKER_IMAGE")
else
  xpk+=(--base-docker-image "${BASE_IMAGE:-python:3.11}" --script-dir "$repo")
  command="$(quote "${PYTHON:-python3}") -m pip install --quiet -e . \"jax[tpu]\" && $command"
fi
run "${xpk[@]}" --command "$command"
