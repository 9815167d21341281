"""Evaluation with nanochat's semantics: bits per byte over batches, and greedy samples of its prompts."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist

from nanochat_unsloth.tokenizer import bos_id

SAMPLE_TOKENS = 16
TERMINAL_TOKENS = ("<|bos|>", "<|assistant_end|>")  # nanochat's Engine.generate_batch stops at these
# nanochat's base_train prompts, sampled greedily for 16 tokens.
SAMPLE_PROMPTS = (
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
)


@torch.no_grad()
def evaluate_bpb(model, batches, steps: int, token_bytes: torch.Tensor) -> float:
    """Sum of per-token nats over the bytes those target tokens stand for, in bits.

    Vocab-size independent: each target token counts as many bytes as its text has; special tokens
    (0 bytes) and ignored targets (< 0) count neither nats nor bytes. Sums are all-reduced over ranks,
    so every rank must call this with the same `steps`.
    """
    device = token_bytes.device
    total_nats = torch.zeros((), dtype=torch.float32, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    batch_iter = iter(batches)
    for _ in range(steps):
        x, y = next(batch_iter)
        per_token = model(x, y, loss_reduction="none").reshape(-1)
        y = y.reshape(-1)
        valid = y >= 0
        nbytes = torch.where(valid, token_bytes[torch.where(valid, y, torch.zeros_like(y))], 0)
        total_nats += (per_token * (nbytes > 0)).sum()
        total_bytes += nbytes.sum()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_bytes, op=dist.ReduceOp.SUM)
    nats, nbytes = total_nats.item(), total_bytes.item()
    return float("inf") if nbytes == 0 else nats / (math.log(2) * nbytes)


@torch.no_grad()
def greedy_completions(model, encoding, prompts=SAMPLE_PROMPTS, max_tokens: int = SAMPLE_TOKENS,
                       style: str = "base_train", autocast=contextlib.nullcontext) -> list[str]:
    """Greedy completions of `prompts` after <|bos|>, nanochat's two ways:

    "base_train" (the training loop's samples): `max_tokens` tokens, decoded with the prompt text and
    without the <|bos|>; "base_loss" (`nanochat-unsloth eval`, as scripts/base_loss.py): stop early at
    <|bos|> / <|assistant_end|>, decoded with the <|bos|>.
    """
    if style not in ("base_train", "base_loss"):
        raise ValueError(f"style {style!r}: base_train or base_loss")
    bos = bos_id(encoding)
    stop = set()
    if style == "base_loss":
        stop = {encoding.encode_single_token(t) for t in TERMINAL_TOKENS if t in encoding.special_tokens_set}
    out = []
    for prompt in prompts:
        tokens = [bos] + encoding.encode_ordinary(prompt)
        generated = []
        with autocast():
            for token in model.generate(tokens, max_tokens=max_tokens, temperature=0.0):
                if token in stop:
                    break
                generated.append(token)
        out.append(encoding.decode((tokens if style == "base_loss" else tokens[1:]) + generated))
    return out
