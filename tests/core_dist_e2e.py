"""CORE over several processes (run by tests/test_core_metric.py, not collected by pytest).

    ACCELERATE_USE_CPU=true torchrun --standalone --nproc_per_node 2 tests/core_dist_e2e.py BASE OUT

A seeded tiny GPT (the same weights on every rank) scores BASE's eval bundle twice: examples split over
the ranks and summed (DDP), and every rank scoring all of them (FSDP, whose forwards are collective).
Rank 0 writes both results to OUT as JSON.
"""

import json
import sys
from pathlib import Path

from accelerate import Accelerator

from nanochat_unsloth.eval.core import evaluate_core, load_bundle
from nanochat_unsloth.model.build import build_model
from nanochat_unsloth.model.gpt import GPTConfig
from train_fixtures import byte_level_encoding  # tests/ is sys.path[0] when run as a script
from cpu_launch import exit_without_finalization

CONFIG = GPTConfig(sequence_len=64, vocab_size=265, n_layer=2, n_head=1, n_kv_head=1, n_embd=64)


def main(base: str, out: str) -> None:
    accelerator = Accelerator(cpu=True)  # the gloo process group
    model = build_model(CONFIG, device="cpu", seed=7).eval()
    bundle = load_bundle(Path(base))
    enc = byte_level_encoding()
    results = {mode: evaluate_core(model, enc, bundle, "cpu", shard_examples=mode == "sharded")
               for mode in ("sharded", "whole")}
    results["world_size"] = accelerator.num_processes
    if accelerator.is_main_process:
        Path(out).write_text(json.dumps(results))
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the process group
    exit_without_finalization()


if __name__ == "__main__":
    main(*sys.argv[1:])
