"""One d20 block's pieces alone on the GPU, forward + backward: where fusion could still pay, measured first.

    python benchmarks/kernel_micro.py --depth 20 --batch-size 32 --out micro.json

Every piece is our model's own module (`model.gpt`, torch kernels, fp32 master weights under bf16 autocast,
as training runs it), compiled as training compiles a block, then timed (CUDA events, median of --iters after
--warmup) for forward + backward at the d20 micro-batch shape (B x 2048 rows):

- `mlp`: c_fc -> ReLU^2 -> c_proj; `mlp-linear`: the same two GEMMs without ReLU^2 (the floor a fused epilogue
  could reach); each in every --modes: `default` (training's torch.compile), `max-autotune` (Inductor may
  pick Triton GEMM templates, which fuse ReLU^2 into their epilogue, where they beat cuBLAS),
  `max-autotune-tma` (the same with Inductor's persistent TMA GEMM templates), `eager` (no compile).
- `attention-op`: the attention kernel alone, causal, per backend: SDPA's default, cuDNN and flash, and
  FlashAttention-4 where `flash-attn-4` imports (called directly, and through torch's
  `activate_flash_attention_impl("FA4")` as SDPA's flash backend); TFLOP/s, and each one's largest difference
  from the first (output and q/k/v gradients, relative to the largest magnitude).
- `block`: one whole block, in every --modes.

Results print as a table and go to --out (JSON). Each variant's gap to its floor is the time a fused kernel
could remove from every block of every micro-step (x n_layer x grad_accum per optimizer step).
`--device cpu` is a smoke test of the code paths (tiny sizes, eager, no figures worth reading).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from nanochat_unsloth.model.gpt import MLP, Block, GPTConfig, rotary_tables  # noqa: E402
from nanochat_unsloth.model.ops import TORCH_KERNELS  # noqa: E402


MODES = {  # --modes name -> torch.compile options (None: eager)
    "eager": None,
    "default": {},
    "max-autotune": {"max_autotune": True, "triton.cudagraphs": False},
    "max-autotune-tma": {"max_autotune": True, "triton.cudagraphs": False, "triton.enable_persistent_tma_matmul": True},
}


def time_fwd_bwd(fn, inputs, iters: int, warmup: int) -> dict:
    """Median ms of forward + backward (through a fixed random cotangent)."""
    cuda = inputs[0].is_cuda
    out = fn(*inputs)
    grad = torch.randn_like(out)
    times = []
    for i in range(warmup + iters):
        for t in inputs:
            t.grad = None
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        fn(*inputs).backward(grad)
        if cuda:
            end.record()
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end) if cuda else 1e3 * (time.perf_counter() - t0))
    return {"ms": statistics.median(times), "min_ms": min(times)}


def sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def attn(q, k, v):
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return attn


def flash_attention_4():
    """FlashAttention-4's causal attention on (B, T, H, D) tensors, or None where `flash-attn-4` does not
    import (its CuTe DSL kernels have SM90 forward and backward)."""
    try:
        from flash_attn.cute import flash_attn_func
    except ImportError:
        return None

    def attn(q, k, v):
        out = flash_attn_func(q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out
    return attn


def compiled(module_fn, mode: str):
    if MODES[mode] is None:
        return module_fn
    torch._dynamo.reset()
    return torch.compile(module_fn, dynamic=False, options=MODES[mode])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--pieces", default="mlp,mlp-linear,attention-op,block")
    p.add_argument("--modes", default="default,max-autotune-tma", help="comma list of: " + ", ".join(MODES))
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--out", default="")
    args = p.parse_args()
    if unknown := set(args.modes.split(",")) - set(MODES):
        p.error(f"--modes: unknown {sorted(unknown)}; choose from {', '.join(MODES)}")
    torch.manual_seed(0)
    dev = args.device
    if dev == "cpu":  # a smoke test: tiny shapes, no compilation
        args.depth, args.batch_size, args.seq, args.iters, args.warmup, args.modes = 2, 2, 32, 1, 1, "eager"

    def amp():
        return torch.autocast(dev, dtype=torch.bfloat16)
    config = GPTConfig.from_depth(args.depth, args.seq, 65536)
    B, T, C, H, D = args.batch_size, args.seq, config.n_embd, config.n_head, config.head_dim
    rows = B * T
    results = {"depth": args.depth, "batch_size": B, "rows": rows, "torch": torch.__version__, "pieces": {},
               "gpu": torch.cuda.get_device_name() if dev == "cuda" else "cpu"}
    x = torch.randn(B, T, C, device=dev, dtype=torch.bfloat16, requires_grad=True)
    pieces = args.pieces.split(",")

    def record(name, r, flops=None):
        if flops:
            r["tflops"] = flops / (r["ms"] * 1e-3) / 1e12
        results["pieces"][name] = r
        print(f"{name:34} {r['ms']:8.3f} ms" + (f"  {r['tflops']:6.0f} TFLOP/s" if flops else ""), flush=True)

    mlp = MLP(config, TORCH_KERNELS).to(dev)
    mlp_flops = 3 * 2 * rows * C * 4 * C * 2  # two GEMMs, forward + 2x backward

    def mlp_fn(inp):
        with amp():
            return mlp(inp)

    def mlp_linear_fn(inp):
        with amp():
            return mlp.c_proj(mlp.c_fc(inp))

    for mode in args.modes.split(","):
        if "mlp" in pieces:
            record(f"mlp [{mode}]", time_fwd_bwd(compiled(mlp_fn, mode), [x], args.iters, args.warmup), mlp_flops)
        if "mlp-linear" in pieces:
            record(f"mlp-linear [{mode}]", time_fwd_bwd(compiled(mlp_linear_fn, mode), [x], args.iters,
                                                         args.warmup), mlp_flops)
    if "attention-op" in pieces:
        q, k, v = (torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        attn_flops = 4 * B * H * T * T * D / 2 * 3.5  # causal: fwd 2 GEMMs, bwd 5 (2.5x fwd)
        from torch.nn.attention import SDPBackend

        backends = {"default": None}
        if dev == "cuda":
            backends.update(cudnn=SDPBackend.CUDNN_ATTENTION, flash=SDPBackend.FLASH_ATTENTION)
        variants = {name: sdpa(backend) for name, backend in backends.items()}
        fa4 = flash_attention_4() if dev == "cuda" else None
        if fa4 is not None:  # FlashAttention-4 (PyPI flash-attn-4) takes (B, T, H, D): the model's own layout
            variants["flash-attn-4"] = lambda q, k, v: fa4(q.transpose(1, 2), k.transpose(1, 2),
                                                            v.transpose(1, 2)).transpose(1, 2)
        reference = []

        def time_attention(name, attn):
            try:
                r = time_fwd_bwd(attn, [q, k, v], args.iters, args.warmup)
            except (RuntimeError, ValueError, TypeError) as e:  # an optional backend that fails is reported, not fatal
                print(f"attention-op [{name}]: failed: {type(e).__name__}: {str(e).splitlines()[0]}")
                results["pieces"][f"attention-op [{name}]"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
                return
            # agreement with the first backend: the output and the gradients of one fixed cotangent
            for t in (q, k, v):
                t.grad = None
            out = attn(q, k, v)
            out.backward(torch.ones_like(out))
            got = [out.detach().float()] + [t.grad.float() for t in (q, k, v)]
            if not reference:
                reference.extend(got)
            else:
                r["max_rel_diff_vs_default"] = max(
                    ((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, reference))
            record(f"attention-op [{name}]", r, attn_flops)

        for name, attn in variants.items():
            time_attention(name, attn)
        if fa4 is not None and hasattr(torch.nn.attention, "activate_flash_attention_impl"):
            # torch's own FA4 hook: SDPA's flash backend then runs FA4's kernels, an aten op that
            # torch.compile sees through (process-wide, hence last)
            torch.nn.attention.activate_flash_attention_impl("FA4")
            time_attention("sdpa-flash-fa4", sdpa(SDPBackend.FLASH_ATTENTION))
    if "block" in pieces:
        block = Block(config, TORCH_KERNELS).to(dev)
        cos, sin = rotary_tables(T, D, device=dev)

        def block_fn(inp):
            with amp():
                return block(inp, cos, sin)

        for mode in args.modes.split(","):
            record(f"block [{mode}]", time_fwd_bwd(compiled(block_fn, mode), [x], args.iters, args.warmup))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
