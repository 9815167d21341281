"""--fp8_lm_head: the fused set's chunked lm_head loss with its forward GEMM in FP8.

What must hold: one scale per tensor for h and W (so the chunking changes nothing but the fp32 summation
order), one e4m3 x e4m3 GEMM per chunk and nothing else in FP8 (dz and the backward GEMMs stay bf16),
nanochat's bf16 logits without autograd, and the flag refused where it cannot act.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from nanochat_unsloth.checkpoint.resume import RESUME_GUARDED_FIELDS
from nanochat_unsloth.model import fp8 as F8
from nanochat_unsloth.model import lm_head_loss as L
from nanochat_unsloth.model import ops as kernel_ops
from nanochat_unsloth.model.build import ModelOptions, build_model
from nanochat_unsloth.model.lm_head_loss import ChunkedLMHeadLoss, chunked_lm_head_loss, loss_chunk_rows
from nanochat_unsloth.train.config import parse_train_args
from test_fp8 import strict_scaled_mm  # noqa: F401  (a fixture: cuBLASLt's operand rules around the GEMM)
from tiny_gpt import TINY

pytestmark = pytest.mark.usefixtures("fresh_notices")

N, K, V = 64, 32, 48  # rows, n_embd, vocab: every GEMM dimension a multiple of 16, as cuBLASLt needs
SOFTCAP = 15.0
CHUNK_16_ROWS = 16 * 4 * V / 2**20  # --loss_chunk_mb that gives chunks of 16 rows (4 chunks)


def operands(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, K, generator=g)).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(V, K, generator=g) * 0.2).requires_grad_()  # fp32 master weight, as in training
    t = torch.randint(0, V, (N,), generator=g)
    t[5] = -1  # an ignored target
    return x, w, t


def loss_and_grads(fp8_forward, chunk_mb=L.DEFAULT_CHUNK_MB, seed=0):
    x, w, t = operands(seed)
    loss = chunked_lm_head_loss(x, w, t, SOFTCAP, "mean", chunk_mb, fp8_forward)
    loss.backward()
    return loss.detach(), x.grad, w.grad


def test_one_fp8_forward_gemm_per_chunk_and_a_bf16_backward(strict_scaled_mm):
    loss_and_grads(fp8_forward=True, chunk_mb=CHUNK_16_ROWS)
    # 4 chunks of 16 rows: one forward GEMM each, e4m3 x e4m3 with fast accumulation into bf16; the
    # backward's dx and dW GEMMs are torch.mm in bf16 and never reach _scaled_mm
    assert strict_scaled_mm == [(F8.E4M3, F8.E4M3, torch.bfloat16, True)] * 4


def test_the_chunking_changes_only_the_summation_order():
    # One scale per whole tensor: the logits of a row do not depend on which chunk it is in. fp32 summation
    # order alone moves the loss by 1.0e-7 relative (measured), hence the bound; scales per chunk would move
    # each logit by FP8's rounding instead.
    one, dx1, dw1 = loss_and_grads(fp8_forward=True)
    four, dx4, dw4 = loss_and_grads(fp8_forward=True, chunk_mb=CHUNK_16_ROWS)
    assert torch.allclose(one, four, rtol=1e-6, atol=0)
    assert torch.equal(dx1, dx4)  # each row's dx is its own chunk's GEMM: bitwise
    # dW sums the chunks' GEMMs in bf16 (the chunked loss does so with or without FP8): a few bf16 ulps of
    # its largest entry, where per-chunk scales would move entries by FP8's 2^-4
    assert ((dw1 - dw4).abs().max() <= 2.0**-6 * dw1.abs().max()).item()


def test_the_fp8_logits_are_those_of_the_quantized_operands(monkeypatch):
    seen = []
    real = F8.forward_gemm

    def recording(x8, x_inv, w8, w_inv, out_dtype):
        seen.append((x8, x_inv, w8, w_inv))
        return real(x8, x_inv, w8, w_inv, out_dtype)

    monkeypatch.setattr(F8, "forward_gemm", recording)
    x, w, t = operands()
    chunked_lm_head_loss(x, w, t, SOFTCAP, "mean", L.DEFAULT_CHUNK_MB, True).backward()
    (x8, x_inv, w8, w_inv), = seen
    want_x8, want_x_inv = F8.quantize_tensorwise(x.detach(), F8.E4M3)
    want_w8, want_w_inv = F8.quantize_tensorwise(w.detach().to(torch.bfloat16), F8.E4M3)
    assert torch.equal(x8.view(torch.uint8), want_x8.view(torch.uint8)) and torch.equal(x_inv, want_x_inv)
    assert torch.equal(w8.view(torch.uint8), want_w8.view(torch.uint8)) and torch.equal(w_inv, want_w_inv)


def test_close_to_but_not_exactly_the_bf16_loss():
    # Measured on these operands: loss 3.4e-4 relative from the bf16 loss, gradient cosines 0.99995. The
    # bounds leave ~15x room on each (1 - cosine: 5e-5 against 1e-3).
    ref, dx_ref, dw_ref = loss_and_grads(fp8_forward=False)
    got, dx, dw = loss_and_grads(fp8_forward=True)
    rel = ((got - ref).abs() / ref.abs()).item()
    assert 0 < rel < 5e-3
    for a, b in ((dx, dx_ref), (dw, dw_ref)):
        assert F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item() > 0.999


def test_without_autograd_the_logits_are_bf16():
    x, w, t = operands()
    with torch.no_grad():
        got = chunked_lm_head_loss(x, w, t, SOFTCAP, "mean", L.DEFAULT_CHUNK_MB, True)
        want = chunked_lm_head_loss(x, w, t, SOFTCAP, "mean", L.DEFAULT_CHUNK_MB, False)
    assert torch.equal(got, want)


def test_chunk_rows_are_a_multiple_of_16_for_fp8():
    for n in (64, 100 * 16, 8192 * 8):
        rows = loss_chunk_rows(n, 65536, 7.0, multiple=F8.ROW_MULTIPLE)
        assert rows % F8.ROW_MULTIPLE == 0 and rows >= loss_chunk_rows(n, 65536, 7.0)
    assert loss_chunk_rows(100, V, CHUNK_16_ROWS) == 15  # without FP8: an even split, any size


def test_the_converter_sets_it_on_the_fused_loss_only_with_the_flag(monkeypatch, capsys):
    monkeypatch.setattr(F8, "fp8_supported", lambda device: (True, ""))
    # without CUDA the fused set falls back to the torch one, whose loss has no FP8 forward: a notice
    fallback = build_model(TINY, ModelOptions(kernels="fused", fp8=True, fp8_lm_head=True))
    assert fallback.ops.lm_head_loss is kernel_ops.torch_lm_head_loss
    assert "--fp8_lm_head: the fused kernels are not in use" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the fused set on the CPU (its torch paths)
    fused = ModelOptions(kernels="fused", fp8=True)
    on = build_model(TINY, dataclasses.replace(fused, fp8_lm_head=True))
    off = build_model(TINY, fused)
    assert isinstance(on.ops.lm_head_loss, ChunkedLMHeadLoss) and on.ops.lm_head_loss.fp8_forward
    assert not off.ops.lm_head_loss.fp8_forward
    assert on.ops.linear is F8.fp8_linear and all(m.ops is on.ops for m in on.modules() if hasattr(m, "ops"))


@pytest.mark.parametrize("options, message", [
    (ModelOptions(kernels="fused", fp8_lm_head=True), "--fp8_lm_head: needs --fp8"),
    (ModelOptions(kernels="torch", fp8=True, fp8_lm_head=True), "--fp8_lm_head: needs --kernels fused"),
])
def test_refused_where_it_cannot_act(options, message):
    with pytest.raises(ValueError, match=message):
        build_model(TINY, options)


def test_refused_for_a_vocabulary_fp8_gemms_cannot_take():
    odd = dataclasses.replace(TINY, vocab_size=TINY.vocab_size + 1)
    with pytest.raises(ValueError, match=r"--fp8_lm_head: the vocabulary \(.* tokens\) must be a multiple of 16"):
        build_model(odd, ModelOptions(kernels="fused", fp8=True, fp8_lm_head=True))


def test_flag_parses_and_a_resume_keeps_it():
    assert parse_train_args(["--fp8", "--fp8-lm-head"]).fp8_lm_head
    assert not parse_train_args(["--fp8"]).fp8_lm_head
    assert "fp8_lm_head" in RESUME_GUARDED_FIELDS
