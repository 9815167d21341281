"""The training loop's own state, beside the model, the optimizers and the loader: the step count, the
smoothed loss, and every rank's FP8 delayed-scaling history. `TrainState` is a Stateful (`state_dict` /
`load_state_dict`) like the train loader (shards/loader.py), and is saved and restored with the other objects
a checkpoint holds (train/checkpoint.py's `Checkpointed`).

Its state dict is meta.json's `step`, `loss_ema` and `fp8_scaling` (checkpoint/meta.py), the keys checkpoints
have always carried, so every checkpoint resumes as before: one without `loss_ema` (older, or imported from
nanochat) starts the EMA afresh at its step; one without `fp8_scaling` leaves the histories to rebuild in the
first step.
"""

from __future__ import annotations

from nanochat_unsloth.model import fp8

EMA_BETA = 0.9  # nanochat's smoothing of the logged training loss
META_KEYS = ("step", "loss_ema", "fp8_scaling")  # the RunMeta fields `state_dict` fills


class TrainState:
    """`step`: optimizer steps complete. The loss EMA is kept biased towards its zero start, as nanochat's is,
    and debiased by the steps since `ema_start` when read (`record_loss`).

    `model` (unwrapped) holds the FP8 delayed-scaling histories, if any; `accelerator` gathers every rank's at a
    save and names this rank at a load (None: one process)."""

    def __init__(self, model=None, accelerator=None):
        self.model = model
        self.accelerator = accelerator
        self.step = 0
        self.loss_ema = 0.0
        self.ema_start = 0  # the step the EMA started at (0, or the step of a checkpoint without one)
        self.notice: str | None = None  # what load_state_dict could not restore, for the log

    def record_loss(self, loss: float) -> float:
        """The loss of the step just completed (`step` already counts it) into the EMA -> the debiased EMA."""
        self.loss_ema = EMA_BETA * self.loss_ema + (1 - EMA_BETA) * loss
        return self.loss_ema / (1 - EMA_BETA ** (self.step - self.ema_start))

    def state_dict(self) -> dict:
        """{"step", "loss_ema", "fp8_scaling"}, as meta.json holds them. Collective: every rank calls it, as
        every rank's FP8 history is gathered (ranks see different data, so different amaxes)."""
        return {"step": self.step, "loss_ema": {"value": self.loss_ema, "start_step": self.ema_start},
                "fp8_scaling": self._gathered_fp8_scaling()}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict`'s values (a meta.json's: keys it lacks read as a checkpoint without them)."""
        self.step = int(state["step"])
        ema = state.get("loss_ema")
        self.loss_ema, self.ema_start = (float(ema["value"]), int(ema["start_step"])) if ema else (0.0, self.step)
        self.notice = None
        histories = state.get("fp8_scaling")
        if histories and self.model is not None and fp8.delayed_scalings(self.model):
            # another number of processes: each rank takes a saved rank's history (same layer shapes, close amaxes)
            rank = self.accelerator.process_index if self.accelerator is not None else 0
            if not fp8.load_scaling_state(self.model, histories[rank % len(histories)]):
                self.notice = ("FP8 scaling history not restored (the checkpoint's FP8 layers differ); it rebuilds "
                               "in the first step")

    def _gathered_fp8_scaling(self) -> list[list[float]] | None:
        state = fp8.scaling_state(self.model) if self.model is not None else None
        if state is None:
            return None
        world_size = self.accelerator.num_processes if self.accelerator is not None else 1
        if world_size > 1:
            state = self.accelerator.gather(state.unsqueeze(0))  # (world_size, n)
        return state.reshape(world_size, -1).cpu().tolist()
