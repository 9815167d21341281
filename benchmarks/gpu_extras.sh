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
# seconds are estimates (H100), machine start and unpacking not counted. /tmp survives between calls only
# while the machine stays warm, so the data call goes first and the rest follow without a pause.
#  1. corpus, tokenizer and shards (~60-120 s: 150M characters of the image's own source text and headers, a
#     65,536-token BPE trained on them, prep; a 719M-character build took 59 s on the 4-GPU machine):
#       python benchmarks/runs.py quality --base-dir /tmp/ds --make-data --max-chars 150000000 \
#         --tokenizer-chars 150000000 --data-only
#  2. capacity, our lean memory mode (~60-150 s per depth: build and initialise the model, compile, 4 steps of
#     2 x 2048 tokens; the first depth that does not fit ends the launch):
#       python benchmarks/runs.py capacity --base-dir /tmp/ds --depths 48,52,56,64 --launches lean \
#         --timeout 240 --out /tmp/ds/capacity_lean.json
#  3. capacity, ZeRO-3 + CPU offload (~150-300 s per depth: the fp32 weights, gradients and Muon momentum live in
#     the host's pinned memory, about 16 bytes per parameter, so the 128 GiB host bounds it near d52; Muon itself
#     runs on the GPU, AdamW and the update on the CPU):
#       python benchmarks/runs.py capacity --base-dir /tmp/ds --depths 48,52 --launches zero3_offload \
#         --steps 3 --warmup 1 --timeout 280 --out /tmp/ds/capacity_zero3_offload.json
#  4. d12 curves, 100 steps of 65,536 tokens (8 x 2048 x 4 accumulation), val bpb every 25 steps; each run
#     ~130-200 s (compile ~60 s), ZeRO-3 runs uncompiled and offload updates on the CPU (~250-400 s each):
#       python benchmarks/runs.py deepspeed --base-dir /tmp/ds --gpus 1 --part curves --runs a,b
#       python benchmarks/runs.py deepspeed --base-dir /tmp/ds --gpus 1 --part curves --runs deepspeed_zero2
#       python benchmarks/runs.py deepspeed --base-dir /tmp/ds --gpus 1 --part curves --runs deepspeed_zero3
#       python benchmarks/runs.py deepspeed --base-dir /tmp/ds --gpus 1 --part curves --runs deepspeed_zero3_offload
#     then the comparison, which reuses every finished run (seconds):
#       python benchmarks/runs.py deepspeed --base-dir /tmp/ds --gpus 1 --part curves
#     and copy /tmp/ds/*.json (and the *.log of anything that failed) to $OUT.
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
