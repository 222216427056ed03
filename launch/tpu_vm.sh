#!/usr/bin/env bash
# Runs hs2p on every worker of a Cloud TPU VM slice (one process per host; jax.distributed finds
# the slice's hosts itself, so no dist.* keys are needed).
#
#   TPU_NAME=my-v5p ZONE=us-east5-a REPO_URL=https://github.com/ORG/hs2p-jax.git \
#     launch/tpu_vm.sh [--dry-run] configs/paper/llama-3.1-70b/regression_helpfulness.yaml \
#     gs://BUCKET/runs/regression-70b [--set train.steps=10 ...]
#
# Step 1 clones (or fetches) REPO_URL at REPO_REF into ~/REMOTE_DIR on every worker and installs it
# with jax[tpu]; step 2 runs `python3 -m hs2p_jax HS2P_COMMAND --config CONFIG --out OUT` there.
# CONFIG is relative to the repository; OUT must be one directory all workers share (a GCS FUSE
# mount or an NFS/Filestore path).
# Env: TPU_NAME, ZONE (required); PROJECT; REPO_URL (required unless SKIP_INSTALL=1); REPO_REF
# (default main); REMOTE_DIR (default hs2p-jax); PYTHON (default python3); HS2P_COMMAND (default
# train-rm); SKIP_INSTALL=1; DRY_RUN=1 (same as --dry-run: print the commands, run nothing);
# MAX_RESUMES (default 3): each worker reruns hs2p while it exits 75 (preempted, or a process of the
# run was lost: it resumes from its last checkpoint); COMPILE_CACHE (default OUT/compile_cache).

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
USAGE="TPU_NAME=NAME ZONE=ZONE REPO_URL=URL $0 [--dry-run] CONFIG OUT [HS2P ARGS...]"
parse_args "$@"
require TPU_NAME ZONE
dir=${REMOTE_DIR:-hs2p-jax}
python=${PYTHON:-python3}

ssh=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all)
if [[ -n ${PROJECT:-} ]]; then
  ssh+=(--project "$PROJECT")
fi

if [[ ${SKIP_INSTALL:-0} != 1 ]]; then
  require REPO_URL
  d=$(quote "$dir")
  run "${ssh[@]}" --command "set -e; [ -d $d/.git ] || git clone --quiet $(quote "$REPO_URL") $d; \
git -C $d fetch --quiet origin $(quote "${REPO_REF:-main}"); git -C $d checkout --quiet --detach FETCH_HEAD; \
cd $d && $(quote "$python") -m pip install --quiet -e . \"jax[tpu]\""
fi

hs2p_command
run "${ssh[@]}" --command "cd $(quote "$dir") && $(resume_loop "$(quote "${HS2P_CMD[@]}")")"
