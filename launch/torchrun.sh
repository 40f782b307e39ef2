#!/usr/bin/env bash
# Start matekd-ds under torchrun (no ssh, no hostfile: run this script once on every node).
#   launch/torchrun.sh [--dry-run] [matekd args...]        e.g. train --config run.yaml
# Environment (all optional):
#   NPROC_PER_NODE  ranks per node (default: the visible GPUs, or 1 on a CPU machine)
#   NNODES          number of nodes (default 1)
#   NODE_RANK       this node's index, 0..NNODES-1 (default 0)
#   MASTER_ADDR     host of node 0 (default 127.0.0.1)
#   MASTER_PORT     rendezvous port on it (default 29500)
# torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for each rank, which
# is all matekd-ds reads. --dry-run prints the resolved command instead of running it.
set -euo pipefail
dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$(python -c "import torch; print(max(1, torch.cuda.device_count()))" 2>/dev/null || echo 1)
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
for name in NPROC_PER_NODE NNODES; do
  [[ "${!name}" =~ ^[1-9][0-9]*$ ]] || { echo "launch/torchrun.sh: error: $name must be a positive integer, got '${!name}'" >&2; exit 2; }
done
[[ "$NODE_RANK" =~ ^[0-9]+$ ]] && (( NODE_RANK < NNODES )) || {
  echo "launch/torchrun.sh: error: NODE_RANK must be in 0..$((NNODES - 1)), got '$NODE_RANK'" >&2; exit 2; }
cmd=(torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE"
     --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" -m matekd_ds "$@")

if (( dry_run )); then
  printf '%q ' "${cmd[@]}"; echo
else
  exec "${cmd[@]}"
fi
