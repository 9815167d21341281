"""Our Triton GEMM with ReLU^2 in its epilogue against cuBLAS, at the d20 MLP's shapes: does fusion pay?

    python benchmarks/mlp_epilogue_micro.py                # d20, B=32: 65,536 rows, n_embd 1280
    python benchmarks/mlp_epilogue_micro.py --out mlp_epilogue.json

The MLP's ReLU^2 runs as separate elementwise passes at HBM bandwidth (docs/perf-log/2026-11-28.md, "Where
the exact path could still gain: a d20 block's pieces alone"). A GEMM epilogue could remove them, but only if
the GEMM carrying it runs near cuBLAS's rate, which Inductor's Triton templates did not reach at these shapes
(results: "The fused MLP: our Triton GEMMs against cuBLAS at d20's shapes", same page). This times, per GEMM
of the MLP that would carry the epilogue (CUDA events, median of --iters after --warmup):

- c_fc forward    h = relu(x @ W_fc.T)^2, also keeping r = relu(x @ W_fc.T) for the backward
- c_proj dgrad    da = (dy @ W_proj) * 2r   (ReLU^2's derivative applied to the incoming gradient)

each as cuBLAS alone (`torch.mm`, the floor without the elementwise work), cuBLAS + the elementwise pass
compiled (what training runs), our Triton GEMM alone and with the epilogue, in two forms (tiles loaded
through pointers, and a persistent kernel reading through TMA descriptors, one program per SM); and checks
ours against cuBLAS. The fusion pays where "ours + epilogue" beats "cuBLAS + elementwise".

Needs Triton (the GPU image has it). `--device cpu` runs the kernels under Triton's interpreter at toy sizes
(a correctness smoke test; set TRITON_INTERPRET=1 before Python starts, as the script's test does).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

PLAIN, RELU2_FWD, RELU2_BWD = 0, 1, 2  # the epilogue a launch applies

if triton is not None:
    _CONFIGS = [triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
                for bm, bn, bk, s, w in [(128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 4),
                                         (128, 128, 64, 4, 8), (64, 256, 64, 4, 4), (128, 256, 32, 4, 8)]]

    @triton.jit
    def _grouped_tile(tile, n_m, n_n, GROUP_M: tl.constexpr):
        # the (row, column) tile of output tile number `tile` in grouped order: GROUP_M consecutive tiles share
        # their columns' B block and walk down A's rows (L2 reuse)
        first_m = tile // (GROUP_M * n_n) * GROUP_M
        size_m = min(n_m - first_m, GROUP_M)
        return first_m + (tile % (GROUP_M * n_n)) % size_m, (tile % (GROUP_M * n_n)) // size_m

    @triton.jit
    def _gemm_kernel(A, B, C, R, M, N, K: tl.constexpr, sam, sak, sbk, sbn, scm, scn,
                     EPILOGUE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     GROUP_M: tl.constexpr):
        pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
        rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
        rn = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
        rk = tl.arange(0, BK)
        a_ptr = A + rm[:, None] * sam + rk[None, :] * sak
        b_ptr = B + rk[:, None] * sbk + rn[None, :] * sbn
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            k_left = K - k
            a = tl.load(a_ptr, mask=(rm[:, None] < M) & (rk[None, :] < k_left), other=0.0)
            b = tl.load(b_ptr, mask=(rk[:, None] < k_left) & (rn[None, :] < N), other=0.0)
            acc = tl.dot(a, b, acc)
            a_ptr += BK * sak
            b_ptr += BK * sbk
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        out = rm[:, None] * scm + rn[None, :] * scn
        if EPILOGUE == 1:  # RELU2_FWD (a literal: a jit function reads no plain Python globals)
            r = tl.maximum(acc, 0.0)
            tl.store(R + out, r.to(R.dtype.element_ty), mask=mask)
            acc = r * r
        elif EPILOGUE == 2:  # RELU2_BWD
            r = tl.load(R + out, mask=mask, other=0.0).to(tl.float32)
            acc = acc * 2.0 * r
        tl.store(C + out, acc.to(C.dtype.element_ty), mask=mask)

    # the GPU picks its tile shape by timing each config; the CPU interpreter cannot time, so it takes one
    _gemm_tuned = triton.autotune(configs=_CONFIGS, key=["M", "N", "K", "EPILOGUE"])(_gemm_kernel)

    @triton.jit
    def _gemm_tma_kernel(A, B, C, R, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr, NUM_SMS: tl.constexpr,
                         B_NK: tl.constexpr,
                         EPILOGUE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                         GROUP_M: tl.constexpr):
        # Persistent: one program per SM walks the output tiles; the operands come in through TMA descriptors
        # (A (M, K) row-major; B either the weight as stored, (N, K) row-major, or (K, N) row-major).
        a_desc = tl.make_tensor_descriptor(A, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
        if B_NK:
            b_desc = tl.make_tensor_descriptor(B, shape=[N, K], strides=[K, 1], block_shape=[BN, BK])
        else:
            b_desc = tl.make_tensor_descriptor(B, shape=[K, N], strides=[N, 1], block_shape=[BK, BN])
        c_desc = tl.make_tensor_descriptor(C, shape=[M, N], strides=[N, 1], block_shape=[BM, BN])
        r_desc = tl.make_tensor_descriptor(R, shape=[M, N], strides=[N, 1], block_shape=[BM, BN])
        n_m, n_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
        for tile in tl.range(tl.program_id(0), n_m * n_n, NUM_SMS, flatten=True):
            pid_m, pid_n = _grouped_tile(tile, n_m, n_n, GROUP_M)
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for k in range(0, K, BK):
                a = a_desc.load([pid_m * BM, k])
                if B_NK:
                    acc = tl.dot(a, b_desc.load([pid_n * BN, k]).T, acc)
                else:
                    acc = tl.dot(a, b_desc.load([k, pid_n * BN]), acc)
            if EPILOGUE == 1:  # RELU2_FWD
                r = tl.maximum(acc, 0.0)
                r_desc.store([pid_m * BM, pid_n * BN], r.to(R.dtype.element_ty))
                acc = r * r
            elif EPILOGUE == 2:  # RELU2_BWD
                acc = acc * 2.0 * r_desc.load([pid_m * BM, pid_n * BN]).to(tl.float32)
            c_desc.store([pid_m * BM, pid_n * BN], acc.to(C.dtype.element_ty))

    _TMA_CONFIGS = [triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
                    for bm, bn, bk, s, w in [(128, 256, 64, 3, 8), (128, 128, 64, 4, 8), (256, 128, 64, 3, 8),
                                             (128, 128, 64, 3, 4), (128, 256, 32, 4, 8)]]
    _gemm_tma_tuned = triton.autotune(configs=_TMA_CONFIGS, key=["M", "N", "K", "B_NK", "EPILOGUE"])(_gemm_tma_kernel)


def gemm(a: torch.Tensor, b: torch.Tensor, epilogue: int = PLAIN, r: torch.Tensor | None = None):
    """a (M, K) @ b (K, N) in our kernel, any strides; RELU2_FWD returns (relu(ab)^2, relu(ab)), RELU2_BWD
    returns ab * 2r."""
    M, K = a.shape
    N = b.size(1)
    c = torch.empty((M, N), device=a.device, dtype=a.dtype)
    if epilogue == RELU2_FWD:
        r = torch.empty_like(c)
    r_arg = r if r is not None else c  # unused by PLAIN

    def grid(meta):
        return (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)

    args = (a, b, c, r_arg, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1))
    if a.is_cuda:
        _gemm_tuned[grid](*args, EPILOGUE=epilogue)
    else:
        _gemm_kernel[grid](*args, EPILOGUE=epilogue, BM=32, BN=64, BK=16, GROUP_M=4)
    return (c, r) if epilogue == RELU2_FWD else c


def gemm_tma(a: torch.Tensor, w: torch.Tensor, b_nk: bool, epilogue: int = PLAIN, r: torch.Tensor | None = None):
    """The persistent TMA kernel: a (M, K) @ w.T when `b_nk` (w as a Linear stores it, (N, K)), else a @ w
    (w (K, N)); both contiguous. Returns as `gemm` does."""
    M, K = a.shape
    N = w.size(0) if b_nk else w.size(1)
    c = torch.empty((M, N), device=a.device, dtype=a.dtype)
    if epilogue == RELU2_FWD:
        r = torch.empty_like(c)
    r_arg = r if r is not None else c
    sms = torch.cuda.get_device_properties(a.device).multi_processor_count if a.is_cuda else 4

    def grid(meta):
        return (min(sms, triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"])),)

    args = (a, w, c, r_arg, M, N, K, sms, b_nk)
    if a.is_cuda:
        _gemm_tma_tuned[grid](*args, EPILOGUE=epilogue)
    else:
        _gemm_tma_kernel[grid](*args, EPILOGUE=epilogue, BM=32, BN=64, BK=16, GROUP_M=4)
    return (c, r) if epilogue == RELU2_FWD else c


def _allocate_descriptors(size: int, alignment: int, stream):
    # device-side TMA descriptors live in a scratch buffer Triton asks the caller for
    return torch.empty(size, device="cuda", dtype=torch.int8)


def timed(fn, iters: int, warmup: int, cuda: bool) -> float:
    for _ in range(warmup):
        fn()
    if not cuda:
        return float("nan")
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-30)).item()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=65536, help="B x T of a micro-batch (d20 B=32: 65,536)")
    p.add_argument("--n-embd", type=int, default=1280)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--out", default="")
    args = p.parse_args()
    if triton is None:
        p.error("needs Triton (`pip install triton`; the GPU image has it)")
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU here (use --device cpu under TRITON_INTERPRET=1 for a smoke test)")
    dev, M, C = args.device, args.rows, args.n_embd
    g = torch.Generator(device=dev).manual_seed(0)
    dtype = torch.bfloat16 if cuda else torch.float32  # the interpreter computes in numpy (no bf16 dot)
    x = torch.randn(M, C, device=dev, generator=g, dtype=dtype)
    w_fc = torch.randn(4 * C, C, device=dev, generator=g, dtype=dtype) / C**0.5
    w_proj = torch.randn(C, 4 * C, device=dev, generator=g, dtype=dtype) / (4 * C) ** 0.5
    dy = torch.randn(M, C, device=dev, generator=g, dtype=dtype)

    def relu2(a):
        r = torch.relu(a)
        return r * r, r

    def relu2_grad(d, r):
        return d * 2 * r

    if cuda:
        relu2, relu2_grad = torch.compile(relu2, dynamic=False), torch.compile(relu2_grad, dynamic=False)
    h_ref, r_ref = relu2(x @ w_fc.t())
    da_ref = relu2_grad(dy @ w_proj, r_ref)
    if cuda:
        triton.set_allocator(_allocate_descriptors)
    h, r = gemm(x, w_fc.t(), RELU2_FWD)
    da = gemm(dy, w_proj, RELU2_BWD, r_ref)
    h_tma, r_tma = gemm_tma(x, w_fc, True, RELU2_FWD)
    da_tma = gemm_tma(dy, w_proj, False, RELU2_BWD, r_ref)
    errors = {"c_fc forward h": rel_err(h, h_ref), "c_fc forward r": rel_err(r, r_ref),
              "c_proj dgrad da": rel_err(da, da_ref), "plain c_fc": rel_err(gemm(x, w_fc.t()), x @ w_fc.t()),
              "tma c_fc forward h": rel_err(h_tma, h_ref), "tma c_fc forward r": rel_err(r_tma, r_ref),
              "tma c_proj dgrad da": rel_err(da_tma, da_ref)}
    flops = 2 * M * C * 4 * C
    rows = {
        "c_fc forward": {
            "cublas": lambda: x @ w_fc.t(),
            "cublas + relu2 (compiled)": lambda: relu2(x @ w_fc.t()),
            "ours": lambda: gemm(x, w_fc.t()),
            "ours + relu2 epilogue": lambda: gemm(x, w_fc.t(), RELU2_FWD),
            "ours TMA persistent": lambda: gemm_tma(x, w_fc, True),
            "ours TMA persistent + relu2 epilogue": lambda: gemm_tma(x, w_fc, True, RELU2_FWD),
        },
        "c_proj dgrad": {
            "cublas": lambda: dy @ w_proj,
            "cublas + relu2 grad (compiled)": lambda: relu2_grad(dy @ w_proj, r_ref),
            "ours": lambda: gemm(dy, w_proj),
            "ours + relu2 grad epilogue": lambda: gemm(dy, w_proj, RELU2_BWD, r_ref),
            "ours TMA persistent": lambda: gemm_tma(dy, w_proj, False),
            "ours TMA persistent + relu2 grad epilogue": lambda: gemm_tma(dy, w_proj, False, RELU2_BWD, r_ref),
        },
    }
    results = {"rows": M, "n_embd": C, "gpu": torch.cuda.get_device_name() if cuda else "cpu",
               "torch": torch.__version__, "triton": triton.__version__, "max_rel_err_vs_torch": errors, "ms": {}}
    for name, err in errors.items():
        print(f"{name:24s} max rel diff vs torch {err:.2e}")
    for gemm_name, variants in rows.items():
        for variant, fn in variants.items():
            ms = timed(fn, args.iters, args.warmup, cuda)
            results["ms"][f"{gemm_name} | {variant}"] = ms
            tflops = flops / (ms * 1e-3) / 1e12 if cuda else 0.0
            print(f"{gemm_name:14s} {variant:32s} {ms:8.3f} ms  {tflops:6.0f} TFLOP/s", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
