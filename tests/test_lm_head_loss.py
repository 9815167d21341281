"""The chunked lm_head loss (model/lm_head_loss.py): the torch loss's numbers, one chunk at a time.
"""

from __future__ import annotations

import pytest
import torch

from nanochat_unsloth.model import lm_head_loss as L
from nanochat_unsloth.model import ops as K


pytestmark = pytest.mark.usefixtures("fresh_notices")


@pytest.mark.parametrize("chunk_mb", [2048, 0.0004])  # one chunk; ~3 rows per chunk
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_loss_matches_torch_loss_and_gradients(chunk_mb, reduction):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 11, 32, generator=g, dtype=torch.float64) * 2
    w = torch.randn(96, 32, generator=g, dtype=torch.float64)
    t = torch.randint(0, 96, (4, 11), generator=g)
    t[1, 3:9] = -1
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    ws = [w.clone().requires_grad_(True) for _ in range(2)]
    # the torch loss's math in float64 (torch_lm_head_loss itself rounds the logits to fp32)
    logits = 15.0 * torch.tanh(xs[0] @ ws[0].T / 15.0)
    ref = torch.nn.functional.cross_entropy(logits.view(-1, 96), t.view(-1), ignore_index=-1, reduction=reduction)
    got = L.ChunkedLMHeadLoss(chunk_mb)(xs[1], ws[1], t, 15.0, reduction)
    (ref * 0.37).backward()  # a non-unit upstream gradient, like loss / grad_accum
    (got * 0.37).backward()
    # float64 both ways, summed in other orders (per chunk vs at once). Measured, AVX-512 and AVX2
    # (ONEDNN_MAX_CPU_ISA=AVX2): loss <= 4.2e-16 relative, grads <= 1.6e-15 absolute (<= 5e-5 of these
    # bounds). A chunk lost, counted twice or mis-scaled moves them by whole per-token terms (percent level).
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(ws[1].grad, ws[0].grad, rtol=1e-9, atol=1e-11)
    if chunk_mb != 2048:
        assert L.loss_chunk_rows(44, 96, chunk_mb) < 44  # the multi-chunk path really ran


def test_chunked_loss_none_reduction_and_no_grad():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 5, 16, generator=g), torch.randn(40, 16, generator=g)
    t = torch.randint(0, 40, (2, 5), generator=g)
    t[0, 0] = -1
    # fp32, the two losses' own formulations (chunked logsumexp vs torch's cross_entropy): measured <= 9.5e-7
    # absolute, 2.2e-7 relative per token on AVX-512 and AVX2, <= 5% of torch's fp32 default bound
    # (rtol 1.3e-6, atol 1e-5), stated here. The mean came out equal.
    fp32 = dict(rtol=1.3e-6, atol=1e-5)
    torch.testing.assert_close(L.chunked_lm_head_loss(x, w, t, 15.0, "none"),
                               K.torch_lm_head_loss(x, w, t, 15.0, "none"), **fp32)
    with torch.no_grad():
        torch.testing.assert_close(L.chunked_lm_head_loss(x, w, t, 15.0, "mean"),
                                   K.torch_lm_head_loss(x, w, t, 15.0, "mean"), **fp32)
    with pytest.raises(ValueError, match="reduction"):
        L.chunked_lm_head_loss(x, w, t, 15.0, "max")


def test_chunk_rows_split_evenly():
    assert L.loss_chunk_rows(65536, 65536) == 8192  # d20 B=32: 8 chunks of 8192 rows (2 GiB of logits + grad)
    assert L.loss_chunk_rows(1000, 65536) == 1000
    rows = L.loss_chunk_rows(100, 96, 0.01)
    assert -(-100 // rows) * rows - 100 < -(-100 // rows)  # chunks differ by less than one row each
