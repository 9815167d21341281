"""CPU capabilities are found by running the op, not read from the CPU's flags (model/cpu_probe.py).

PyTorch sends an FP8 `_scaled_mm` to oneDNN where the CPU's flags list AMX; oneDNN held to fewer instructions
(ONEDNN_MAX_CPU_ISA=AVX2) then refuses it with "could not create a primitive descriptor". That refusal
cannot be produced on a CPU without those flags (PyTorch never asks oneDNN there), so the logic is tested
with the refusal raised as oneDNN raises it, and the real thing in a subprocess held to AVX2, which is the
failing case on a CPU whose /proc/cpuinfo lists avx512_fp16 or amx and a plain check elsewhere.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from nanochat_unsloth.model import fp8 as F8
from nanochat_unsloth.model.cpu_probe import op_runs

REPO = Path(__file__).resolve().parents[1]
# oneDNN's message, as PyTorch raises it (a RuntimeError)
ONEDNN_REFUSAL = ("could not create a primitive descriptor for the matmul primitive. Run workload with environment "
                  "variable ONEDNN_VERBOSE=all to get additional diagnostic information.")


def _refused():
    raise RuntimeError(ONEDNN_REFUSAL)


def test_op_runs_tells_a_refusal_from_a_bug():
    assert op_runs(lambda: torch.ones(2, 2) @ torch.ones(2, 2)) == (True, "")
    assert op_runs(_refused) == (False, ONEDNN_REFUSAL)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):  # not a capability: raised
        op_runs(lambda: torch.ones(2, 3) @ torch.ones(2, 3))


def _fp8_linear_grads(x: torch.Tensor, w: torch.Tensor, compiled: bool = False):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    fn = torch.compile(F8.fp8_matmul, backend="aot_eager", fullgraph=True) if compiled else F8.fp8_matmul
    y = fn(x, w)
    y.square().sum().backward()
    return y.detach(), x.grad, w.grad


@pytest.mark.usefixtures("fresh_notices")
def test_fp8_gemms_take_the_reference_where_onednn_refuses_them(monkeypatch, capsys):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(32, 64, generator=g), torch.randn(48, 64, generator=g)
    monkeypatch.setattr(F8, "_CPU_SCALED_MM", {})
    runs = _fp8_linear_grads(x, w)  # torch._scaled_mm itself
    assert set(F8._CPU_SCALED_MM.values()) == {True}, "the probe ran, and the op runs on this CPU"

    monkeypatch.setattr(F8, "_CPU_SCALED_MM", {})
    monkeypatch.setattr(F8, "op_runs", lambda op: op_runs(_refused))
    refused = _fp8_linear_grads(x, w)
    assert set(F8._CPU_SCALED_MM.values()) == {False}, "every dtype pair of the three GEMMs was probed"
    assert "oneDNN refuses torch._scaled_mm (could not create a primitive descriptor" in capsys.readouterr().err
    compiled = _fp8_linear_grads(x, w, compiled=True)  # the answer holds inside one compiled graph too

    # Bitwise: PyTorch's CPU _scaled_mm without oneDNN (every CPU without AMX, this test's CI) is the same
    # fp32 scale-matmul-round as the reference, op for op. With AMX, its oneDNN kernel accumulates in
    # another order: fp32 sums of 64 products, bounded by 64 x 2^-24 of their magnitudes, under the
    # outputs' own rounding (1e-5 relative).
    amx = torch.cpu._is_amx_tile_supported()
    for a, b, c in zip(runs, refused, compiled):
        assert torch.equal(b, c)
        assert torch.allclose(a, b, rtol=1e-5, atol=0) if amx else torch.equal(a, b)


def test_fp8_and_bf16_run_with_onednn_held_to_avx2():
    """In a fresh process with ONEDNN_MAX_CPU_ISA=AVX2: FP8 GEMMs forward and backward, and the bf16 choice.
    On a CPU listing avx512_fp16/amx this failed with oneDNN's refusal before the probe."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    script = textwrap.dedent("""
        import torch
        from nanochat_unsloth.model import fp8 as F8
        from nanochat_unsloth.model import cpu_probe
        from nanochat_unsloth.train import bf16_gemm
        from nanochat_unsloth.train.config import TrainConfig
        from nanochat_unsloth.train.resolve import resolve
        g = torch.Generator().manual_seed(0)
        x = torch.randn(32, 64, generator=g).requires_grad_()
        w = torch.randn(48, 64, generator=g).requires_grad_()
        y = F8.fp8_matmul(x, w)
        y.square().sum().backward()
        x8, x_inv = F8.quantize_tensorwise(x.detach(), F8.E4M3)
        w8, w_inv = F8.quantize_tensorwise(w.detach(), F8.E4M3)
        assert torch.equal(y, F8._scaled_mm_reference(x8, x_inv, w8.t(), w_inv, torch.float32)), "forward"
        assert x.grad is not None and w.grad is not None and bool(torch.isfinite(w.grad).all())
        bf16_gemm.configure_cpu_bf16(resolve(TrainConfig(), "cpu").cpu_bf16)
        print(cpu_probe.bf16_summary(bf16_gemm.cpu_math().name))
        print("fp8 probe:", sorted(str(v) for v in F8._CPU_SCALED_MM.values()))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "cpu bf16 GEMMs:" in out.stdout
    if "avx512_fp16" in flags or " amx" in flags:  # here PyTorch asks oneDNN, which refuses under AVX2
        assert "fp8 probe: ['False'" in out.stdout, out.stdout
