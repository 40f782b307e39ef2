#!/usr/bin/env bash
# Start matekd-ds under the deepspeed launcher.
#   launch/deepspeed.sh [--dry-run] [matekd args...]       e.g. train --config run.yaml
# Environment:
#   NUM_GPUS   ranks per node (default: all visible GPUs, or 1 on a CPU machine)
#   HOSTFILE   a DeepSpeed hostfile ("host slots=N" lines) for several nodes (default: one node)
#   NUM_NODES  how many hostfile nodes to use (default: all of them)
#   MASTER_PORT  rendezvous port (default 29500)
set -euo pipefail
dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi

if [[ -z "${NUM_GPUS:-}" ]]; then
  NUM_GPUS=$(python -c "import torch; print(max(1, torch.cuda.device_count()))" 2>/dev/null || echo 1)
fi
cmd=(deepspeed --master_port "${MASTER_PORT:-29500}" --num_gpus "$NUM_GPUS")
if [[ -n "${HOSTFILE:-}" ]]; then
  [[ -f "$HOSTFILE" ]] || { echo "launch/deepspeed.sh: error: HOSTFILE $HOSTFILE not found" >&2; exit 2; }
  cmd+=(--hostfile "$HOSTFILE")
  [[ -n "${NUM_NODES:-}" ]] && cmd+=(--num_nodes "$NUM_NODES")
fi
cmd+=(--module matekd_ds "$@")

if (( dry_run )); then
  printf '%q ' "${cmd[@]}"; echo
else
  exec "${cmd[@]}"
fi
