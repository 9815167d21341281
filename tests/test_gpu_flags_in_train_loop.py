"""The GPU-side flags (--kernels fused, --memory, --optimizer adamw8bit, --fp8) through the training loop on
a CPU: each falls back with at most one notice, trains, resumes exactly, and bad values are refused.
"""

from __future__ import annotations

import json
import math

import pytest

from nanochat_unsloth.cli import normalize_flags
from nanochat_unsloth.common import UserError
from nanochat_unsloth.train.config import parse_train_args

from run_helpers import run_train
from train_fixtures import make_train_base_dir


pytestmark = pytest.mark.usefixtures("fresh_notices")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_train_base_dir(tmp_path_factory.mktemp("fallback_base"))


def test_train_loop_with_every_gpu_flag_falls_back_and_resumes_exactly(base, capsys):
    flags = ["--kernels", "unsloth", "--memory", "lean", "--lean-blocks", "1", "--optimizer", "adamw8bit", "--fp8"]
    # (--kernels unsloth: the fused set's former name, still accepted)
    run_train(base, "--num-iterations", "4", "--model-tag", "straight", *flags)
    captured = capsys.readouterr()
    assert "memory=lean (1 of 2 blocks checkpointed)" in captured.out
    err = captured.err
    notices = [line for line in err.splitlines() if line.startswith("notice:")]
    for flag in ("--kernels fused", "--memory lean", "--optimizer adamw8bit", "--fp8"):
        assert sum(flag in n for n in notices) == 1, (flag, notices)
    assert len(notices) == len(set(notices))  # each at most once
    run_train(base, "--num-iterations", "4", "--model-tag", "resumed", "--stop-after", "2", *flags)
    run_train(base, "--num-iterations", "4", "--model-tag", "resumed", "--resume", "auto", *flags)

    def losses(tag):
        lines = (base / "runs" / tag / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines if line.strip()]

    straight, resumed = losses("straight"), losses("resumed")
    assert len(straight) == 4 and all(math.isfinite(v) for v in straight)
    assert resumed == straight  # AdamW state and the cosine schedule resume exactly


def test_fp8_refuses_rows_that_are_not_a_multiple_of_16(base, monkeypatch):
    from nanochat_unsloth.model import fp8

    monkeypatch.setattr(fp8, "fp8_supported", lambda device: (True, ""))  # as on an H100
    with pytest.raises(UserError, match=r"--fp8 needs --device_batch_size x --max_seq_len .* 1 x 24"):
        run_train(base, "--num-iterations", "1", "--model-tag", "fp8rows", "--fp8", "--device-batch-size", "1",
                  "--max-seq-len", "24", "--total-batch-size", "96")


def test_fp8_trains_through_the_loop_where_supported(base, monkeypatch, capsys):
    """With FP8 "supported" (as on an H100), the loop trains with FP8 block GEMMs: torch._scaled_mm runs
    on the CPU too, slowly, which is fine at this size."""
    from nanochat_unsloth.model import fp8

    monkeypatch.setattr(fp8, "fp8_supported", lambda device: (True, ""))
    calls = []
    real = fp8._scaled_mm
    monkeypatch.setattr(fp8, "_scaled_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    switched = []
    real_start = fp8.start_delayed_scaling
    monkeypatch.setattr(fp8, "start_delayed_scaling", lambda model: switched.append(real_start(model)) or switched[-1])
    # delayed at any size: the tiny batch has 2 x 32 rows
    run_train(base, "--num-iterations", "3", "--model-tag", "fp8loop", "--fp8", "--fp8-scaling", "delayed")
    out = capsys.readouterr().out
    assert "kernels=torch+fp8" in out
    assert len(calls) == 3 * 2 * (2 * 6 * 3)  # steps x micro-steps x (layers x Linears x GEMMs)
    # lm_head and the c_proj's start at zero: step 0's block gradients are all zero, and in step 1 the
    # q/k/v/fc gradients still are (they pass through the still-zero c_proj's): delayed from step 3 on
    assert switched == [False, False, True]
    lines = (base / "runs" / "fp8loop" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(math.isfinite(json.loads(line)["loss"]) for line in lines)


def test_memory_selective_trains_through_the_loop_like_fast(base, capsys):
    run_train(base, "--num-iterations", "2", "--model-tag", "sel_fast")
    run_train(base, "--num-iterations", "2", "--model-tag", "sel", "--memory", "selective", "--lean-blocks", "1")
    assert "memory=selective (1 of 2 blocks recomputing their MLP)" in capsys.readouterr().out
    losses = {tag: [json.loads(line)["loss"] for line in (base / "runs" / tag / "metrics.jsonl").read_text().splitlines()]
              for tag in ("sel_fast", "sel")}
    assert len(losses["sel"]) == 2 and losses["sel"] == losses["sel_fast"]  # the same math, recomputed


def test_config_flags_parse():
    cfg = parse_train_args(normalize_flags(["--memory", "lean", "--optimizer=adamw8bit"]))
    assert (cfg.memory, cfg.optimizer) == ("lean", "adamw8bit")
    assert parse_train_args([]).memory == "fast" and parse_train_args([]).optimizer == "muon"


def test_train_refuses_unknown_memory_and_optimizer(base):
    with pytest.raises(UserError, match="--memory"):
        run_train(base, "--num-iterations", "1", "--model-tag", "bad1", "--memory", "small")
    with pytest.raises(UserError, match="--optimizer"):
        run_train(base, "--num-iterations", "1", "--model-tag", "bad2", "--optimizer", "lion")
    with pytest.raises(UserError, match="--lean_blocks 1 needs --memory lean"):
        run_train(base, "--num-iterations", "1", "--model-tag", "bad3", "--lean-blocks", "1")
