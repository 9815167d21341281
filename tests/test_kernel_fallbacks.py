"""--kernels: which kernel set is built, its fallback to the torch ops without CUDA (one notice), and the
fused set computing what the torch path computes.
"""

from __future__ import annotations

import pytest
import torch

from nanochat_unsloth.model import lm_head_loss as L
from nanochat_unsloth.model import memory as M
from nanochat_unsloth.model import ops as K
from nanochat_unsloth.model.build import get_kernels
from nanochat_unsloth.model.rotary_norm import rotary_norm

from tiny_gpt import build_tiny, loss_and_grads, tiny_batch


pytestmark = pytest.mark.usefixtures("fresh_notices")


def pretend_cuda(monkeypatch):
    """CUDA "available": all the fused set checks before it is built."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_fused_kernels_fall_back_without_cuda_with_one_notice(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert get_kernels("fused") is K.TORCH_KERNELS
    assert get_kernels("unsloth") is K.TORCH_KERNELS
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("notice: --kernels fused") and "CUDA" in err


def test_fused_set_dispatch_when_available(monkeypatch):
    pretend_cuda(monkeypatch)
    ops = get_kernels("fused")
    assert ops.name == "fused" and ops.lm_head_loss == L.ChunkedLMHeadLoss(L.DEFAULT_CHUNK_MB)
    # q's and k's prologue is our kernel (on CUDA tensors); the input norms and attention stay the torch
    # ops (Inductor fuses them inside compiled blocks)
    assert ops.rotary_norm is rotary_norm and ops.rms_norm is K.torch_rms_norm
    x, cos, sin = torch.randn(1, 4, 2, 16), torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8)
    torch.testing.assert_close(ops.rotary_norm(x, cos, sin), K.torch_rotary_norm(x, cos, sin), rtol=0, atol=0)


def test_import_unsloth_module_restores_compile_settings(monkeypatch, tmp_path):
    # a stand-in module that does what `import unsloth` does to the global settings
    (tmp_path / "fake_unsloth_side_effects.py").write_text(
        "import os, torch._dynamo.config as d, torch._inductor.config as i\n"
        "d.suppress_errors = not d.suppress_errors\n"
        "i.fallback_random = not i.fallback_random\n"
        "os.environ['PYTORCH_CUDA_ALLOC_CONF'] = 'garbage'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    before = (dynamo_config.suppress_errors, inductor_config.fallback_random)
    M.import_unsloth_module("fake_unsloth_side_effects")
    assert (dynamo_config.suppress_errors, inductor_config.fallback_random) == before
    import os
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


def test_gpt_with_fused_set_matches_torch_path(monkeypatch):
    ref = build_tiny("torch")
    pretend_cuda(monkeypatch)
    fused = build_tiny("fused", loss_chunk_mb=0.001)  # several chunks at this size
    assert fused.ops.name == "fused" and fused.ops.lm_head_loss.chunk_mb == 0.001
    x, y = tiny_batch()
    loss_ref, g_ref = loss_and_grads(ref, x, y)
    loss, g = loss_and_grads(fused, x, y)
    # The chunked loss's rounding, fp32, through the tiny GPT. Measured on AVX-512 and AVX2
    # (ONEDNN_MAX_CPU_ISA=AVX2): loss equal, per-token losses <= 9.5e-7 absolute (1.3e-7 relative),
    # gradients <= 7.8e-8 absolute; each within 8% of its bound (grads were 1e-4/1e-5, 0.5% used).
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-5, atol=1e-6, msg=name)
    # per-token losses (bits-per-byte evaluation) through the same seam; torch's fp32 default bound
    with torch.no_grad():
        torch.testing.assert_close(fused(x, y, loss_reduction="none"), ref(x, y, loss_reduction="none"),
                                   rtol=1.3e-6, atol=1e-5)
