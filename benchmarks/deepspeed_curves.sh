#!/usr/bin/env bash
# What DeepSpeed still has to prove on GPUs (docs/MULTI_GPU.md, "DeepSpeed ZeRO"). Run from the repo root on a
# machine with 2 or more GPUs, with the deepspeed extra installed (pip install -e '.[deepspeed]'):
#
#   bash benchmarks/deepspeed_curves.sh /tmp/ds 2        # base dir, GPU count
#
# 1. Curves: 100-step d12 loss curves of ZeRO-2, ZeRO-3 and ZeRO-3 + CPU offload on N GPUs against the same
#    pair of 1-GPU runs (their gap is the GPU's own run-to-run spread), val bpb every 25 steps. Within that
#    spread at every window = the same step math on GPUs; offload outside it = refuse offload with the figure.
# 2. Speed and memory at d20: DDP against ZeRO-2 (target: >= 0.90x DDP's tok/s with less memory per GPU),
#    and ZeRO-3 / ZeRO-3 + offload for the memory they save.
# Both write JSON next to the logs in the base dir; the figures go to docs/PERF.md.
set -euo pipefail
BASE=${1:-/tmp/ds}
GPUS=${2:-2}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # this workplace's machines

# the real-text corpus, tokenizer and shards of benchmarks/multi_gpu.py --make-data, once
[ -f "$BASE/shards/manifest.json" ] || python -c "import sys; from pathlib import Path; sys.path.insert(0, 'benchmarks')
from multi_gpu import make_data; make_data(Path('$BASE'), 150_000_000, 65536)"

# d12, total batch 65,536 = N GPUs x 8 x 2048 x (4/N) accumulation steps: divisible for N = 1, 2, 4, 8
python benchmarks/curve_check.py --base-dir "$BASE" --gpus "$GPUS" --depth 12 --steps 100 --eval-every 25 \
    --configs configs/accelerate/deepspeed_zero2.yaml,configs/accelerate/deepspeed_zero3.yaml,configs/accelerate/deepspeed_zero3_offload.yaml \
    --out "$BASE/deepspeed_curves_d12_${GPUS}gpu.json"

for config in multi_gpu deepspeed_zero2 deepspeed_zero3 deepspeed_zero3_offload; do
    python benchmarks/multi_gpu.py --base-dir "$BASE" --gpus "$GPUS" --variants torch --depth 20 --steps 12 \
        --config "configs/accelerate/$config.yaml" --out "$BASE/speed_d20_${config}_${GPUS}gpu.json"
done
