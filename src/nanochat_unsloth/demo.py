"""`make demo`: the whole pipeline on the built-in demo corpus, start to finish, in a demo base dir.

    demo corpus -> tokenizer -> shards -> loader check -> train -> eval -> convert -> summary

Each stage is the same sub-command a user would type (printed before it runs), so the demo proves the
real path. Every stage is resumable or skips finished work, so re-running the demo is cheap. The model is
nanochat's GPT at depth 4 with a short context: small enough for a couple of CPU cores in a few minutes,
large enough that val bits-per-byte visibly falls.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

from nanochat_unsloth.common import FlagParser, UserError

DEMO_TAG = "demo"


def _stage(title: str, argv: list[str]) -> float:
    """Run one `nanochat-unsloth` sub-command in this process; return its seconds."""
    from nanochat_unsloth.cli import main as cli_main

    print(f"\n==> {title}\n$ nanochat-unsloth {shlex.join(argv)}", flush=True)
    t0 = time.time()
    code = cli_main(argv)
    if code != 0:
        raise SystemExit(f"demo: stage '{title}' failed (exit {code})")
    return time.time() - t0


def main(argv: list[str]) -> int:
    parser = FlagParser(prog="nanochat-unsloth demo", description=__doc__.splitlines()[0])
    parser.add_argument("--base-dir", required=True,
                        help="demo base dir (kept apart from your real nanochat base dir on purpose)")
    parser.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    base = Path(args.base_dir).expanduser().resolve()
    data = base / "base_data"
    on_gpu = torch.cuda.is_available()
    timings: dict[str, float] = {}
    t_start = time.time()

    timings["demo corpus"] = _stage("demo corpus (pydoc topics + stdlib docstrings) as parquet",
                                    ["demo-data", "--out", str(data)])
    if not (base / "tokenizer" / "tokenizer.pkl").exists():
        timings["tokenizer"] = _stage("train the RustBPE tokenizer", [
            "tokenizer", "--data", str(data), "--base-dir", str(base), "--vocab-size", str(args.vocab_size)])
    timings["prep"] = _stage("tokenize into uint16 shards", [
        "prep", "--source", str(data), "--base-dir", str(base), "--workers", str(args.workers),
        "--shard-tokens", "500000"])

    # ---- loader check: the first batch decodes back to text ---------------------------------------------
    from nanochat_unsloth.tokenizer import load_tokenizer
    from nanochat_unsloth.shards.loader import TokenShardLoader

    loader = TokenShardLoader(base / "shards", "train", B=2, T=64)
    x, y = next(loader)
    enc = load_tokenizer(base / "tokenizer")
    print(f"\n==> loader check: batch {tuple(x.shape)} {x.dtype}/{y.dtype}, "
          f"{loader.tokens_per_epoch:,} train tokens; first row decodes to:\n    "
          f"{enc.decode(x[0, :24].tolist())!r}")

    # ---- train ------------------------------------------------------------------------------------------
    seq, batch = (512, 16) if on_gpu else (128, 8)
    train_args = [
        "train", "--base-dir", str(base), "--depth", str(args.depth), "--max_seq_len", str(seq),
        "--device_batch_size", str(batch), "--total_batch_size", str(seq * batch * 2),
        "--num_iterations", str(args.steps), "--eval_every", str(max(1, args.steps // 4)),
        "--eval_tokens", str(seq * batch * 8), "--sample_every", "-1", "--model_tag", DEMO_TAG,
        "--resume", "auto", "--save_every", str(max(1, args.steps // 2)),
    ]
    timings["train"] = _stage("train nanochat's GPT (Muon + AdamW, nanochat's schedules)", train_args)
    run_dir = base / "runs" / DEMO_TAG
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines() if line.strip()]

    # ---- eval and convert -------------------------------------------------------------------------------
    timings["eval"] = _stage("evaluate train/val bits-per-byte as nanochat's base_loss does", [
        "eval", str(run_dir), "--base-dir", str(base), "--split-tokens", str(seq * batch * 8)])
    timings["convert"] = _stage("convert to nanochat's base_checkpoints layout", [
        "convert", str(run_dir), "--model-tag", DEMO_TAG, "--base-dir", str(base), "--force"])

    # ---- summary ----------------------------------------------------------------------------------------
    from nanochat_unsloth.eval.metrics import greedy_completions
    from nanochat_unsloth.model.build import build_model
    from nanochat_unsloth.model.gpt import GPTConfig
    from nanochat_unsloth.checkpoint.store import list_checkpoints, load_meta, load_model_state_dict

    step, step_dir = list_checkpoints(run_dir)[-1]
    meta = load_meta(step_dir)
    model = build_model(GPTConfig(**meta.model_config))
    model.load_state_dict(load_model_state_dict(step_dir))
    model.eval()
    sample = greedy_completions(model, enc, prompts=("The capital of France is",))[0]
    nanochat_dir = base / "base_checkpoints" / DEMO_TAG
    print("\n==> summary")
    print(f"  base dir:          {base}")
    print(f"  shards:            {base / 'shards'}")
    print(f"  run checkpoints:   {run_dir} (newest: step {step})")
    print(f"  nanochat layout:   {nanochat_dir} ({', '.join(sorted(p.name for p in nanochat_dir.iterdir()))})")
    if len(evals) >= 2:
        print(f"  val bpb:           {evals[0]['val_bpb']:.4f} at step {evals[0]['step']} -> "
              f"{evals[-1]['val_bpb']:.4f} at step {evals[-1]['step']}")
    print(f"  sample:            {sample!r}")
    print(f"  time:              {time.time() - t_start:.0f}s  ("
          + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + ")")
    print(f"  next:              NANOCHAT_BASE_DIR={base} python -m scripts.base_loss  (in a nanochat checkout)")
    if len(evals) >= 2 and not evals[-1]["val_bpb"] < evals[0]["val_bpb"]:
        raise UserError("demo: val bpb did not fall during training; something is wrong")
    return 0


if __name__ == "__main__":
    from nanochat_unsloth.common import run_main

    sys.exit(run_main(main, None))
