#!/usr/bin/env bash
# Start matekd-ds under the deepspeed launcher: one node, or several nodes through a hostfile.
#   launch/deepspeed.sh [--dry-run] [matekd args...]       e.g. train --config run.yaml
# Environment (all optional):
#   NUM_GPUS     ranks per node (default: the visible GPUs, or 1 on a CPU machine; on a CPU-only
#                machine each rank is a CPU process using the gloo backend)
#   HOSTFILE     a DeepSpeed hostfile ("host slots=N" lines) for several nodes; the launcher
#                reaches the other nodes with passwordless ssh (pdsh when installed)
#   NUM_NODES    how many hostfile nodes to use (default: all of them)
#   MASTER_ADDR  the rendezvous host (default: the first hostfile host, or 127.0.0.1)
#   MASTER_PORT  the rendezvous port (default 29500)
# --dry-run prints the resolved command instead of running it.
set -euo pipefail
dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi

if [[ -z "${NUM_GPUS:-}" ]]; then
  NUM_GPUS=$(python -c "import torch; print(max(1, torch.cuda.device_count()))" 2>/dev/null || echo 1)
fi
[[ "$NUM_GPUS" =~ ^[1-9][0-9]*$ ]] || { echo "launch/deepspeed.sh: error: NUM_GPUS must be a positive integer, got '$NUM_GPUS'" >&2; exit 2; }
cmd=(deepspeed --master_port "${MASTER_PORT:-29500}" --num_gpus "$NUM_GPUS")
if [[ -n "${HOSTFILE:-}" ]]; then
  [[ -f "$HOSTFILE" ]] || { echo "launch/deepspeed.sh: error: HOSTFILE $HOSTFILE not found" >&2; exit 2; }
  cmd+=(--hostfile "$HOSTFILE")
  if [[ -n "${NUM_NODES:-}" ]]; then cmd+=(--num_nodes "$NUM_NODES"); fi
fi
if [[ -n "${MASTER_ADDR:-}" ]]; then cmd+=(--master_addr "$MASTER_ADDR"); fi
cmd+=(--module matekd_ds "$@")

if (( dry_run )); then
  printf '%q ' "${cmd[@]}"; echo
else
  exec "${cmd[@]}"
fi
