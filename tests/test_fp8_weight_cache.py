"""`--fp8_weight_cache`: the block weights quantised once per optimizer step (`fp8.WeightCache`).

The cache changes where a weight's e4m3 copy is made, never its value: a step with it equals a step without it
bit for bit. It must also never be read stale: it is on only inside `optimizer_step`'s micro-steps. FP8 runs on
the CPU here at toy sizes (`fp8_supported` patched), through PyTorch's CPU FP8 GEMM or its reference.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nanochat_unsloth.model import fp8 as F8
from nanochat_unsloth.train import optim
from nanochat_unsloth.common import normalize_flags
from nanochat_unsloth.train.config import parse_train_args
from nanochat_unsloth.train.resolve import model_options, resolve
from nanochat_unsloth.train.step import optimizer_step
from tiny_gpt import TINY, build_tiny, tiny_batch


@pytest.fixture(autouse=True)
def fp8_on_cpu(monkeypatch):
    monkeypatch.setattr(F8, "fp8_supported", lambda device: (True, ""))


def fp8_model(weight_cache: bool):
    # build_tiny redraws every weight (init zeroes lm_head and the c_proj's): every GEMM sees a real gradient
    return build_tiny(fp8=True, fp8_weight_cache=weight_cache)


def caches(model):
    return [m.fp8_weight_cache for m in model.modules() if getattr(m, "fp8_weight_cache", None) is not None]


@pytest.mark.parametrize("memory", ["fast", "selective"])
def test_a_step_with_cached_weights_is_the_step_without_bit_for_bit(monkeypatch, memory):
    """Three optimizer steps of two micro-steps each: the same losses and weights. With the cache each weight is
    quantised once per step (in `cache_weights`) instead of in every micro-step's forward (and, with
    `--memory selective`, again in the MLP's re-run in backward, which reads the cache too), and dX reads the
    cached column-major copy (the GEMM's operand rule checked on every call)."""
    from accelerate import Accelerator

    from test_convert import reset_accelerate

    quantised, real_quantise = [], F8.quantize_tensorwise
    monkeypatch.setattr(F8, "quantize_tensorwise", lambda t, dtype: quantised.append(t) or real_quantise(t, dtype))
    real_mm = F8._scaled_mm

    def column_major_b(a, a_inv, b, b_inv, out_dtype, fast_accum):
        assert b.stride() == (1, b.size(0)), f"mat2 {tuple(b.shape)} not column-major: strides {b.stride()}"
        return real_mm(a, a_inv, b, b_inv, out_dtype, fast_accum)

    monkeypatch.setattr(F8, "_scaled_mm", column_major_b)
    reset_accelerate()
    accelerator = Accelerator(cpu=True)
    runs = {}
    for weight_cache in (False, True):
        model = build_tiny(fp8=True, fp8_weight_cache=weight_cache, memory=memory)
        linears = sum(isinstance(m, nn.Linear) for m in model.transformer.h.modules())
        optimizers = optim.build_optimizers_for("muon", model)
        batches = iter([tiny_batch(B=2, seed=s) for s in range(6)])
        quantised.clear()
        losses = [optimizer_step(accelerator, model, model, optimizers, lambda: next(batches), 2, step, 3).loss.item()
                  for step in range(3)]
        runs[weight_cache] = losses, model.state_dict(), len(quantised) // linears
        assert len(caches(model)) == (linears if weight_cache else 0)
        assert not any(c.active for c in caches(model))  # off again once the step is done
    reset_accelerate()
    (l0, w0, per_step0), (l1, w1, per_step1) = runs[False], runs[True]
    assert l0 == l1 and l0[0] != l0[2]
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    # every micro-step's forward, against once per step; selective re-runs 2 of a block's 6 Linears (the MLP's)
    # in backward: 3 steps x 2 micro-steps x (6 + 2) quantisations per block, 6 Linears per block
    assert (per_step0, per_step1) == (3 * 2 if memory == "fast" else 3 * 2 * (6 + 2) // 6, 3)


def test_the_cache_is_read_only_inside_a_step_and_follows_the_weights():
    """Outside `optimizer_step` a training forward quantises the weight it has now (a stale copy is never
    read); `cache_weights` makes each copy from the weight as it is at that moment."""
    model, plain = fp8_model(True), fp8_model(False)
    x, y = tiny_batch(B=2, seed=7)
    F8.cache_weights(model)
    F8.drop_weight_cache(model)
    with torch.no_grad():  # the weights change after the copies were made, as at an optimizer step
        for a, b in zip(model.parameters(), plain.parameters()):
            a.mul_(0.5)
            b.mul_(0.5)
    assert torch.equal(model(x, y), plain(x, y))
    F8.cache_weights(model)
    for layer in (m for m in model.transformer.h.modules() if isinstance(m, nn.Linear)):
        w8, inv = F8.quantize_tensorwise(layer.weight.detach(), F8.E4M3)
        cache = layer.fp8_weight_cache
        assert cache.active and torch.equal(cache.w8.float(), w8.float()) and torch.equal(cache.inv_scale, inv)
        assert torch.equal(cache.w8_cm.float(), w8.float()) and cache.w8_cm.stride() == (1, w8.size(0))
    storage = [c.w8.data_ptr() for c in caches(model)]
    F8.cache_weights(model)  # rewritten in place: compiled code and CUDA graphs keep reading the same storage
    assert [c.w8.data_ptr() for c in caches(model)] == storage


def test_a_compiled_block_reads_the_cache_in_one_graph_without_recompiling():
    """fullgraph=True raises on a graph break; error_on_recompile on a second compilation, which refreshed
    copies (new values, same tensors) must not cause. The compiled block gives eager's loss and gradients
    (aot_eager: the same ops, no code generation, so bit for bit)."""
    torch._dynamo.reset()
    model, eager = fp8_model(True), fp8_model(True)
    block = torch.compile(model.transformer.h[0], backend="aot_eager", fullgraph=True)
    cos, sin = model.cos[:, :TINY.sequence_len], model.sin[:, :TINY.sequence_len]
    for seed in (3, 4):
        x = torch.randn(2, TINY.sequence_len, TINY.n_embd, generator=torch.Generator().manual_seed(seed))
        outs = []
        for m, fn in ((model, block), (eager, eager.transformer.h[0])):
            F8.cache_weights(m)
            xi = x.clone().requires_grad_()
            with torch._dynamo.config.patch(error_on_recompile=True):
                out = fn(xi, cos, sin)
                out.square().sum().backward()
            F8.drop_weight_cache(m)
            outs.append((out.detach(), xi.grad, [p.grad.clone() for p in m.transformer.h[0].parameters()]))
            with torch.no_grad():  # an optimizer step's worth of change before the next round
                for p in m.transformer.h[0].parameters():
                    p.add_(p.grad.sign() * 1e-2)
                    p.grad = None
        (o1, gx1, gw1), (o2, gx2, gw2) = outs
        assert torch.equal(o1, o2) and torch.equal(gx1, gx2) and all(map(torch.equal, gw1, gw2))
    torch._dynamo.reset()


def test_a_weight_held_as_a_tensor_subclass_is_not_cached():
    """FSDP2 holds a weight as a DTensor shard between forwards: its copy would be of the shard. Such a layer
    quantises its (then whole) weight in its forward, as without the cache."""

    class Shard(torch.Tensor):
        pass

    model = fp8_model(True)
    layer = model.transformer.h[0].mlp.c_fc
    layer.weight = nn.Parameter(torch.Tensor._make_subclass(Shard, layer.weight.detach()))
    F8.cache_weights(model)
    assert not layer.fp8_weight_cache.active
    assert all(c.active for c in caches(model) if c is not layer.fp8_weight_cache)


@pytest.mark.parametrize("flags, cached", [([], False), (["--fp8_weight_cache", "on"], True),
                                           (["--memory", "lean", "--fp8_weight_cache", "on"], True),
                                           (["--fp8_weight_cache", "off"], False)])
def test_the_resolved_choice_reaches_the_model_options(flags, cached):
    """On a CPU (no FP8 GEMMs) `auto` is off; `on` caches whatever else is asked (test_resolve.py has every rule)."""
    cfg = parse_train_args(normalize_flags(["--fp8", *flags]))
    cfg.validate()
    resolved = resolve(cfg, "cpu")
    assert resolved.fp8_weight_cache == ("on" if cached else "off")
    assert model_options(cfg, resolved).fp8_weight_cache is cached


def test_an_unknown_value_is_refused_in_one_line():
    from nanochat_unsloth.common import UserError

    cfg = parse_train_args(normalize_flags(["--fp8_weight_cache", "sometimes"]))
    with pytest.raises(UserError, match="--fp8_weight_cache 'sometimes' is not one of: auto, on, off"):
        cfg.validate()
