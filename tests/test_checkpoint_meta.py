"""meta.json through RunMeta: one writer (store.save_checkpoint), one reader (load_meta), the keys on disk the
ones checkpoints have always carried, and older or newer checkpoints still read."""

from __future__ import annotations

import json

import pytest
import torch

from nanochat_unsloth.checkpoint.meta import META_NAME, RunMeta, load_meta
from nanochat_unsloth.checkpoint.store import save_checkpoint
from nanochat_unsloth.common import UserError

# what the training loop's meta.json held before RunMeta (its meta_for dict + save_checkpoint's four keys),
# and "resolved" (the run's `auto` settings, train/resolve.py) since
LOOP_KEYS = {"model_config", "train_config", "tokenizer_sha256", "shards_sha256", "val_bpb", "world_size",
             "grad_accum", "device_type", "num_iterations", "cpu_bf16", "loss_ema", "fp8_scaling", "deepspeed",
             "step", "files", "sha256", "complete", "resolved"}


def test_save_writes_the_same_keys_and_load_reads_back_what_was_saved(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(4, 4))
    trained = RunMeta(model_config={"n_layer": 1}, train_config={"depth": 1}, tokenizer_sha256="t", shards_sha256="s",
                      val_bpb=1.25, world_size=2, grad_accum=3, device_type="cpu", num_iterations=9,
                      cpu_bf16="native", loss_ema={"value": 2.5, "start_step": 0}, fp8_scaling=None, deepspeed=None,
                      resolved={"kernels": "torch", "compile": "none"})
    step_dir = save_checkpoint(accelerator, tmp_path / "run", 4, trained, keep_last=0)
    on_disk = json.loads((step_dir / META_NAME).read_text())
    assert set(on_disk) == LOOP_KEYS  # no import-only key on a trained checkpoint
    loaded = load_meta(step_dir)
    assert loaded.step == 4 and loaded.complete and set(loaded.files) == set(loaded.sha256) == set(on_disk["files"])
    assert loaded == RunMeta(**{**vars(trained), "step": 4, "files": on_disk["files"], "sha256": on_disk["sha256"],
                                "complete": True})

    imported = RunMeta(model_config={"n_layer": 1}, fresh_optimizer=True, imported_from="/x/model_000004.pt")
    step_dir = save_checkpoint(accelerator, tmp_path / "imp", 4, imported, keep_last=0)
    on_disk = json.loads((step_dir / META_NAME).read_text())
    assert set(on_disk) == LOOP_KEYS | {"fresh_optimizer", "imported_from"}
    assert load_meta(step_dir).fresh_optimizer is True


def test_an_older_or_newer_meta_reads_with_defaults_and_its_files_are_still_checked(tmp_path):
    step_dir = tmp_path / "step_000002"
    step_dir.mkdir()
    (step_dir / "model.safetensors").write_bytes(b"12345")
    old = {"step": 2, "model_config": {"n_layer": 1}, "train_config": {}, "world_size": 1, "grad_accum": 1,
           "files": {"model.safetensors": 5}, "complete": True, "a_key_from_a_later_version": 1}
    (step_dir / META_NAME).write_text(json.dumps(old))
    meta = load_meta(step_dir)
    assert (meta.step, meta.shards_sha256, meta.loss_ema, meta.fp8_scaling, meta.deepspeed, meta.sha256,
            meta.resolved) == (2, None, None, None, None, {}, None)
    (step_dir / "model.safetensors").write_bytes(b"1234")
    with pytest.raises(UserError, match="4 bytes but 5 were saved"):
        load_meta(step_dir)
    (step_dir / META_NAME).write_text(json.dumps({**old, "complete": False}))
    with pytest.raises(UserError, match="not a complete nanochat-unsloth checkpoint"):
        load_meta(step_dir)
