"""The step line's progress and training time, as nanochat b399e43's base_train computes them: for the step
just taken, `s` (0-based), `pct_done = 100 * s / num_iterations`, and its dt joins the training time only
when `s > 10` (the first 11 steps compile and warm up)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from nanochat_unsloth.checkpoint.train_state import TrainState
from nanochat_unsloth.train import loop


def _fake_run(num_iterations: int, lines: list[str]):
    s = SimpleNamespace(world_size=1, device_type="cpu", run_dir=Path("."), print0=lines.append,
                        log_jsonl=lambda path, record: None, accelerator=SimpleNamespace(log=lambda *a, **k: None))
    t = SimpleNamespace(train_state=TrainState(), num_iterations=num_iterations, flops_per_token=1)
    return SimpleNamespace(cfg=SimpleNamespace(total_batch_size=8), s=s, t=t, start_step=0, total_time=0.0)


def test_step_line_percent_and_training_time_are_nanochats():
    lines: list[str] = []
    run = _fake_run(20, lines)
    out = SimpleNamespace(global_loss=1.0, lrm=1.0, global_grad_norm=None)
    for s in range(13):  # the loop: the step is taken, counted, then logged with `step` steps complete
        run.t.train_state.step += 1
        loop._log_step(run, run.t.train_state.step, out, dt=60.0)
    assert lines[0].startswith("step 00000/00020 (0.00%)"), lines[0]
    assert lines[12].startswith("step 00012/00020 (60.00%)"), lines[12]
    assert run.total_time == 2 * 60.0, "steps 11 and 12 only: nanochat adds dt when s > 10"  # exact: sums of 60.0
