#!/usr/bin/env bash
# One node's launcher of a multi-node run: `accelerate launch` with configs/accelerate/multi_node.yaml, its
# node rank, node count, process count and rendezvous address taken from the environment. Run it once on
# every node with the same arguments (the training flags); configs/slurm/train.sbatch does that with srun.
#
#   NODE_RANK    this node's rank, 0 .. NNODES-1           (default: $SLURM_NODEID)
#   NNODES       how many nodes                            (default: $SLURM_NNODES)
#   MASTER_ADDR  the address of node 0, reachable from all (required)
#   MASTER_PORT  a free TCP port on node 0                 (default: 29500)
#   GPUS_PER_NODE  processes per node, one per GPU         (default: 8)
#
#   NODE_RANK=0 NNODES=2 MASTER_ADDR=10.1.2.3 bash configs/launch_node.sh --depth=26 --device_batch_size=16 --run=d26   # node 0
#   NODE_RANK=1 NNODES=2 MASTER_ADDR=10.1.2.3 bash configs/launch_node.sh --depth=26 --device_batch_size=16 --run=d26   # node 1
#   (16 GPUs x 32 x 2048, the default --device_batch_size, would be 1,048,576 tokens a micro-step, over the
#   default --total_batch_size of 524,288: refused)
set -euo pipefail

die() { echo "launch_node.sh: $*" >&2; exit 2; }
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-}}
NNODES=${NNODES:-${SLURM_NNODES:-}}
MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
[[ -n "$NODE_RANK" ]] || die "no node rank: set NODE_RANK (0 on the node at MASTER_ADDR), or run it under srun"
[[ -n "$NNODES" ]] || die "no node count: set NNODES, or run it under srun"
[[ -n "${MASTER_ADDR:-}" ]] || die "no MASTER_ADDR: set it to node 0's address (under SLURM: the job's first host)"
for name in NODE_RANK NNODES MASTER_PORT GPUS_PER_NODE; do
    [[ "${!name}" =~ ^[0-9]+$ ]] || die "$name=${!name}: must be a whole number"
done
(( NODE_RANK < NNODES )) || die "NODE_RANK=$NODE_RANK: must be below NNODES=$NNODES"

# A stop (SIGTERM: preemption, the job's time limit) finishes the step in flight and saves; torch's launcher
# SIGKILLs the workers 30 s after it forwards the signal unless told otherwise, less than a large model's save
# takes (its files are checksummed and synced before the rename). The price of a longer grace: a dead rank's
# peers, blocked in a collective, are killed this much later.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-180}

exec accelerate launch --config_file "$(dirname "$0")/accelerate/multi_node.yaml" \
    --num_machines "$NNODES" --num_processes $((NNODES * GPUS_PER_NODE)) --machine_rank "$NODE_RANK" \
    --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
    -m nanochat_unsloth.train "$@"
