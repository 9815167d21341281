"""The GPT: nanochat's names/shapes, meta-device init, init statistics, loss semantics, the kernel seam."""

import math

import pytest
import torch

from nanochat_unsloth import common
from nanochat_unsloth.model.build import ModelOptions, build_model, get_kernels
from nanochat_unsloth.model.gpt import GPT, GPTConfig
from nanochat_unsloth.model.ops import TORCH_KERNELS, torch_apply_rotary

TINY = GPTConfig(sequence_len=16, vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)


def build(config=TINY, seed=0, kernels="torch"):
    return build_model(config, ModelOptions(kernels=kernels), "cpu", seed)


def randomize(model, seed=1):
    # init_weights zeroes lm_head and c_proj; give them values so the forward pass is non-trivial
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def nanochat_names_and_shapes(c: GPTConfig):
    hd = c.n_embd // c.n_head
    out = {"transformer.wte.weight": (c.vocab_size, c.n_embd)}
    for i in range(c.n_layer):
        out[f"transformer.h.{i}.attn.c_q.weight"] = (c.n_head * hd, c.n_embd)
        out[f"transformer.h.{i}.attn.c_k.weight"] = (c.n_kv_head * hd, c.n_embd)
        out[f"transformer.h.{i}.attn.c_v.weight"] = (c.n_kv_head * hd, c.n_embd)
        out[f"transformer.h.{i}.attn.c_proj.weight"] = (c.n_embd, c.n_embd)
        out[f"transformer.h.{i}.mlp.c_fc.weight"] = (4 * c.n_embd, c.n_embd)
        out[f"transformer.h.{i}.mlp.c_proj.weight"] = (c.n_embd, 4 * c.n_embd)
    out["lm_head.weight"] = (c.vocab_size, c.n_embd)
    return out


def test_state_dict_names_and_shapes_match_nanochat():
    model = build()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == nanochat_names_and_shapes(TINY)
    assert list(got) == list(nanochat_names_and_shapes(TINY))  # same order too


def test_rotary_buffers_are_bf16_non_persistent_and_nanochat_convention():
    model = build()
    assert "cos" not in model.state_dict() and "sin" not in model.state_dict()
    hd = TINY.n_embd // TINY.n_head
    assert model.cos.dtype == model.sin.dtype == torch.bfloat16
    assert model.cos.shape == (1, 10 * TINY.sequence_len, 1, hd // 2)
    t, j = 7, 3
    angle = t / (10000 ** (2 * j / hd))
    assert model.cos[0, t, 0, j].item() == pytest.approx(math.cos(angle), abs=1e-2)
    assert model.sin[0, t, 0, j].item() == pytest.approx(math.sin(angle), abs=1e-2)
    # y1 = x1 cos + x2 sin; y2 = -x1 sin + x2 cos
    x = torch.randn(1, 4, 1, 2)
    cos, sin = torch.full((1, 4, 1, 1), 0.6), torch.full((1, 4, 1, 1), 0.8)
    y = torch_apply_rotary(x, cos, sin)
    x1, x2 = x[..., :1], x[..., 1:]
    torch.testing.assert_close(y, torch.cat([x1 * 0.6 + x2 * 0.8, -x1 * 0.8 + x2 * 0.6], -1))


def test_meta_construction_to_empty_init_weights():
    with torch.device("meta"):
        model = GPT(TINY)
    assert model.get_device().type == "meta"
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.get_device().type == "cpu"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(model.cos.float()).all()
    assert model.transformer.wte.weight.dtype == torch.float32  # bf16 only on CUDA


def test_init_statistics_and_determinism():
    c = GPTConfig(sequence_len=16, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    model = build(c, seed=3)
    assert torch.equal(build(c, seed=3).state_dict()["transformer.h.1.attn.c_q.weight"],
                       model.state_dict()["transformer.h.1.attn.c_q.weight"])
    assert (model.lm_head.weight == 0).all()
    for block in model.transformer.h:
        assert (block.attn.c_proj.weight == 0).all() and (block.mlp.c_proj.weight == 0).all()
    assert model.transformer.wte.weight.std().item() == pytest.approx(1.0, rel=0.05)
    for name, expected in [("attn.c_q", 1 / math.sqrt(64)),                 # square
                           ("mlp.c_fc", 1 / math.sqrt(64) * 1.0)]:          # fan_out > fan_in: min(1, .) = 1
        w = model.get_submodule(f"transformer.h.0.{name}").weight
        assert w.std().item() == pytest.approx(expected, rel=0.08)
    c_gqa = GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=4, n_kv_head=1, n_embd=256)
    w = build(c_gqa).transformer.h[0].attn.c_k.weight  # fan_out 64 < fan_in 256
    assert w.std().item() == pytest.approx(1 / math.sqrt(256) * math.sqrt(64 / 256), rel=0.08)


def test_loss_reductions_and_ignore_index():
    model = randomize(build())
    idx = torch.randint(0, TINY.vocab_size, (3, 16))
    targets = torch.randint(0, TINY.vocab_size, (3, 16))
    per_token = model(idx, targets, loss_reduction="none")
    assert per_token.shape == (3, 16) and per_token.dtype == torch.float32
    mean = model(idx, targets)
    # Two reductions of the same fp32 per-token losses (cross_entropy's own vs ours): torch's fp32 default
    # bound (rtol 1.3e-6, atol 1e-5). Measured on AVX-512 and AVX2 (ONEDNN_MAX_CPU_ISA=AVX2): equal, except
    # the masked mean, 8.2e-8 relative (3% of the bound); a token wrongly counted moves a mean by ~1/48.
    torch.testing.assert_close(per_token.mean(), mean)
    torch.testing.assert_close(model(idx, targets, loss_reduction="sum"), per_token.sum())

    masked = targets.clone()
    masked[:, :5] = -1
    per_token_masked = model(idx, masked, loss_reduction="none")
    assert (per_token_masked[:, :5] == 0).all()
    torch.testing.assert_close(per_token_masked[:, 5:], per_token[:, 5:])
    torch.testing.assert_close(model(idx, masked), per_token[:, 5:].mean())


def test_logits_softcapped_and_loss_consistent_with_logits():
    model = randomize(build(), seed=5)
    with torch.no_grad():
        model.lm_head.weight.mul_(100)  # raw logits far beyond 15
    idx = torch.randint(0, TINY.vocab_size, (2, 16))
    logits = model(idx)
    assert logits.shape == (2, 16, TINY.vocab_size)
    assert logits.abs().max() <= 15.0 and logits.abs().max() > 14.0
    targets = torch.randint(0, TINY.vocab_size, (2, 16))
    ce = torch.nn.functional.cross_entropy(logits.float().view(-1, TINY.vocab_size), targets.view(-1))
    torch.testing.assert_close(model(idx, targets), ce)


def test_estimate_flops_formula():
    model = build()
    c = TINY
    nparams = sum(p.numel() for p in model.parameters())
    assert model.num_params() == nparams
    expected = 6 * (nparams - c.vocab_size * c.n_embd) + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * c.sequence_len
    assert model.estimate_flops() == expected


def test_causality():
    model = randomize(build())
    idx = torch.randint(0, TINY.vocab_size, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % TINY.vocab_size
    # Bitwise: positions < 10 see the same values through the same operations (masked scores contribute exact
    # zeros). Measured equal on AVX-512 and AVX2; any leak from the future would show, however small.
    assert torch.equal(model(idx)[:, :10], model(changed)[:, :10])


def test_generate_greedy_and_sampled():
    model = randomize(build())
    greedy = list(model.generate([1, 2, 3], max_tokens=6, temperature=0.0))
    assert len(greedy) == 6 and greedy == list(model.generate([1, 2, 3], max_tokens=6, temperature=0.0))
    ids = torch.tensor([[1, 2, 3]])
    assert greedy[0] == model(ids)[0, -1].argmax().item()
    sampled = list(model.generate([1, 2, 3], max_tokens=6, temperature=1.0, top_k=5, seed=7))
    assert sampled == list(model.generate([1, 2, 3], max_tokens=6, temperature=1.0, top_k=5, seed=7))
    assert all(0 <= t < TINY.vocab_size for t in sampled)


def test_kernels_fused_falls_back_on_cpu_with_notice(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(common, "_NOTICES_SHOWN", set())
    monkeypatch.delenv("RANK", raising=False)
    assert get_kernels("fused") is TORCH_KERNELS
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fused" in err and "torch" in err
    get_kernels("fused")
    assert capsys.readouterr().err == ""  # once per process
    model = build(kernels="fused")
    assert model.ops is TORCH_KERNELS


def test_fused_kernels_need_no_unsloth(monkeypatch):
    """The fused set is ours: on CUDA it is built without importing anything from Unsloth."""
    import builtins
    real_import = builtins.__import__

    def no_unsloth(name, *args, **kwargs):
        if name.startswith("unsloth"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(builtins, "__import__", no_unsloth)
    ops = get_kernels("fused")
    assert ops.name == "fused" and ops.lm_head_loss.chunk_mb == 2048
    assert get_kernels("unsloth") == ops  # the former name, still accepted
    assert get_kernels("fused", loss_chunk_mb=64).lm_head_loss.chunk_mb == 64


def test_unknown_kernels_name():
    with pytest.raises(ValueError, match=r"--kernels.*torch, fused"):
        get_kernels("triton")
    with pytest.raises(ValueError, match=r"--kernels 'auto'.*train/resolve.py decides auto"):
        get_kernels("auto")
    with pytest.raises(ValueError):
        build_model(TINY, ModelOptions(kernels="nope"))
