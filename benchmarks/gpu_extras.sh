#!/usr/bin/env bash
# Builds .gpu/extras.tar.xz: DeepSpeed (the version the `deepspeed` extra of pyproject.toml pins) and the runtime
# dependencies of it that the GPU machine's image lacks, for CPython 3.12 on x86_64 Linux. That machine has no
# internet; its image already has torch (CUDA), accelerate, transformers, numpy, psutil, py-cpuinfo, ninja,
# nvidia-ml-py, msgpack, einops, tqdm, packaging, pyyaml and nvcc, and pydantic comes with .gpu/site.tar.xz
# (../shared/gpu/make_site.sh), so what is left is deepspeed itself and hjson.
# DeepSpeed is an sdist: its wheel is built here with DS_BUILD_OPS=0 (no compiled op inside: a py3-none-any
# wheel). Our configs build no op at run time either: the client optimizer is DeepSpeed's MuonWithAuxAdam over
# torch's AdamW (zero_force_ds_cpu_optimizer false, so no cpu_adam), pinned memory is torch's, and no NVMe/aio,
# ZeRO++ quantizer or shared-memory all-reduce is configured; ninja and nvcc are there should one be JIT-built.
# The archive unpacks into a directory to put on PYTHONPATH (the .dist-info directories are kept: Accelerate
# finds DeepSpeed by its metadata).
#
# Usage, here (PyPI reachable), from the project root:   bash benchmarks/gpu_extras.sh
# Then in every device call: carry [".gpu"] and begin the command with
#   mkdir -p /tmp/site /tmp/extras && tar xJf .gpu/site.tar.xz -C /tmp/site && tar xJf .gpu/extras.tar.xz -C /tmp/extras &&
#   export PYTHONPATH=/tmp/site:/tmp/extras:$PWD/src:$PWD/benchmarks:$PYTHONPATH &&
# (a few seconds; check with `python -c "import deepspeed, accelerate; print(deepspeed.__version__)"`).
#
# The DeepSpeed proofs on a 1-GPU machine, one device call each (at most 600 s), with the prefix above; the
# seconds are estimates for an H100 (80 GB) with a 128 GiB host, machine start and unpacking not counted.
# /tmp survives between calls only while the machine stays warm: the data call first, the rest without a pause.
# All together ~1,300-1,700 s: with a 30-minute device budget, the curves (4) before the capacity probes (2, 3).
#  1. corpus, tokenizer and shards (~60-120 s: 150M characters of the image's own source text and headers, a
#     65,536-token BPE trained on them, prep; a 719M-character build took 59 s on the 4-GPU machine):
#       python benchmarks/runs.py quality --base-dir /tmp/ds --make-data --max-chars 150000000 \
#         --tokenizer-chars 150000000 --data-only
#  2. capacity, our lean memory mode (~150-250 s in all): d48 trains (docs/PERF.md: 69.8 GiB at B=2, ~0.4 s a
#     step of 4,096 tokens; ~100-150 s with start, initialisation and compilation), d52 runs out of GPU memory
#     (weights, gradients and Muon momentum at ~12 bytes a parameter), which ends the launch:
#       python benchmarks/runs.py capacity --base-dir /tmp/ds --depths 48,52,56,64 --launches lean \
#         --timeout 270 --out /tmp/ds/capacity_lean.json
#  3. capacity, ZeRO-3 + CPU offload (~200-270 s a depth; give it its own call): the fp32 weights (twice: the
#     offloaded parameters and the master copy), gradients and Muon momentum live in pinned host memory, ~16
#     bytes a parameter: d48 (5.8B) ~95 GB fits the 128 GiB host, d52 (7.4B) ~120 GB likely does not (out of
#     host memory: the run is killed, or pinning fails). Muon runs on the GPU, AdamW and the updates on the CPU,
#     each step moving the weights over PCIe several times (~15-25 s a step at d48):
#       python benchmarks/runs.py capacity --base-dir /tmp/ds --depths 48,52,56,64 --launches zero3_offload \
#         --steps 3 --warmup 1 --timeout 270 --out /tmp/ds/capacity_zero3_offload.json
#  4. d12 curves, 100 steps of 65,536 tokens (8 x 2048 x 4 accumulation), val bpb every 25 steps, each run
#     against the 1-GPU pair a, b (DDP's path on one process, one after the other). Per run ~90-130 s (start,
#     ~60 s compile, 6.6M tokens); ZeRO-3 runs uncompiled (~100-150 s); offload ~150-250 s. Three calls:
#       python benchmarks/runs.py deepspeed --base-dir /tmp/ds --gpus 1 --part curves --runs a,b
#       python benchmarks/runs.py deepspeed --base-dir /tmp/ds --gpus 1 --part curves --runs deepspeed_zero2,deepspeed_zero3
#       python benchmarks/runs.py deepspeed --base-dir /tmp/ds --gpus 1 --part curves --runs deepspeed_zero3_offload
#     A finished run (same settings) is not run again; once all five have finished, the invocation prints the
#     comparison and writes /tmp/ds/deepspeed_curves_d12_1gpu.json. End every call with
#       cp /tmp/ds/*.json $OUT/ ; cp /tmp/ds/*.log $OUT/    (the logs: what failed, and the step times)
# No DeepSpeed op is JIT-built on these paths (the build note above), so nvcc/ninja time is not in the estimates.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
out=.gpu
grep -qx '/.gpu/' "$(git rev-parse --git-common-dir)/info/exclude" 2>/dev/null \
  || echo '/.gpu/' >> "$(git rev-parse --git-common-dir)/info/exclude"
# the pin, read from the `deepspeed` extra so the two never differ
spec=$("$PY" -c 'import tomllib; print(next(r for r in tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["deepspeed"] if r.startswith("deepspeed")))')
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
P="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $P -d "$tmp/w" hjson
"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$tmp/sdist" "$spec"
# setup.py only reads torch (if present) to record versions; with DS_BUILD_OPS=0 no op is compiled, so any
# Python builds the same pure wheel
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps -w "$tmp/w" "$tmp"/sdist/deepspeed-*.tar.gz
ls "$tmp"/w/deepspeed-*-py3-none-any.whl >/dev/null || { echo "deepspeed did not build as a pure wheel" >&2; exit 1; }
"$PY" -m pip install -q --no-deps --no-compile --target "$tmp/extras" "$tmp"/w/*.whl
# not needed at run time: the console scripts (bin/ holds shebangs of this machine's Python) and the tests'
# and docs' copies of the sources
rm -rf "$tmp/extras/bin"
mkdir -p "$out"
tar cJf "$out/extras.tar.xz" -C "$tmp/extras" .
ls -la "$out/extras.tar.xz"
