"""What each block keeps for backward, per memory mode: measured on the allocator, not estimated.

    python benchmarks/activation_memory.py --depth 20 --batch-size 8 --kernels fused-fp8 \\
        --memory fast,selective-14,lean-7 --out act.json

For each --memory variant (each in its own subprocess, like train_throughput.py; the names are common.py's) this builds the model
as training does (`build.build_model`, `compile.compile_for_training`, bf16 autocast; with --fp8 every delayed
scaling state switched on, as after the first steps), runs one warm-up micro-step (compilation), then
one measured micro-step forward:
    kept per block   memory_allocated() after each block minus before it: the block's saved tensors and
                     its output (the next block's input), i.e. what it holds until backward;
    kept in all      after the loss minus before the embedding;
    peak             max_memory_allocated() over the measured forward + backward, above the start;
    saved tensors    (shape, dtype, count) of what autograd saved for the first block, through
                     `saved_tensors_hooks` (best effort: "unavailable" where the hooks break compilation).
The weights, gradients and optimizer state are not part of these figures (no optimizer is built).
`--device cpu` runs a toy-size smoke test (the CPU allocator is not measured: memory columns are 0).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import KERNEL_VARIANTS, memory_variant, model_options, run_configuration, write_json  # noqa: E402

MIB = 2**20


def measure(args) -> dict:
    import torch

    from nanochat_unsloth.model import fp8 as fp8_ops
    from nanochat_unsloth.model.build import build_model
    from nanochat_unsloth.model.compile import compile_for_training
    from nanochat_unsloth.model.gpt import GPTConfig

    on_cuda = args.device == "cuda"
    if args.fp8_anywhere:  # tests: torch._scaled_mm also runs on the CPU (slowly), enough for toy sizes
        fp8_ops.fp8_supported = lambda device: (True, "")
    device = torch.device(args.device)
    options = model_options(args.kernels, args.memory, args.batch_size, args.seq, device)
    if options.compile == "model" and options.kernels == "fused" and "compile" not in KERNEL_VARIANTS[args.kernels]:
        # per-block accounting needs the blocks compiled one by one, also where `auto` compiles the fused
        # set's small-batch FP8 step whole
        options = dataclasses.replace(options, compile="blocks", cuda_graphs=False)
    model = build_model(GPTConfig.from_depth(args.depth, args.seq, args.vocab), options, device, seed=0)
    for s in fp8_ops.delayed_scalings(model):  # the steady state: delayed scaling on, a plausible history
        s.x_amax.fill_(1.0)
        s.grad_amax.fill_(1e-3)
        s.active = True
    mode = options.compile
    compiled = compile_for_training(model, model, mode)

    allocated = torch.cuda.memory_allocated if on_cuda else (lambda: 0)
    marks: list[int] = []
    current = {"block": -1}

    def wrap(i, fn):
        def run(*a):
            current["block"] = i
            out = fn(*a)
            marks.append(allocated())
            current["block"] = -1
            return out
        return run

    blocks = list(model.transformer.h)
    originals = list(model.compiled_blocks) if model.compiled_blocks is not None else None
    if mode == "model":
        raise SystemExit("activation_memory: needs the blocks compiled separately; use a torch-blocks or fused variant")
    twins = originals if originals is not None else blocks
    model.compiled_blocks = [wrap(i, fn) for i, fn in enumerate(twins)]

    gen = torch.Generator(device=device).manual_seed(0)

    def micro_step(hooks=None):
        w = torch.randint(0, args.vocab, (args.batch_size * args.seq + 1,), device=device, generator=gen)
        x, y = w[:-1].view(args.batch_size, args.seq).int(), w[1:].view(args.batch_size, args.seq)
        marks.clear()
        start = allocated()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_cuda):
            if hooks is None:
                loss = compiled(x, y)
            else:
                with torch.autograd.graph.saved_tensors_hooks(*hooks):
                    loss = compiled(x, y)
        after = allocated()
        loss.backward()
        model.zero_grad(set_to_none=True)
        return start, after

    micro_step()  # compiles
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start, after = micro_step()
    peak = torch.cuda.max_memory_allocated() if on_cuda else 0
    before_blocks = [start] + marks[:-1]
    per_block = [(m - b) / MIB for m, b in zip(marks, before_blocks)]
    # the first block's delta includes the embedding's output; every other one starts at a block output
    result = {
        "depth": args.depth, "kernels": args.kernels, "batch_size": args.batch_size, "memory": args.memory,
        "compile": mode, "block_memory": model.block_memory,
        "kept_per_block_mib": per_block,
        "kept_total_gib": (after - start) / 2**30,
        "peak_above_start_gib": (peak - start) / 2**30,
        "gpu": torch.cuda.get_device_name() if on_cuda else "cpu", "torch": torch.__version__,
    }

    saved: list = []

    def pack(t):
        if current["block"] == 0:
            saved.append((tuple(t.shape), str(t.dtype).replace("torch.", "")))
        return t

    try:
        micro_step((pack, lambda t: t))
        counts = collections.Counter(saved)
        result["block0_saved"] = [{"shape": list(s), "dtype": d, "count": n}
                                  for (s, d), n in sorted(counts.items(), key=lambda kv: -math.prod(kv[0][0]))]
    except Exception as e:  # noqa: BLE001 - a diagnostic; the allocator figures above stand on their own
        result["block0_saved"] = f"unavailable ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--kernels", default="fused-fp8", choices=sorted(KERNEL_VARIANTS))
    p.add_argument("--memory", default="fast,selective", help="comma list: fast, lean, lean-K, selective, selective-K")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--out", default="")
    p.add_argument("--timeout", type=int, default=300, help="seconds per variant")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--fp8-anywhere", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.one:
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return 0
    results = []
    for name in args.memory.split(","):
        try:
            memory_variant(name)
        except KeyError:
            p.error(f"--memory {name!r}: choose fast, lean, lean-K, selective or selective-K")
        env = None  # every setting is a flag of the configuration's process
        cmd = [sys.executable, __file__, "--one", "--depth", str(args.depth), "--seq", str(args.seq),
               "--vocab", str(args.vocab), "--batch-size", str(args.batch_size), "--kernels", args.kernels,
               "--memory", name, "--device", args.device] + (["--fp8-anywhere"] if args.fp8_anywhere else [])
        result = run_configuration(cmd, env, args.timeout, {"memory": name})
        results.append(result)
        print(format_result(result), flush=True)
        if args.out:
            write_json(args.out, results)
    return 1 if any("error" in r for r in results) else 0


def format_result(r: dict) -> str:
    if "error" in r:
        return f"{r['memory']:<14} ERROR {r['error']}"
    by_mode = collections.defaultdict(list)
    for mode, mib in zip(r["block_memory"][1:], r["kept_per_block_mib"][1:]):  # block 0 also holds the embedding
        by_mode[mode].append(mib)
    per_mode = ", ".join(f"{m} {sum(v) / len(v):.0f} MiB/block" for m, v in by_mode.items())
    lines = [f"{r['memory']:<14} kept {r['kept_total_gib']:6.2f} GiB | peak +{r['peak_above_start_gib']:6.2f} GiB | "
             f"{per_mode} | {r['wall_s']:.0f}s"]
    if isinstance(r.get("block0_saved"), list):
        lines += [f"    block 0 saved {e['count']} x {e['shape']} {e['dtype']}" for e in r["block0_saved"][:10]]
    elif r.get("block0_saved"):
        lines.append(f"    block 0 saved: {r['block0_saved']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
