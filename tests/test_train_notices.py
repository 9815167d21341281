"""What a nanochat user is told: the data a horizon needs against what the shards hold (and a refusal instead
of repeating it), a finished run that is resumed, an export of an unfinished run, a mistyped flag; and
nanochat's config file and --device_type."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch

from nanochat_unsloth.common import EXIT_STOPPED, UserError, normalize_flags, run_main
from nanochat_unsloth.convert import cli as convert_cli
from nanochat_unsloth.eval import cli as eval_cli
from nanochat_unsloth.train import __main__ as train_main
from nanochat_unsloth.train.config import parse_train_args
from nanochat_unsloth.train.device import resolve_device_type

from train_fixtures import TINY_TRAIN_ARGS, make_train_base_dir

TRAIN_TOKENS = 2_000  # 30 windows of 2 x 32 + 1 tokens: 15 steps of the tiny batch (2 windows a step) per pass


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_train_base_dir(tmp_path_factory.mktemp("notices"), train_tokens=TRAIN_TOKENS, val_tokens=2_000,
                               shard_tokens=1_000)


def run(main, argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_main(main, argv)
    return code, out.getvalue(), err.getvalue()


def test_repeating_data_is_announced_refusable_and_convert_names_an_unfinished_step(base):
    args = TINY_TRAIN_ARGS + ["--base-dir", str(base), "--num_iterations", "40", "--model_tag", "repeats"]
    passes = 40 * 2 / (TRAIN_TOKENS // 65)

    code, out, err = run(train_main.main, args + ["--no_repeat_data"])
    assert code == 2 and err.count("\n") == 1, err
    assert "--no_repeat_data" in err and f"{passes:.2f} passes" in err and f"hold {TRAIN_TOKENS:,}" in err
    assert "step 00000/" not in out, "refused before the first step"

    code, out, err = run(train_main.main, args + ["--stop_after", "2"])
    assert code == EXIT_STOPPED, err[-2000:]
    assert (f"data: the horizon needs {40 * 128:,} tokens (40 steps x 128); the train shards hold {TRAIN_TOKENS:,}: "
            f"the data will repeat, {passes:.2f} passes") in out

    code, out, err = run(convert_cli.main, [str(base / "runs" / "repeats")])
    assert code == 0, err
    assert "(step 2 of 40)" in out
    assert "warning: step 2 is not the run's final step (40)" in out


def test_a_finished_run_resumed_is_already_complete_and_changes_nothing(base, tmp_path):
    # nanochat's configurator: a Python file of assignments, then flags that override it
    cfg = tmp_path / "tiny.py"
    cfg.write_text("depth = 2\nmax_seq_len = 32\ndevice_batch_size = 2\ntotal_batch_size = 2 * 64\n"
                   "num_iterations = 5\neval_every = -1\neval_tokens = 512\nsample_every = -1\nkernels = 'torch'\n")
    argv = [str(cfg), "--num_iterations=2", "--device_type=cpu", "--base-dir", str(base), "--model_tag", "done"]
    code, out, err = run(train_main.main, argv)
    assert code == 0, err[-2000:]
    assert "batch: 2 x 32 x 1 procs x 2 accum = 128 tokens/step; 2 steps" in out  # the file, then the flag
    assert f"train shards hold {TRAIN_TOKENS:,}: {100 * 2 * 2 / (TRAIN_TOKENS // 65):.1f}% of one pass" in out

    run_dir = base / "runs" / "done"
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run_dir.rglob("*") if p.is_file()}
    code, out, err = run(train_main.main, argv + ["--resume", "auto"])
    assert code == 0, err[-2000:]
    assert "the run is already complete (step 2 of 2); nothing to do" in out
    assert "val bpb" not in out and "step 00001/" not in out, "nothing evaluated or trained again"
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run_dir.rglob("*") if p.is_file()}
    assert after == before, "no file written, moved or touched"


@pytest.mark.parametrize("main, argv, hint", [
    (train_main.main, ["--num_iteration=5"], "did you mean --num-iterations?"),
    (train_main.main, ["--num-iter", "5"], "did you mean --num-iterations?"),  # no silent prefix matching
    (train_main.main, ["--depth=x"], "--depth: invalid int value"),
    # nanochat's launch line `-m scripts.base_train -- --depth=20` run without a launcher (which drops the "--")
    (train_main.main, ["--", "--depth=4", "--run=x"], "drop the bare '--'"),
    (train_main.main, ["--", "--depth=4"], "drop the bare '--'"),
    (convert_cli.main, ["run", "--with-optimm"], "did you mean --with-optim?"),
    (eval_cli.main, ["run", "--split_token=5"], "did you mean --split-tokens?"),
])
def test_a_mistyped_flag_is_one_line_naming_the_closest(main, argv, hint):
    code, out, err = run(main, argv)
    assert code == 2 and err.count("\n") == 1 and hint in err, err
    assert out == ""


def test_config_file_mistakes_and_device_type_are_refused_in_one_line(tmp_path):
    cfg = tmp_path / "bad.py"
    cfg.write_text("dept = 4\n")
    with pytest.raises(UserError, match="dept is not a training setting; did you mean depth"):
        parse_train_args([str(cfg)])
    cfg.write_text("depth = '4'\n")
    with pytest.raises(UserError, match="depth = '4' is a str; --depth takes an int"):
        parse_train_args([str(cfg)])
    with pytest.raises(UserError, match="config file not found"):
        parse_train_args([str(tmp_path / "missing.py")])
    with pytest.raises(UserError, match="--device_type 'gpu' is not one of"):
        parse_train_args(["--device-type", "gpu"]).validate()
    if torch.cuda.is_available():
        assert resolve_device_type("cuda") == "cuda"
    else:
        with pytest.raises(UserError, match="--device_type cuda: no CUDA device"):
            resolve_device_type("cuda")
    assert resolve_device_type("cpu") == "cpu"


def test_no_repeat_data_refuses_a_force_resume_that_reads_trained_tokens_again(base):
    """--force on a smaller --total_batch_size resumes at the same step further back in the data: with
    --no_repeat_data that is a repeat, refused, though the new horizon alone fits one pass."""
    args = TINY_TRAIN_ARGS + ["--base-dir", str(base), "--model_tag", "relayout", "--no_repeat_data"]
    code, out, err = run(train_main.main, args + ["--num_iterations", "6", "--total_batch_size", "256",
                                                  "--stop_after", "3"])
    assert code == EXIT_STOPPED, err[-2000:]  # 3 steps of 4 windows: windows [0, 12) of 30
    code, out, err = run(train_main.main, args + ["--num_iterations", "10", "--resume", "auto", "--force"])
    assert code == 2 and err.count("\n") == 1, err[-2000:]  # step 3 of 2 windows would read window 6 again
    assert "--no_repeat_data" in err and "read a second time" in err
    assert "step 00003/" not in out


def test_a_flag_before_the_config_file_that_the_file_also_sets_is_refused(tmp_path):
    """nanochat's configurator applies its arguments in order, so in `--depth=4 cfg.py` the file's depth wins;
    here flags override the file wherever they stand. The one case where the two differ is refused."""
    cfg = tmp_path / "cfg.py"
    cfg.write_text("depth = 6\n")
    with pytest.raises(UserError, match=r"--depth comes before .*cfg\.py, which sets depth too"):
        parse_train_args(normalize_flags(["--depth=4", str(cfg)]))
    assert parse_train_args(normalize_flags([str(cfg), "--depth=4"])).depth == 4  # after the file: the flag
    before = parse_train_args(normalize_flags(["--max_seq_len=64", str(cfg)]))  # a setting the file leaves alone
    assert (before.depth, before.max_seq_len) == (6, 64)


def test_eval_tokens_beyond_the_val_split_is_announced(base):
    """The val split (2,000 tokens) holds 30 windows of 2 x 32 + 1: --eval_tokens 4,096 (64 windows) scores
    those 30 once, and says so; 512 (8 windows) says nothing."""
    args = TINY_TRAIN_ARGS + ["--base-dir", str(base), "--num_iterations", "1", "--eval_every", "1", "--force"]
    for eval_tokens, told in (("4096", True), ("512", False)):
        code, out, err = run(train_main.main, args + ["--eval_tokens", eval_tokens, "--model_tag", f"val{eval_tokens}"])
        assert code == 0, err[-2000:]
        line = ("notice: --eval_tokens 4,096 asks for 64 val windows of --device_batch_size 2 x --max_seq_len 32; "
                "the val split holds 30, so each evaluation scores each of them once")
        assert (line in out) == told, out[-3000:]
