"""nanochat's GPT (b399e43), rewritten: same parameter names, shapes, init draws and forward math.

- token embedding, no positional embedding: rotary embeddings on q and k instead
- weightless RMSNorm after the embedding, before each sub-block and before the lm_head
- QK norm (after rotary), GQA when n_kv_head < n_head
- ReLU² MLP, no biases anywhere, untied embedding and lm_head
- logits softcapped at 15 * tanh(x / 15); the loss in fp32

A state_dict of this model loads into nanochat's GPT with strict=True and vice versa. The norm,
rotary, attention, loss and block-GEMM ops come from a kernel set (`ops.py`, the `ops` attribute), so faster
kernels plug in without touching this file; how each block runs (plain, or checkpointed in `--memory lean`)
comes from `memory.py`, and `--memory selective` makes the MLP recompute itself in backward. `build.py`
assembles a training model (kernels, memory mode, FP8) in one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from nanochat_unsloth.model import fp8
from nanochat_unsloth.model.ops import TORCH_KERNELS, Kernels, softcapped_logits
from nanochat_unsloth.model.memory import block_memory_modes, checkpoint_recomputed, run_block

SOFTCAP = 15.0
ROTARY_BASE = 10000
ROTARY_OVERCOMPUTE = 10  # rotary tables cover 10x sequence_len, as nanochat's do
PROMISED_FLOPS_H100 = 989e12  # bf16 dense: the basis of nanochat's MFU figure (with `GPT.estimate_flops`)


@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (GQA when fewer than n_head)
    n_embd: int = 768

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_depth(cls, depth: int, max_seq_len: int, vocab_size: int) -> "GPTConfig":
        """nanochat's depth -> shape rule: width 64 per layer, heads of (at most) 128 dims, no GQA."""
        n_embd = 64 * depth
        n_head = max(1, math.ceil(n_embd / 128))
        return cls(sequence_len=max_seq_len, vocab_size=vocab_size, n_layer=depth,
                   n_head=n_head, n_kv_head=n_head, n_embd=n_embd)


def rotary_tables(seq_len: int, head_dim: int, base: int = ROTARY_BASE,
                  device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (1, seq_len, 1, head_dim/2) in bf16, ready to broadcast over (B, T, H, D/2)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    # computed in fp32, stored in bf16 like nanochat (the model asserts it)
    return freqs.cos().bfloat16()[None, :, None, :], freqs.sin().bfloat16()[None, :, None, :]


# -----------------------------------------------------------------------------
# The blocks


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, ops: Kernels):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        assert config.n_head % config.n_kv_head == 0, "n_head must be a multiple of n_kv_head"
        self.ops = ops
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        # registration order = init draw order (see GPT.init_weights): keep q, k, v, proj
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, T, C = x.shape
        q = self.ops.linear(x, self.c_q).view(B, T, self.n_head, self.head_dim)
        k = self.ops.linear(x, self.c_k).view(B, T, self.n_kv_head, self.head_dim)
        v = self.ops.linear(x, self.c_v).view(B, T, self.n_kv_head, self.head_dim)
        # rotary first, then QK norm (nanochat's order)
        q = self.ops.rotary_norm(q, cos, sin)
        k = self.ops.rotary_norm(k, cos, sin)
        # heads become a batch dim: (B, T, H, D) -> (B, H, T, D)
        y = self.ops.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                               self.n_head != self.n_kv_head)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.ops.linear(y, self.c_proj)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig, ops: Kernels):
        super().__init__()
        self.ops = ops
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)
        self.recompute = False  # --memory selective: keep only the input for backward (memory.py)

    def forward(self, x: Tensor) -> Tensor:
        if self.recompute and self.training and torch.is_grad_enabled():
            # The 4*n_embd-wide hidden activation is the largest tensor a block would keep; backward
            # re-runs c_fc and ReLU^2 instead (under torch.compile only what backward needs is re-run).
            return checkpoint_recomputed(self._mlp, x)
        return self._mlp(x)

    def _mlp(self, x: Tensor) -> Tensor:
        h = F.relu(self.ops.linear(x, self.c_fc)).square()
        return self.ops.linear(h, self.c_proj)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, ops: Kernels):
        super().__init__()
        self.ops = ops
        self.attn = CausalSelfAttention(config, ops)
        self.mlp = MLP(config, ops)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.ops.rms_norm(x), cos, sin)
        x = x + self.mlp(self.ops.rms_norm(x))
        return x


# -----------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, ops: Kernels = TORCH_KERNELS, memory: str = "fast",
                 lean_blocks: int = -1, lean_checkpoint: str = "torch"):
        super().__init__()
        self.config = config
        self.ops = ops
        # "lean" / "selective": the first `lean_blocks` blocks (all by default) are checkpointed while
        # training / recompute their MLP in backward
        self.block_memory = block_memory_modes(memory, lean_blocks, config.n_layer)
        self.memory = memory
        self.lean_checkpoint = lean_checkpoint  # how lean blocks are checkpointed (memory.lean_checkpoint_impl)
        self.compiled_blocks: list | None = None  # compiled twins of the blocks, see compile.compile_for_training
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, self.ops) for _ in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        for block, mode in zip(self.transformer.h, self.block_memory):
            block.mlp.recompute = mode == "selective"
        # Placeholder tables so that construction works under torch.device("meta"); init_weights()
        # computes the real ones. Non-persistent: derived data, not in the state_dict (as in nanochat).
        self.rotary_seq_len = ROTARY_OVERCOMPUTE * config.sequence_len
        cos, sin = rotary_tables(self.rotary_seq_len, config.head_dim, device=self.get_device())
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    # -- initialisation ------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self) -> None:
        """nanochat's init. Run after `to_empty(device=...)` when the model was built on meta.

        `nn.Module.apply` visits children before their parent, in registration order, so the normal
        draws happen in the order wte, then per block c_q, c_k, c_v, attn.c_proj, c_fc, mlp.c_proj, then
        lm_head: the same order as nanochat, hence the same weights for the same torch.manual_seed.
        lm_head and the c_proj's draw too before being zeroed, only to keep that order.
        """
        self.apply(self._init_module)
        nn.init.zeros_(self.lm_head.weight)
        for block in self.transformer.h:
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        for scaling in fp8.delayed_scalings(self):  # --fp8: the histories start over with the weights
            scaling.reset()
        self.cos, self.sin = rotary_tables(self.rotary_seq_len, self.config.head_dim, device=self.get_device())
        if self.get_device().type == "cuda":
            # bf16 embedding: the optimizer copes and it halves the table and its activations
            self.transformer.wte.to(dtype=torch.bfloat16)

    @staticmethod
    def _init_module(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            # std = 1/sqrt(fan_in) * min(1, sqrt(fan_out/fan_in))  (https://arxiv.org/abs/2310.17813)
            fan_out, fan_in = module.weight.shape
            std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=1.0)

    # -- bookkeeping -----------------------------------------------------------------

    def get_device(self) -> torch.device:
        return self.transformer.wte.weight.device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self) -> int:
        """FLOPs per token: 6 per non-embedding weight plus attention's 12*l*h*q*t (PaLM, arXiv 2204.02311)."""
        c = self.config
        nparams = self.num_params() - self.transformer.wte.weight.numel()
        return 6 * nparams + 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len

    # -- forward -------------------------------------------------------------------

    def forward(self, idx: Tensor, targets: Tensor | None = None, loss_reduction: str = "mean") -> Tensor:
        """Loss (fp32) when targets are given, else softcapped logits (B, T, vocab).

        Targets of -1 are ignored. loss_reduction "none" gives per-token losses shaped like targets
        (nanochat returns them flat: `.view(-1)` gives its layout).
        """
        B, T = idx.shape
        assert T <= self.cos.size(1), f"sequence length {T} exceeds the rotary tables ({self.cos.size(1)})"
        assert self.cos.dtype == torch.bfloat16, "rotary tables must stay bf16 (was the model cast with .to(dtype)?)"
        cos, sin = self.cos[:, :T], self.sin[:, :T]

        x = self.ops.rms_norm(self.transformer.wte(idx))
        twins = self.compiled_blocks
        for i, block in enumerate(self.transformer.h):
            x = run_block(self.block_memory[i], block, x, cos, sin, None if twins is None else twins[i],
                          self.lean_checkpoint)
        x = self.ops.rms_norm(x)

        if targets is None:
            return softcapped_logits(x, self.lm_head.weight, SOFTCAP)
        loss = self.ops.lm_head_loss(x, self.lm_head.weight, targets, SOFTCAP, loss_reduction)
        return loss.view(targets.shape) if loss_reduction == "none" else loss

    @torch.inference_mode()
    def generate(self, tokens: list[int], max_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, seed: int = 42) -> Iterator[int]:
        """Yield up to max_tokens sampled token ids after the prompt `tokens` (batch of one).

        temperature 0 is greedy. No KV cache: each step re-runs the whole sequence, which is fine for
        the short samples printed during training.
        """
        device = self.get_device()
        rng = None
        if temperature > 0:
            rng = torch.Generator(device=device)
            rng.manual_seed(seed)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            # the module is called, not self.forward as in nanochat: wrappers that shard the weights gather them
            # in the module's forward hooks (ZeRO-3 gathers lm_head.weight there: train/deepspeed_zero.py)
            logits = self(ids[:, -self.rotary_seq_len:])[:, -1, :]
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, -float("inf"))
            if temperature > 0:
                probs = F.softmax(logits / temperature, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=rng)
            else:
                next_id = torch.argmax(logits, dim=-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
            yield next_id.item()
