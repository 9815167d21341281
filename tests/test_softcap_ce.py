"""The fused loss's Triton kernel (model/softcap_ce.py) against its torch reference's math in float64.

Two runs of the same check: on the GPU (skipped without CUDA), and under Triton's CPU interpreter (skipped
without Triton and numpy < 2, which the interpreter needs). Bounds, with the noise they rest on:
- per-row losses and their sum: 2e-6 of the largest (losses ~25: fp32 steps of 1.2e-7 relative, and a
  tree sum of 9,000 terms; measured 7.5e-8 under the interpreter, <= 9.7e-8 on an H200);
- dz from fp32 logits: 1e-6 of the largest magnitude (measured 1.2e-7 there, 1.6e-7 on the H200);
- dz from bf16 logits: 2^-7 of the largest magnitude, one bf16 rounding of each output (2^-8 relative)
  plus fp32 noise (measured 3.7e-3 there, 1.5e-3 on the H200).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from interpreter import interpreter_runs_loops

REPO = Path(__file__).resolve().parents[1]
BOUNDS = {"loss": 2e-6, "dz_fp32": 1e-6, "dz_bf16": 2**-7}


def measure(device: str) -> dict:
    """Largest errors of the kernel against float64, for fp32 and bf16 logits. The rows cover an ignored
    target, targets at the first and last column, and a vocab that leaves a partial last block."""
    from nanochat_unsloth.model import lm_head_loss as L
    from nanochat_unsloth.model import softcap_ce as S

    g = torch.Generator(device=device).manual_seed(0)
    rows, vocab = 6, S.BLOCK * 2 + 808
    z64 = torch.randn(rows, vocab, device=device, dtype=torch.float64, generator=g) * 20  # many past the cap
    targets = torch.randint(0, vocab, (rows,), device=device, generator=g)
    targets[1], targets[2], targets[3] = -1, 0, vocab - 1
    scale = torch.tensor(0.25, device=device)
    errors = {}
    for dtype in (torch.float32, torch.bfloat16):
        z = z64.to(dtype)
        ref_losses = L._ce_chunk_losses(z.double(), targets, 15.0)
        ref_sum, ref_dz = L._ce_chunk_grad(z.double(), targets, 15.0, scale.double())
        losses = S._launch(z.clone(), targets, 15.0, None, with_grad=False)
        dz = z.clone()
        loss_sum, dz_out = S.ce_chunk_grad(dz, targets, 15.0, scale)
        assert dz_out.data_ptr() == dz.data_ptr()  # written over the logits
        name = "fp32" if dtype == torch.float32 else "bf16"
        errors[f"loss_{name}"] = max(((losses.double() - ref_losses).abs().max() / ref_losses.abs().max()).item(),
                                     abs(loss_sum.item() - ref_sum.item()) / abs(ref_sum.item()))
        errors[f"dz_{name}"] = ((dz.double() - ref_dz).abs().max() / ref_dz.abs().max()).item()
        errors[f"ignored_row_{name}"] = max(losses[1].abs().item(), dz[1].abs().max().item())
    return errors


def check(errors: dict) -> None:
    print(f"\n[softcap_ce] {errors}")
    assert errors["ignored_row_fp32"] == 0 and errors["ignored_row_bf16"] == 0
    assert errors["loss_fp32"] < BOUNDS["loss"] and errors["loss_bf16"] < BOUNDS["loss"]
    assert errors["dz_fp32"] < BOUNDS["dz_fp32"] and errors["dz_bf16"] < BOUNDS["dz_bf16"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernel_matches_fp64_on_the_gpu():
    from nanochat_unsloth.model import softcap_ce as S

    z = torch.zeros(4, 100, device="cuda", dtype=torch.bfloat16)
    t = torch.zeros(4, device="cuda", dtype=torch.long)
    assert S.supported(z, t, 15.0) and not S.supported(z, t, 50.0) and not S.supported(z.t(), t, 15.0)
    check(measure("cuda"))


@pytest.mark.skipif(not interpreter_runs_loops(), reason="needs Triton, and numpy < 2 for its interpreter")
def test_kernel_matches_fp64_under_the_interpreter():
    code = "import json, test_softcap_ce as T; print('ERRORS ' + json.dumps(T.measure('cpu')))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          cwd=REPO / "tests", env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("ERRORS "))
    check(json.loads(line[len("ERRORS "):]))
