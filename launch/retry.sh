#!/usr/bin/env bash
# Run a training command again when it fails, up to RETRIES more times: for a multi-node job
# that a lost node (a crash, a network cut) ends before its nodes come back.
#   RETRIES=3 launch/retry.sh deepspeed --hostfile hostfile --module matekd_ds train --config run.yaml --auto-resume
#   RETRIES=3 launch/retry.sh launch/deepspeed.sh train --config run.yaml --auto-resume
# The command must hold --auto-resume: the first attempt starts the run, every later one
# continues it from its newest verified checkpoint (bit-identical to an uninterrupted run).
# Not retried: success, exit 2 (bad input: a retry would fail the same way), exit 130/143
# (stopped on request: Ctrl-C, or a scheduler's SIGTERM, which this script also passes on).
# Environment (all optional):
#   RETRIES        how many times to rerun after a failure (default 3)
#   RETRY_DELAY_S  seconds to wait before each rerun (default 30): time for a node to come back
#   RETRY_HOOK     a shell command run before each rerun (e.g. check or rewrite the hostfile);
#                  if it fails, no rerun
set -euo pipefail
RETRIES=${RETRIES:-3}
RETRY_DELAY_S=${RETRY_DELAY_S:-30}
for name in RETRIES RETRY_DELAY_S; do
  [[ "${!name}" =~ ^[0-9]+$ ]] || { echo "launch/retry.sh: error: $name must be a whole number, got '${!name}'" >&2; exit 2; }
done
(( $# > 0 )) || { echo "launch/retry.sh: error: give the command to run" >&2; exit 2; }
has_auto_resume=0
for arg in "$@"; do [[ "$arg" == "--auto-resume" ]] && has_auto_resume=1; done
(( has_auto_resume )) || {
  echo "launch/retry.sh: error: the command needs --auto-resume, so that a rerun continues the run" >&2; exit 2; }

child=0
stopped=0
stop() {  # pass a stop on to the running attempt, and rerun nothing after it
  stopped=1
  if (( child )); then kill -TERM "$child" 2>/dev/null || true; fi
}
trap stop TERM INT

attempt=0
while true; do
  attempt=$((attempt + 1))
  set +e
  "$@" &
  child=$!
  wait "$child"; code=$?
  while (( code > 128 )) && kill -0 "$child" 2>/dev/null; do wait "$child"; code=$?; done  # a trap ended wait early
  set -e
  child=0
  if (( code == 0 )); then
    (( attempt == 1 )) || echo "launch/retry.sh: attempt $attempt succeeded" >&2
    exit 0
  fi
  if (( stopped || code == 2 || code == 130 || code == 143 || attempt > RETRIES )); then
    echo "launch/retry.sh: attempt $attempt failed with exit code $code; not retrying" >&2
    exit "$code"
  fi
  echo "launch/retry.sh: attempt $attempt failed with exit code $code; retrying in ${RETRY_DELAY_S}s (retry $attempt of $RETRIES)" >&2
  sleep "$RETRY_DELAY_S" & child=$!; wait "$child" || true; child=0
  (( stopped )) && exit 143
  if [[ -n "${RETRY_HOOK:-}" ]]; then
    bash -c "$RETRY_HOOK" || { echo "launch/retry.sh: RETRY_HOOK failed; not retrying" >&2; exit "$code"; }
  fi
done
