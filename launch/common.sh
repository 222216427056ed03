# Helpers for the launch scripts (sourced, not run): argument parsing, quoting, dry runs.
# shellcheck shell=bash

# Prints a command line the way a shell reads it back: arguments quoted where they need it.
show() {
  local out=() arg
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+=("$arg")
    else
      out+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

# Runs a command, echoing it to stderr first; with DRY_RUN=1 only prints it (stdout).
run() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    show "$@"
  else
    echo "+ $(show "$@")" >&2
    "$@"
  fi
}

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

# Fails naming the first of the given environment variables that is empty.
require() {
  local name
  for name in "$@"; do
    [[ -n ${!name:-} ]] || die "set $name (see the comment at the top of $0)"
  done
}

# [--dry-run] CONFIG OUT [HS2P ARGS...] (CONFIG and OUT may come from the environment instead)
# -> DRY_RUN, CONFIG, OUT, EXTRA (the remaining arguments, passed on to hs2p).
parse_args() {
  while [[ $# -gt 0 ]]; do
    case $1 in
      --dry-run) DRY_RUN=1; shift ;;
      -h | --help) echo "usage: $USAGE"; exit 0 ;;
      *) break ;;
    esac
  done
  if [[ $# -ge 2 ]]; then
    CONFIG=$1
    OUT=$2
    shift 2
  fi
  [[ -n ${CONFIG:-} && -n ${OUT:-} ]] || die "usage: $USAGE"
  EXTRA=("$@")
}

# The hs2p command line every process runs, as an array: HS2P_CMD. Its compiled programs persist in
# COMPILE_CACHE (default OUT/compile_cache, storage every host shares): a relaunch compiles nothing twice.
hs2p_command() {
  # shellcheck disable=SC2034  # for the caller
  HS2P_CMD=("${PYTHON:-python3}" -m hs2p_jax "${HS2P_COMMAND:-train-rm}" --config "$CONFIG" --out "$OUT"
            "${EXTRA[@]}" --set "dist.compile_cache=${COMPILE_CACHE:-$OUT/compile_cache}")
}

# The exit status with which hs2p asks to be run again (preempted, or a process of the run was lost):
# it saved what it had, and the same command resumes from there.
RESUME_STATUS=75

# A bash loop (one string) that runs COMMAND again while it exits with RESUME_STATUS, at most
# MAX_RESUMES (default 3) times more, and ends with its last status.
resume_loop() {
  echo "{ n=0; while true; do $1; rc=\$?; if [ \$rc -ne $RESUME_STATUS ] || [ \$n -ge ${MAX_RESUMES:-3} ]; then \
exit \$rc; fi; n=\$((n + 1)); echo \"hs2p exited $RESUME_STATUS (resume me): relaunch \$n of ${MAX_RESUMES:-3}\" >&2; done; }"
}

# Arguments joined into one string that a remote bash splits back into the same arguments.
quote() {
  local q
  printf -v q '%q ' "$@"
  echo "${q% }"
}
