"""The FP8 MLP's backward glue kernel (model/relu2_fp8.py) against its torch reference in fp8.py.

The kernel computes what the reference computes (dh * 2u is exact in fp32 for 16-bit inputs, rounded once to
dh's dtype; the same fp32 scale multiply, clamp and round-to-nearest-even cast), so the bound is equality, bit
for bit: the e5m2 gradient in both layouts and the amax, at every launch shape.
- On the GPU (skipped without CUDA): random inputs, whose values are rounded, and exactly representable ones.
- Under Triton's CPU interpreter (skipped without Triton and numpy < 2, which it needs): the exactly
  representable inputs only. Triton 3.6's interpreter rounds fp32 -> fp8 half-up and drops the carry into the
  exponent (1950 becomes 1024, not 2048), so there it checks the tiles, masks, ReLU^2's derivative, the clamp
  and the amax, and the GPU checks the rounding.
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


def inputs(device: str, dtype: torch.dtype, data: str, M: int, N: int, g: torch.Generator):
    """(dh, u, history, saturating history). "random": normal values, whose scaled gradient is rounded to
    e5m2. "exact": dh of at most 3 significant bits (e5m2's precision) and u = +-2^j, with a history that
    makes the scale a power of two, so every e5m2 value is exact: rounding plays no part."""
    if data == "random":
        dh = (torch.randn(M, N, device=device, generator=g) * 1e-3).to(dtype)
        u = torch.randn(M, N, device=device, generator=g).to(dtype)
        from nanochat_unsloth.model import fp8 as F8

        amax = F8.row_first_amax(F8.relu2_grad(dh, u))
        return dh, u, amax * F8.MARGIN, amax / 8  # as delayed scaling's margin leaves it; an amax 8x too small
    sign = lambda: torch.randint(0, 2, (M, N), device=device, generator=g) * 2 - 1  # noqa: E731
    mantissa = 1 + torch.randint(0, 4, (M, N), device=device, generator=g) / 4  # 1, 1.25, 1.5, 1.75
    dh = sign() * mantissa * 2.0 ** torch.randint(-14, -8, (M, N), device=device, generator=g)
    u = sign() * 2.0 ** torch.randint(-3, 3, (M, N), device=device, generator=g)
    fmax = torch.finfo(torch.float8_e5m2).max
    # |dr| <= 1.75 * 2^-9 * 2 * 4 = 1.75 * 2^-6 and >= 2^-16: scaled by 2^20 all lie in [16, 28672]
    history, saturating = torch.tensor(fmax / 2.0**20, device=device), torch.tensor(fmax / 2.0**24, device=device)
    return dh.to(dtype), u.to(dtype), history, saturating


def measure(device: str, configs: list, data: str) -> dict:
    """How far the kernel is from the reference at each launch shape in `configs` (None: autotuned), for
    bf16 and fp32 inputs whose shape leaves partial tiles in both directions, with a history that fits
    and one under which some values saturate."""
    from nanochat_unsloth.model import fp8 as F8
    from nanochat_unsloth.model import relu2_fp8 as R

    g = torch.Generator(device=device).manual_seed(0)
    M, N = 200, 136  # 200 = 64 * 3 + 8, 136 = 128 + 8
    result = {}
    for dtype in (torch.bfloat16, torch.float32):
        dh, u, fits, saturates = inputs(device, dtype, data, M, N, g)
        dr = F8.relu2_grad(dh, u)
        true_amax = F8.row_first_amax(dr)
        for name, history in (("fits", fits), ("saturates", saturates)):
            scale = F8.scale_for(history, F8.E5M2)
            ref8, _ = F8.quantize_with_amax(dr, history, F8.E5M2)
            for config in configs:
                g8, g8_t, amax = R.launch(dh, u, scale, config)
                key = f"{data}_{name}_{str(dtype).split('.')[-1]}_{config}"
                result[key] = {
                    "g8_mismatches": int((g8.view(torch.uint8) != ref8.view(torch.uint8)).sum()),
                    "g8_t_mismatches": int((g8_t.view(torch.uint8) != ref8.t().contiguous().view(torch.uint8)).sum()),
                    "g8_t_shape": list(g8_t.shape),
                    "amax": amax.item(), "ref_amax": true_amax.item(),
                    "saturated": int(((dr.float() * scale).abs() > R.E5M2_MAX).sum()),  # clamped to +-max
                    "zeros": int((ref8.float() == 0).sum()),
                }
    return result


def check(result: dict) -> None:
    print(f"\n[relu2_fp8] {result}")
    for key, r in result.items():
        assert r["g8_mismatches"] == 0 and r["g8_t_mismatches"] == 0, key
        assert r["g8_t_shape"] == [136, 200] and r["amax"] == r["ref_amax"] > 0, key
        assert r["zeros"] > 200 * 136 // 3, key  # ReLU^2's derivative zeroed the u <= 0 half
        assert (r["saturated"] > 0) == ("_saturates_" in key), key  # both branches of the clamp ran


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernel_equals_the_reference_on_the_gpu():
    from nanochat_unsloth.model import relu2_fp8 as R

    a = torch.zeros(64, 32, device="cuda", dtype=torch.bfloat16)
    assert R.supported(a, a) and not R.supported(a.t(), a.t()) and not R.supported(a, a.float())
    result = {**measure("cuda", [None, *R.CONFIGS], "random"), **measure("cuda", [None, *R.CONFIGS], "exact")}
    assert len(result) == 8 * (1 + len(R.CONFIGS))
    check(result)
    # through the registered op, as fp8's backward calls it
    dh = torch.randn(256, 128, device="cuda").bfloat16()
    u = torch.randn(256, 128, device="cuda").bfloat16()
    scale = torch.tensor(2.0e4, device="cuda")
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.dim() else torch.equal(a, b)
               for a, b in zip(R.relu2_grad_e5m2(dh, u, scale), R.launch(dh, u, scale, R.CONFIGS[0])))


@pytest.mark.skipif(not interpreter_runs_loops(), reason="needs Triton, and numpy < 2 for its interpreter")
def test_kernel_equals_the_reference_under_the_interpreter():
    from nanochat_unsloth.model import relu2_fp8 as R

    code = ("import json, test_relu2_fp8 as T, nanochat_unsloth.model.relu2_fp8 as R; "
            "print('RESULT ' + json.dumps(T.measure('cpu', list(R.CONFIGS), 'exact')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          cwd=REPO / "tests", env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    assert len(result) == 4 * len(R.CONFIGS)
    check(result)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp8_mlp_backward_with_the_kernel_equals_the_torch_path(monkeypatch):
    """fp8.fp8_linear_relu2 with delayed scaling on the GPU: the kernel's backward gives the torch path's
    gradients and amax history, bit for bit (d20's c_fc shape, 1,024 rows)."""
    from nanochat_unsloth.model import fp8 as F8
    from nanochat_unsloth.model import relu2_fp8 as R

    calls = []
    real_kernel = R.relu2_grad_e5m2
    monkeypatch.setattr(R, "relu2_grad_e5m2", lambda *a: calls.append(1) or real_kernel(*a))
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(1024, 1280, device="cuda", generator=g).bfloat16()
    dh = (torch.randn(1024, 5120, device="cuda", generator=g) * 1e-3).bfloat16()
    results = []
    for use_kernel in (True, False):
        monkeypatch.setattr(R, "supported", (lambda dh, u: True) if use_kernel else (lambda dh, u: False))
        layer = torch.nn.Linear(1280, 5120, bias=False, device="cuda")
        with torch.no_grad():
            layer.weight.copy_(torch.randn(5120, 1280, device="cuda", generator=torch.Generator(
                device="cuda").manual_seed(2)) / 1280**0.5)
        F8.attach_delayed_scaling(layer)
        with torch.no_grad():
            layer.fp8_scaling.x_amax.fill_(4.0)
            layer.fp8_scaling.grad_amax.fill_(1e-3)
        layer.fp8_scaling.active = True
        xg = x.clone().requires_grad_()
        F8.fp8_linear_relu2(xg, layer).backward(dh)
        results.append((xg.grad, layer.weight.grad, layer.fp8_scaling.grad_amax.clone()))
    assert calls == [1]  # the kernel ran in the first pass only
    (gx1, gw1, a1), (gx2, gw2, a2) = results
    assert torch.equal(gx1, gx2) and torch.equal(gw1, gw2) and torch.equal(a1, a2) and a1 > 0
