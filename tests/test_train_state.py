"""The loop's TrainState: its state dict is meta.json's `step`, `loss_ema` and `fp8_scaling` (the keys checkpoints
have always carried), it comes back exactly through meta.json, and a checkpoint without them (older, or imported
from nanochat) resumes as it always did: the EMA afresh at its step, the FP8 histories left to rebuild."""

from __future__ import annotations

import dataclasses
import json
import types

import torch

from nanochat_unsloth.checkpoint.meta import RunMeta
from nanochat_unsloth.checkpoint.train_state import META_KEYS, TrainState
from nanochat_unsloth.model import fp8
from nanochat_unsloth.model.build import ModelOptions, build_model

from tiny_gpt import TINY

LOSSES = [3.0, 2.75, 2.5, 2.375, 2.25, 2.125]


def run_steps(state: TrainState, losses: list[float]) -> list[float]:
    """What the loop does after each optimizer step: count it, then its loss into the EMA."""
    smoothed = []
    for loss in losses:
        state.step += 1
        smoothed.append(state.record_loss(loss))
    return smoothed


def through_meta_json(state_dict: dict) -> dict:
    """The state as a resume reads it: into RunMeta, to meta.json's text and back."""
    meta = RunMeta(**state_dict)
    return RunMeta.from_dict(json.loads(json.dumps(meta.to_dict()))).to_dict()


def test_the_state_dict_is_the_metas_keys_and_a_resume_continues_the_ema_bit_exactly():
    straight = TrainState()
    expected = run_steps(straight, LOSSES)

    cut = TrainState()
    first = run_steps(cut, LOSSES[:3])
    state = cut.state_dict()
    assert tuple(state) == META_KEYS and set(META_KEYS) <= {f.name for f in dataclasses.fields(RunMeta)}
    resumed = TrainState()
    resumed.load_state_dict(through_meta_json(state))
    assert (resumed.step, resumed.ema_start) == (3, 0)
    # Python floats survive JSON exactly (shortest repr round-trips), so the continued EMA is the same bits
    assert first + run_steps(resumed, LOSSES[3:]) == expected


def test_a_checkpoint_without_the_loops_keys_starts_the_ema_afresh_at_its_step():
    # an import from nanochat, or a checkpoint written before the loss EMA was saved: only `step`
    state = TrainState()
    state.load_state_dict(RunMeta(step=7).to_dict())
    assert (state.step, state.loss_ema, state.ema_start, state.notice) == (7, 0.0, 7, None)
    fresh = TrainState()
    # debiased from the checkpoint's step: the first value is a fresh run's first, bit for bit
    assert run_steps(state, LOSSES[:2]) == run_steps(fresh, LOSSES[:2])


def fp8_model(config=TINY, seed=0):
    """The tiny GPT with delayed-scaling FP8 layers (call with fp8.fp8_supported patched: built, never run)."""
    return build_model(config, ModelOptions(fp8=True, fp8_scaling="delayed"), "cpu", seed=seed)


def set_histories(model, offset: float) -> None:
    with torch.no_grad():
        for i, scaling in enumerate(fp8.delayed_scalings(model)):
            scaling.x_amax.fill_(offset + i)
            scaling.grad_amax.fill_(offset + 0.5 * i)
            scaling.active = i % 2 == 0


def test_fp8_histories_go_rank_by_rank_and_other_layers_are_left_with_a_notice(monkeypatch):
    monkeypatch.setattr(fp8, "fp8_supported", lambda device: (True, ""))
    model = fp8_model()
    assert fp8.delayed_scalings(model), "the tiny model has delayed-scaling layers to carry"
    histories = []
    for offset in (1.0, 5.0):  # two ranks' histories, as a 2-process run gathers them
        set_histories(model, offset)
        histories += TrainState(model).state_dict()["fp8_scaling"]
    assert histories[1] == fp8.scaling_state(model).tolist()
    saved = through_meta_json({"step": 4, "loss_ema": None, "fp8_scaling": histories})

    # each rank takes its own; a third rank (a resume on more processes) takes rank 0's
    for rank, want in ((0, histories[0]), (1, histories[1]), (2, histories[0])):
        other = fp8_model(seed=1)
        state = TrainState(other, types.SimpleNamespace(process_index=rank, num_processes=3))
        state.load_state_dict(saved)
        assert fp8.scaling_state(other).tolist() == want and state.notice is None, rank

    # a model whose FP8 layers differ keeps its own, and says so in one line
    deeper = fp8_model(dataclasses.replace(TINY, n_layer=3))
    before = fp8.scaling_state(deeper)
    state = TrainState(deeper)
    state.load_state_dict(saved)
    assert torch.equal(fp8.scaling_state(deeper), before)
    assert state.notice.startswith("FP8 scaling history not restored")
    # without FP8 layers there is nothing to carry
    assert TrainState(build_model(TINY, ModelOptions(), "cpu", seed=0)).state_dict()["fp8_scaling"] is None
