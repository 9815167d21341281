"""`nanochat-unsloth eval CHECKPOINT`: what nanochat's `scripts/base_loss.py` reports, for either layout.

    nanochat-unsloth eval <base>/runs/d20                      # our run: its newest complete step
    nanochat-unsloth eval <base>/base_checkpoints/d20 --step 21400
    nanochat-unsloth eval CHECKPOINT --split-tokens 1048576 --device-batch-size 16

As base_loss: the model is built the way nanochat's build_model builds it (bf16 weights upcast on CPU,
bf16 autocast on CUDA); for train and val, `split_tokens // (device_batch_size * sequence_len)` batches
from the start of the split go through nanochat's bits-per-byte; then the seven prompts are completed
greedily for 16 tokens, stopping early at <|bos|> / <|assistant_end|>, and printed with their <|bos|>.
The batches come from our token shards (`<base>/shards`), which hold the same BOS-prefixed stream
nanochat's loader tokenizes on the fly.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

from nanochat_unsloth.common import FlagParser, UserError, absolute_path

DEFAULT_SPLIT_TOKENS = 20 * 524288  # base_loss's split_tokens


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def build_model(loaded, device: torch.device, kernels: str = "torch"):
    """Our GPT with the checkpoint's weights, in the dtypes nanochat's build_model would give it."""
    from nanochat_unsloth.model.build import ModelOptions, build_model as build
    from nanochat_unsloth.model.gpt import GPTConfig

    # init_weights computes the rotary tables, and on CUDA the bf16 wte nanochat's trainer leaves
    model = build(GPTConfig(**loaded.model_config), ModelOptions(kernels=kernels), device)
    # copy (not assign) into the model's own dtypes: bf16 -> fp32 on CPU, as build_model does
    model.load_state_dict(loaded.state_dict, strict=True)
    model.eval()
    return model


def evaluate_checkpoint(checkpoint: str | Path, split_tokens: int = DEFAULT_SPLIT_TOKENS,
                        device_batch_size: int | None = None, base_dir: str | Path | None = None,
                        shards: str | Path | None = None, device: str = "auto", step: int | None = None,
                        kernels: str = "torch", log=print) -> dict:
    """Train/val bits per byte and the seven greedy samples of a checkpoint (ours or nanochat's)."""
    from nanochat_unsloth.checkpoint.layouts import load_any_checkpoint
    from nanochat_unsloth.tokenizer import load_checked_tokenizer, load_token_bytes
    from nanochat_unsloth.shards.loader import TokenShardLoader
    from nanochat_unsloth.eval.metrics import SAMPLE_PROMPTS, evaluate_bpb, greedy_completions

    loaded = load_any_checkpoint(checkpoint, step)
    base = absolute_path(base_dir) if base_dir else loaded.base_dir
    tok_dir = base / "tokenizer"
    encoding, tokenizer_sha = load_checked_tokenizer(tok_dir, str(loaded.path), loaded.tokenizer_sha256,
                                                     loaded.model_config["vocab_size"])

    B = device_batch_size or loaded.device_batch_size
    T = loaded.model_config["sequence_len"]  # as base_loss: the model's context, whatever it was trained with
    if B < 1 or split_tokens < 1:
        raise UserError(f"--device-batch-size ({B}) and --split-tokens ({split_tokens}) must be at least 1")
    if split_tokens % (B * T):
        raise UserError(f"--split-tokens {split_tokens:,} is not a multiple of --device-batch-size x sequence_len = "
                        f"{B} x {T} = {B * T:,} (base_loss requires it); e.g. --split-tokens "
                        f"{max(1, split_tokens // (B * T)) * B * T}")
    steps = split_tokens // (B * T)

    dev = resolve_device(device)
    model = build_model(loaded, dev, kernels)
    token_bytes = load_token_bytes(tok_dir, dev)
    shards_dir = Path(shards).expanduser() if shards else base / "shards"
    autocast = ((lambda: torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16)) if dev.type == "cuda"
                else contextlib.nullcontext)
    log(f"evaluating {loaded.path} (step {loaded.step}) on {dev}: {steps} batches of {B} x {T} per split")

    result = {"checkpoint": str(loaded.path), "kind": loaded.kind, "step": loaded.step, "device_batch_size": B,
              "max_seq_len": T, "split_tokens": split_tokens, "steps": {}}
    for split in ("train", "val"):
        # the val split's checksums: the number users compare, and a small split; the train split is only read
        # in part (its first batches), so its shards' full checksum would cost more than the evaluation
        loader = TokenShardLoader(shards_dir, split, B, T, device=dev, tokenizer_sha256=tokenizer_sha,
                                  verify_checksums=split == "val")
        # one pass at most: nanochat's loader would cycle, re-reading the same tokens adds nothing
        n = min(steps, loader.num_windows)
        if n < steps:
            log(f"note: the {split} split holds {n} batches of {B} x {T}; evaluating {n * B * T:,} tokens, "
                f"not {split_tokens:,}")
        with autocast():
            bpb = evaluate_bpb(model, loader, n, token_bytes)
        log(f"{split} bpb: {bpb:.4f}")
        result[f"{split}_bpb"] = bpb
        result["steps"][split] = n

    samples = greedy_completions(model, encoding, SAMPLE_PROMPTS, style="base_loss", autocast=autocast)
    for sample in samples:
        log(sample)
    result["samples"] = samples
    return result


def build_parser() -> argparse.ArgumentParser:
    p = FlagParser(
        prog="nanochat-unsloth eval",
        description="Train/val bits per byte and greedy samples of a checkpoint, as nanochat's base_loss.",
    )
    p.add_argument("checkpoint", help="our <base>/runs/<tag> or step_XXXXXX dir, or nanochat's "
                                      "<base>/base_checkpoints/<tag> dir or model_XXXXXX.pt")
    p.add_argument("--step", type=int, help="which step of a run / base_checkpoints dir (default: newest)")
    p.add_argument("--split-tokens", type=int, default=DEFAULT_SPLIT_TOKENS,
                   help=f"tokens per split (default {DEFAULT_SPLIT_TOKENS:,}, as base_loss)")
    p.add_argument("--device-batch-size", type=int, help="sequences per batch (default: the checkpoint's)")
    p.add_argument("--base-dir", help="base dir with tokenizer/ and shards/ (default: the checkpoint's base dir)")
    p.add_argument("--shards", help="token shard dir (default <base>/shards)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N (default auto)")
    p.add_argument("--kernels", default="torch", choices=("torch", "fused", "unsloth"),
                   help="model kernels (default torch; unsloth = fused, its former name)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    evaluate_checkpoint(args.checkpoint, split_tokens=args.split_tokens, device_batch_size=args.device_batch_size,
                        base_dir=args.base_dir, shards=args.shards, device=args.device, step=args.step,
                        kernels=args.kernels)
    return 0


if __name__ == "__main__":
    from nanochat_unsloth.common import run_main

    sys.exit(run_main(main, None))
