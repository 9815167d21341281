"""A tiny GPT for CPU tests of the kernel seam, memory modes and FP8: the model, a batch, loss and grads."""

from __future__ import annotations

import torch

from nanochat_unsloth.model.build import ModelOptions, build_model
from nanochat_unsloth.model.gpt import GPT, GPTConfig

TINY = GPTConfig(sequence_len=16, vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)


def build_tiny(kernels="torch", memory="fast", seed=0, config=TINY, weight_std=0.3, **options) -> GPT:
    """nanochat's init, then every weight redrawn from N(0, weight_std): init zeroes lm_head and the
    c_proj's, which would leave those gradients trivial."""
    model = build_model(config, ModelOptions(kernels=kernels, memory=memory, **options), "cpu", seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * weight_std)
    return model


def tiny_batch(config=TINY, B=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, config.vocab_size, (B, config.sequence_len), generator=g)
    y = torch.randint(0, config.vocab_size, (B, config.sequence_len), generator=g)
    y[0, :5] = -1  # ignored targets
    return x, y


def loss_and_grads(model, x, y):
    model.zero_grad(set_to_none=True)
    loss = model(x, y)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def assert_same_step(loss, grads, loss_ref, grads_ref):
    """`loss_and_grads` of two models equal bit for bit: the loss and every parameter's gradient."""
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=0)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=0, atol=0, msg=name)
