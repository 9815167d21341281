"""The fused loss's per-chunk pass alone: Inductor's fusion of the torch math against our Triton kernel.

    python benchmarks/softcap_ce_micro.py                  # one d20 chunk: 8192 rows x 65,536 logits, bf16
    python benchmarks/softcap_ce_micro.py --sweep          # also every launch shape (elements per loop x warps)

`lm_head_loss.py` runs, per chunk of logits z, softcap + log-sum-exp + loss + dz (`_ce_chunk_grad`, the
torch math) and, on CUDA, `softcap_ce.ce_chunk_grad` (the Triton kernel). This script times both on the same
z (median of CUDA-event timings; z is re-copied before every call, outside the timing, since the kernel
writes dz over it) and reports each one's distance to the math in float64 on the first --check-rows rows.
`--device cpu` runs the torch side only, at toy sizes (a smoke test of the script).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from nanochat_unsloth.model import lm_head_loss as L  # noqa: E402
from nanochat_unsloth.model import softcap_ce as S  # noqa: E402
from common import launch_shapes, micro_device  # noqa: E402


def time_chunk(fn, z0, targets, scale, warmup: int, iters: int, on_cuda: bool) -> tuple[float, tuple]:
    """Median ms of one chunk's loss + dz; also the last call's (loss_sum, dz)."""
    times = []
    for i in range(warmup + iters):
        z = z0.clone()
        if on_cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        out = fn(z, targets, 15.0, scale)
        if on_cuda:
            end.record()
            torch.cuda.synchronize()
            if i >= warmup:
                times.append(start.elapsed_time(end))
    return (statistics.median(times) if times else float("nan")), out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--check-rows", type=int, default=64, help="rows compared with the float64 math")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--sweep", action="store_true", help="also the kernel at every launch shape, to choose "
                   "softcap_ce.BLOCK / NUM_WARPS")
    p.add_argument("--out", default="", help="JSON file of the results")
    args = p.parse_args()
    device = micro_device(args.device)
    on_cuda = device.type == "cuda"
    g = torch.Generator(device=device).manual_seed(0)
    # logits of the spread a trained lm_head gives (std ~4), some beyond the softcap; a few ignored rows
    z0 = (torch.randn(args.rows, args.vocab, device=device, generator=g) * 4).bfloat16()
    targets = torch.randint(0, args.vocab, (args.rows,), device=device, generator=g)
    targets[:3] = -1
    scale = torch.tensor(1.0 / args.rows, device=device)
    n = min(args.check_rows, args.rows)
    _, ref_dz = L._ce_chunk_grad(z0[:n].double(), targets[:n], 15.0, scale.double())
    ref_total = sum(L._ce_chunk_losses(z0[a:a + 1024].double(), targets[a:a + 1024], 15.0).sum().item()
                    for a in range(0, args.rows, 1024))

    variants = {"torch (eager)": L._ce_chunk_grad}
    if on_cuda:
        variants["torch.compile (Inductor)"] = torch.compile(L._ce_chunk_grad, dynamic=False)
        variants["our kernel (softcap_ce)"] = S.ce_chunk_grad
    # the least the pass moves: z read twice, dz written once (bf16)
    min_gb = 3 * 2 * z0.numel() / 1e9
    results = []

    def record(name: str, ms: float, out, **extra):
        loss_sum, dz = out
        loss_err = abs(loss_sum.item() - ref_total) / abs(ref_total)
        dz_err = ((dz[:n].double() - ref_dz).abs().max() / ref_dz.abs().max()).item()
        results.append({"variant": name, "ms": ms, "min_gb_moved": min_gb, "dz_max_rel_err_vs_fp64": dz_err,
                        "loss_rel_err_vs_fp64": loss_err,
                        "rows": args.rows, "vocab": args.vocab, **extra})
        print(f"{name:40s} {ms:8.3f} ms ({min_gb / ms:5.2f} TB/s of the minimum traffic)   dz err vs fp64 "
              f"{dz_err:.2e} of the largest, loss sum {loss_err:.1e} relative",
              flush=True)

    for name, fn in variants.items():
        ms, out = time_chunk(fn, z0, targets, scale, args.warmup, args.iters, on_cuda)
        record(name, ms, out)
    if args.sweep and on_cuda:
        for block, warps in launch_shapes(S, BLOCK=(1024, 2048, 4096, 8192), NUM_WARPS=(4, 8, 16)):
            ms, out = time_chunk(S.ce_chunk_grad, z0, targets, scale, args.warmup, args.iters, on_cuda)
            record(f"our kernel, {block} per loop x {warps} warps", ms, out, block=block, num_warps=warps)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
