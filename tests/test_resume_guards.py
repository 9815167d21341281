"""What a --resume may change: the settings that change the step math are refused in one line naming the
flag (or --force); the speed and memory settings, and the `auto`s another machine resolves differently, go
on with a one-line notice naming what changed."""

from __future__ import annotations

import pytest

from nanochat_unsloth.checkpoint.meta import RunMeta
from nanochat_unsloth.checkpoint.resume import check_resume_compatible
from nanochat_unsloth.common import UserError
from nanochat_unsloth.train.config import TrainConfig

pytestmark = pytest.mark.usefixtures("fresh_notices")


def meta_of(resolved=None, **config) -> RunMeta:
    return RunMeta(train_config=TrainConfig(**config).to_dict(), resolved=resolved)


@pytest.mark.parametrize("was, now", [(False, True), (True, False)])
def test_turning_fp8_on_or_off_is_refused_unless_forced(was, now):
    """FP8 GEMMs round to 3 mantissa bits, not bf16's 7: the step math changes beyond bf16 rounding."""
    meta = meta_of(fp8=was)
    with pytest.raises(UserError, match=rf"--fp8={was} \(now {now}\).*--force"):
        check_resume_compatible(meta, TrainConfig(fp8=now))
    check_resume_compatible(meta, TrainConfig(fp8=now, force=True))
    check_resume_compatible(meta, TrainConfig(fp8=was))


def test_speed_and_memory_changes_resume_with_one_notice_naming_each(capsys):
    meta = meta_of(kernels="fused", memory="fast", cuda_graphs="off")
    check_resume_compatible(meta, TrainConfig(kernels="torch", memory="lean", cuda_graphs="off"))
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "--kernels fused -> torch" in err and "--memory fast -> lean" in err and "cuda_graphs" not in err


def test_an_auto_this_machine_resolves_otherwise_is_noticed_from_the_recorded_choice(capsys):
    """--compile auto on the checkpoint's GPU compiled block by block; here (a CPU) nothing compiles: the flags
    agree, the runs do not."""
    was = {"kernels": "fused", "compile": "blocks", "cpu_bf16": "native"}
    now = {"kernels": "torch", "compile": "none", "cpu_bf16": "native"}
    check_resume_compatible(meta_of(resolved=was), TrainConfig(), resolved=now)
    err = capsys.readouterr().err
    assert "--kernels fused -> torch" in err and "--compile blocks -> none" in err and "cpu_bf16" not in err


def test_no_notice_when_nothing_changed_or_an_old_checkpoint_has_no_record(capsys):
    resolved = {"kernels": "torch", "compile": "none"}
    check_resume_compatible(meta_of(resolved=resolved), TrainConfig(), resolved=resolved)
    old = TrainConfig().to_dict()
    old["kernels"] = "unsloth"  # the fused set's former name, in checkpoints of before 2026-11-28
    check_resume_compatible(RunMeta(train_config=old), TrainConfig(kernels="fused"), resolved=resolved)
    assert capsys.readouterr().err == ""


def test_the_loop_notices_what_its_resume_runs_otherwise(tmp_path):
    """End to end: the loop hands its resolved `auto`s to the resume check. The checkpoint's record is edited
    to what a GPU would have resolved; this CPU resolves kernels and compile otherwise, and --memory changes."""
    import contextlib
    import io
    import json

    from nanochat_unsloth.common import EXIT_STOPPED, run_main
    from nanochat_unsloth.train import __main__ as train_main

    from train_fixtures import TINY_TRAIN_ARGS, make_train_base_dir

    base = make_train_base_dir(tmp_path, train_tokens=2_000, val_tokens=2_000, shard_tokens=1_000)
    args = [a for a in TINY_TRAIN_ARGS if a not in ("--kernels", "torch")]  # kernels auto: torch on a CPU
    args += ["--base-dir", str(base), "--device_type", "cpu", "--num_iterations", "3", "--model_tag", "moved"]

    def run(argv):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            return run_main(train_main.main, argv), err.getvalue()

    code, err = run(args + ["--stop_after", "1"])
    assert code == EXIT_STOPPED, err[-2000:]
    meta_path = base / "runs" / "moved" / "step_000001" / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["resolved"]["kernels"] == "torch" and meta["resolved"]["compile"] == "none"
    meta["resolved"].update(kernels="fused", compile="blocks")
    meta_path.write_text(json.dumps(meta))
    code, err = run(args + ["--resume", "auto", "--memory", "selective"])
    assert code == 0, err[-2000:]
    line, = [line for line in err.splitlines() if "--resume changes" in line]
    for change in ("--kernels fused -> torch", "--memory fast -> selective", "--compile blocks -> none"):
        assert change in line, line


@pytest.mark.parametrize("was, now", [("muon", "adamw8bit"), ("adamw8bit", "muon")])
def test_another_optimizer_is_refused_in_one_line_even_with_force(tmp_path, capsys, was, now):
    """Muon's momentum and AdamW's moments of [lm_head, wte] cannot become one AdamW's moments of everything, nor
    the reverse: --force may override a setting, not load a state into an optimizer it does not fit. Before
    2026-12-06 the unsharded layout (one process, DDP) got that far and stopped in torch's load_state_dict with
    a traceback."""
    from nanochat_unsloth.common import EXIT_USER_ERROR

    from run_helpers import train_cli
    from train_fixtures import make_train_base_dir

    base = make_train_base_dir(tmp_path, train_tokens=2_000, val_tokens=2_000, shard_tokens=1_000)
    assert train_cli(base, "--num-iterations", "2", "--optimizer", was) == 0
    capsys.readouterr()
    code = train_cli(base, "--num-iterations", "3", "--resume", "auto", "--force", "--optimizer", now)
    err = capsys.readouterr().err.strip()
    # (on a CPU, adamw8bit's build says first, in its own line, that it falls back to torch AdamW)
    assert code == EXIT_USER_ERROR and "Traceback" not in err, err
    line = err.splitlines()[-1]
    assert line.startswith("error: cannot resume") and f"--optimizer {was}" in line and f"--optimizer {now}" in line, err
