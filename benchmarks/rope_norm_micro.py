"""Unsloth's RoPE and RMSNorm kernels against torch.compile's fusion of nanochat's, forward + backward.

    python benchmarks/rope_norm_micro.py                 # d20 shapes: B=32, T=2048, 10 heads of 128

A block applies rotary embeddings and then the weightless QK RMSNorm to q and k (model.py). Under
torch.compile (our torch and unsloth kernel sets alike) Inductor fuses rotary + norm into one kernel for
the forward and one for the backward. The alternative weighed here is Unsloth's Triton kernels:
`fast_rope_embedding` (both q and k in one launch; nanochat's rotation is Unsloth's with -sin) and
`Fast_RMS_Layernorm` (a ones weight and eps = float32 eps reproduce `F.rms_norm`). They are separate
kernels, so the rotated q and k make one more round trip through memory. This script times both on the
same tensors (median of --iters CUDA-event timings after warm-up) and checks that they agree.
`--device cpu` runs only the torch side at toy sizes (a smoke test of the script). The Unsloth side needs the
`unsloth` package, which the `gpu` extra does not install (the product uses none of it): `pip install unsloth`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from nanochat_unsloth.model.memory import import_unsloth_module  # noqa: E402
from nanochat_unsloth.model.ops import torch_rotary_norm  # noqa: E402
from nanochat_unsloth.model.gpt import rotary_tables  # noqa: E402
from nanochat_unsloth.model import rotary_norm as R  # noqa: E402
from nanochat_unsloth.model.rotary_norm import rotary_norm  # noqa: E402
from common import launch_shapes, micro_device  # noqa: E402


def torch_qk(q, k, cos, sin):
    return torch_rotary_norm(q, cos, sin), torch_rotary_norm(k, cos, sin)


def fused_qk(q, k, cos, sin):
    return rotary_norm(q, cos, sin), rotary_norm(k, cos, sin)


def unsloth_qk_fn(head_dim: int, device):
    rope = import_unsloth_module("unsloth.kernels.rope_embedding")
    norm = import_unsloth_module("unsloth.kernels.rms_layernorm")
    ones = torch.ones(head_dim, device=device, dtype=torch.bfloat16)
    eps = R.rms_norm_eps(torch.bfloat16)  # F.rms_norm's default for bf16 input (float32's: it computes in fp32)

    def unsloth_qk(q, k, cos, sin):
        # (B, T, H, D) storage seen as (B, H, T, D): the layout Unsloth's RoPE rotates in place
        cos_full = torch.cat([cos, cos], dim=-1).reshape(cos.size(1), -1)
        sin_full = torch.cat([-sin, -sin], dim=-1).reshape(sin.size(1), -1)
        q, k = rope.fast_rope_embedding(q.transpose(1, 2), k.transpose(1, 2), cos_full, sin_full)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        return (norm.Fast_RMS_Layernorm.apply(q, ones, eps, False), norm.Fast_RMS_Layernorm.apply(k, ones, eps, False))

    return unsloth_qk


def time_fwd_bwd(fn, q0, k0, cos, sin, grads, warmup: int, iters: int, on_cuda: bool) -> tuple[float, tuple]:
    """Median ms of forward + backward; also the outputs and input gradients of the last run."""
    times = []
    for i in range(warmup + iters):
        q = q0.detach().clone().requires_grad_()
        k = k0.detach().clone().requires_grad_()
        if on_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        # the kernels may rotate in place: hand them non-leaf tensors, as a block does
        yq, yk = fn(q * 1, k * 1, cos, sin)
        torch.autograd.backward((yq, yk), grads)
        if on_cuda:
            end.record()
            torch.cuda.synchronize()
            if i >= warmup:
                times.append(start.elapsed_time(end))
    return (statistics.median(times) if times else float("nan")), (yq.detach(), yk.detach(), q.grad, k.grad)


def rel_diff(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--heads", type=int, default=10)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--out", default="", help="JSON file of the results")
    p.add_argument("--unsloth", action="store_true", help="also Unsloth's kernels (needs `pip install unsloth`)")
    p.add_argument("--sweep", action="store_true", help="also our kernels at every launch shape (rows per "
                   "program x warps), to choose rotary_norm.ROWS_PER_PROGRAM / NUM_WARPS")
    args = p.parse_args()
    device = micro_device(args.device)
    on_cuda = device.type == "cuda"
    g = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch, args.seq, args.heads, args.head_dim)
    q0 = torch.randn(shape, device=device, generator=g, dtype=torch.bfloat16)
    k0 = torch.randn(shape, device=device, generator=g, dtype=torch.bfloat16)
    grads = (torch.randn(shape, device=device, generator=g, dtype=torch.bfloat16),
             torch.randn(shape, device=device, generator=g, dtype=torch.bfloat16))
    cos, sin = rotary_tables(args.seq, args.head_dim, device=device)

    variants = {"torch (eager)": torch_qk}
    if on_cuda:
        variants["torch.compile (the torch set)"] = torch.compile(torch_qk, dynamic=False)
        variants["our kernels (the fused set)"] = fused_qk
        if args.unsloth:
            variants["unsloth RoPE + RMSNorm"] = unsloth_qk_fn(args.head_dim, device)
    results, reference = [], None
    for name, fn in variants.items():
        ms, outs = time_fwd_bwd(fn, q0, k0, cos, sin, grads, args.warmup, args.iters, on_cuda)
        reference = reference or outs
        diffs = [rel_diff(a, b) for a, b in zip(outs, reference)]
        # the least a fused forward + backward moves for q and k: forward reads x and writes y, backward
        # reads dy and x and writes dx (bf16): 10 bytes per element of each
        min_gb = 10 * 2 * q0.numel() / 1e9
        results.append({"variant": name, "ms": ms, "max_rel_diff_vs_eager": max(diffs), "shape": list(shape),
                        "min_gb_moved": min_gb})
        print(f"{name:38s} {ms:8.3f} ms fwd+bwd ({min_gb / ms:6.2f} TB/s of the minimum traffic)   "
              f"max rel diff vs eager {max(diffs):.2e}", flush=True)
    if args.sweep and on_cuda:
        for rows, warps in launch_shapes(R, ROWS_PER_PROGRAM=(8, 16, 32, 64), NUM_WARPS=(2, 4, 8)):
            ms, outs = time_fwd_bwd(fused_qk, q0, k0, cos, sin, grads, args.warmup, args.iters, on_cuda)
            diff = max(rel_diff(a, b) for a, b in zip(outs, reference))
            results.append({"variant": f"our kernels, {rows} rows x {warps} warps", "ms": ms,
                            "max_rel_diff_vs_eager": diff, "rows_per_program": rows, "num_warps": warps})
            print(f"our kernels, {rows:2d} rows per program x {warps} warps   {ms:8.3f} ms fwd+bwd   "
                  f"max rel diff vs eager {diff:.2e}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
