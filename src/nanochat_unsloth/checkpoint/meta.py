"""`meta.json`, a run checkpoint's record of itself: `RunMeta`, written by `store.save_checkpoint` only
(`RunMeta.to_dict`) and read by `load_meta` only.

The JSON keys are the field names (`atomic_write_json` sorts them), the keys checkpoints have always had. A key
a checkpoint lacks (it predates the field, or an import did not know it) reads as the field's default;
a key this version does not know is ignored, so newer and older checkpoints both load.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from nanochat_unsloth.common import UserError, read_json, sha256_file

META_NAME = "meta.json"
# written only when set: an imported checkpoint says so, a trained one has never carried these keys
_ONLY_WHEN_SET = {"fresh_optimizer": False, "imported_from": None}


@dataclass
class RunMeta:
    model_config: dict = field(default_factory=dict)  # GPTConfig's fields
    train_config: dict = field(default_factory=dict)  # the whole TrainConfig (a field missing: its default)
    tokenizer_sha256: str | None = None  # the tokenizer.pkl it trained with
    shards_sha256: str | None = None  # ShardManifest.fingerprint() of the shards it trained on
    val_bpb: float | None = None  # the latest evaluation's, when there was one
    world_size: int = 1
    grad_accum: int = 1
    device_type: str | None = None  # convert writes wte as nanochat would on this device
    num_iterations: int | None = None  # the horizon it was saved with
    cpu_bf16: str | None = None  # how a CPU run's bf16 GEMMs ran (bf16_gemm.cpu_math), "native" elsewhere
    resolved: dict | None = None  # every `auto` setting as the run resolved it (train/resolve.py); older: None
    loss_ema: dict | None = None  # {"value", "start_step"}: the smoothed loss continues across a resume
    fp8_scaling: list | None = None  # every rank's FP8 delayed-scaling history (fp8.scaling_state)
    deepspeed: dict | None = None  # {"stage", "offload_optimizer", "offload_param", "world_size"}
    fresh_optimizer: bool = False  # an import from nanochat: optimizers start from zero on resume
    imported_from: str | None = None  # the nanochat checkpoint it was imported from
    step: int = 0
    files: dict = field(default_factory=dict)  # every saved file (relative path) -> bytes
    sha256: dict = field(default_factory=dict)  # every saved file -> sha256
    complete: bool = False  # written last: only a finished save has it

    @classmethod
    def from_dict(cls, data: dict) -> "RunMeta":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict:
        """meta.json's object: every field, but the import-only ones only when set."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if not (k in _ONLY_WHEN_SET and v == _ONLY_WHEN_SET[k])}


def load_meta(step_dir: Path, checksums: bool = True) -> RunMeta:
    """meta.json of a complete checkpoint, after checking that every recorded file is whole (its size,
    and its sha256 unless `checksums` is False; checkpoints from before sha256 was recorded: size only)."""
    step_dir = Path(step_dir)
    if not step_dir.is_dir():
        raise UserError(f"{step_dir}: checkpoint directory not found")
    meta_path = step_dir / META_NAME
    if not meta_path.exists():
        raise UserError(
            f"{step_dir}: no {META_NAME}, so this checkpoint is partial (interrupted save); "
            "resume from an earlier step_* directory or use --resume auto"
        )
    data = read_json(meta_path, "checkpoint meta")
    if not isinstance(data, dict) or not data.get("complete") or "model_config" not in data:
        raise UserError(f"{meta_path}: not a complete nanochat-unsloth checkpoint")
    meta = RunMeta.from_dict(data)
    for name, size in meta.files.items():
        path = step_dir / name
        if not path.exists():
            raise UserError(f"{path}: missing from the checkpoint; it is corrupt, resume from another step")
        if path.stat().st_size != size:
            raise UserError(
                f"{path}: {path.stat().st_size:,} bytes but {size:,} were saved; the checkpoint is corrupt, "
                "resume from another step"
            )
    for name, digest in meta.sha256.items() if checksums else ():
        if sha256_file(step_dir / name) != digest:
            raise UserError(f"{step_dir / name}: sha256 does not match the one recorded at save; the checkpoint "
                            "is corrupt (bit rot or an overwritten file), resume from another step")
    return meta

