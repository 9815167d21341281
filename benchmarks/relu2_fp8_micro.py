"""The FP8 MLP's backward glue alone: Inductor's fusion of the torch math against our Triton kernel.

    python benchmarks/relu2_fp8_micro.py            # d20's c_fc gradient at B=32: 65,536 x 5,120, bf16

Per block and micro-step, `--fp8` with delayed scaling turns ReLU^2's output gradient dh and its input u into
c_fc's e5m2 gradient in both layouts and its amax (`fp8._quantize_grad`). This script times that pass as the
torch math compiled by Inductor (what the step ran before `relu2_fp8.py`) and as our kernel, autotuned and
at each of its launch shapes, on the same inputs (median of CUDA-event timings), and checks that every
variant's bytes equal the eager torch math's. `--device cpu` runs the eager math only, at toy sizes (a
smoke test of the script).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from nanochat_unsloth.model import fp8 as F8  # noqa: E402
from nanochat_unsloth.model import relu2_fp8 as R  # noqa: E402
from rope_norm_micro import micro_device  # noqa: E402  (a sibling script: its directory is on sys.path)


def torch_glue(dh, u, history):
    """The torch math of the pass, as `fp8._quantize_grad` runs it without the kernel (delayed scaling)."""
    dr = F8.relu2_grad(dh, u)
    g8, _ = F8.quantize_with_amax(dr, history * F8.MARGIN, F8.E5M2)
    return g8, g8.t().contiguous(), F8.row_first_amax(dr)


def kernel_glue(config=None):
    def run(dh, u, history):
        return R.launch(dh, u, F8.scale_for(history * F8.MARGIN, F8.E5M2), config)
    return run


def time_ms(fn, args, warmup: int, iters: int, on_cuda: bool) -> tuple[float, tuple]:
    times = []
    for i in range(warmup + iters):
        if on_cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        out = fn(*args)
        if on_cuda:
            end.record()
            torch.cuda.synchronize()
            if i >= warmup:
                times.append(start.elapsed_time(end))
    return (statistics.median(times) if times else float("nan")), out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=65536, help="B*T of a micro-batch")
    p.add_argument("--hidden", type=int, default=5120, help="4 * n_embd")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--out", default="", help="JSON file of the results")
    args = p.parse_args()
    device = micro_device(args.device)
    on_cuda = device.type == "cuda"
    g = torch.Generator(device=device).manual_seed(0)
    dh = (torch.randn(args.rows, args.hidden, device=device, generator=g) * 1e-3).bfloat16()
    u = torch.randn(args.rows, args.hidden, device=device, generator=g).bfloat16()
    history = F8.row_first_amax(F8.relu2_grad(dh, u)) * 0.7  # last micro-step's amax: some values saturate
    variants = {"torch (eager)": torch_glue}
    if on_cuda:
        variants["torch.compile (Inductor)"] = torch.compile(torch_glue, dynamic=False)
        variants["our kernel, autotuned"] = kernel_glue()
        variants.update({f"our kernel, {bm}x{bn} tile, {w} warps": kernel_glue((bm, bn, w)) for bm, bn, w in R.CONFIGS})
    # the least the pass moves: dh and u read (bf16), the e5m2 gradient written twice
    min_gb = (2 + 2 + 1 + 1) * dh.numel() / 1e9
    ref = None
    results = []
    for name, fn in variants.items():
        ms, out = time_ms(fn, (dh, u, history), args.warmup, args.iters, on_cuda)
        ref = ref or out
        same = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.dim() else torch.equal(a, b)
                   for a, b in zip(out, ref))
        results.append({"variant": name, "ms": ms, "min_gb_moved": min_gb, "equal_to_eager": same,
                        "rows": args.rows, "hidden": args.hidden})
        print(f"{name:40s} {ms:8.3f} ms ({min_gb / ms:5.2f} TB/s of the minimum traffic)  "
              f"bytes equal to eager: {same}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
