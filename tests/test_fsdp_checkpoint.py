"""FSDP2 checkpoints are written sharded with torch.distributed.checkpoint, each rank its own shards, and every
strategy reads them: FSDP2 resumes them bit-exactly, DDP and one process restore the exact state, an FSDP2 run
resumes a DDP checkpoint, FSDP2 on another rank count reshards them, and `convert` and `eval` read them as the whole
weights they hold.

2 gloo ranks with `fully_shard` (tests/fsdp_checkpoint_e2e.py: Accelerate runs FSDP only on GPUs, so the tiny GPT
is sharded there by hand, and trained with the loop's optimizers, step and checkpoint functions), then one process.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from nanochat_unsloth.checkpoint import layouts, sharded, store
from nanochat_unsloth.common import UserError
from nanochat_unsloth.convert import nanochat_layout
from nanochat_unsloth.convert.cli import export_to_nanochat
from nanochat_unsloth.eval.cli import evaluate_checkpoint
from nanochat_unsloth.model.build import build_model
from nanochat_unsloth.model.gpt import GPTConfig
from nanochat_unsloth.train import optim

from cpu_launch import launch_cpu_processes
from train_fixtures import make_train_base_dir

SAVE_STEP = 2  # tests/fsdp_checkpoint_e2e.py's


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    base = make_train_base_dir(tmp_path_factory.mktemp("fsdp_ckpt_base"))
    out = base / "e2e"
    for nproc in (2, 1):  # the 2-rank run writes the checkpoints the one process reads
        done = launch_cpu_processes(nproc, "tests/fsdp_checkpoint_e2e.py", str(base), str(out))
        assert done.returncode == 0, done.stderr[-3000:]
    load = lambda n: torch.load(out / f"result_{n}.pt", weights_only=False)  # noqa: E731
    return {"base": base, "step_dir": store.run_dir_for(base, "fsdp") / store.step_dir_name(SAVE_STEP),
            "two": load(2), "one": load(1)}


def _equal(got: dict, want: dict) -> bool:
    """Bitwise, key for key (tensors, or dicts of tensors and values)."""
    if got.keys() != want.keys():
        return False
    for k, w in want.items():
        g = got[k]
        ok = _equal(g, w) if isinstance(w, dict) else torch.equal(g, w) if torch.is_tensor(w) else g == w
        if not ok:
            return False
    return True


@pytest.mark.slow
def test_each_rank_writes_its_own_shards_and_meta_checks_them(run):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    step_dir = run["step_dir"]
    assert sharded.is_sharded_checkpoint(step_dir)
    assert not (step_dir / store.MODEL_FILE).exists() and not (step_dir / "optimizer.bin").exists()
    meta = store.verify_checkpoint(step_dir)
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp"} <= set(meta.sha256), sorted(meta.sha256)
    # every weight and every optimizer moment is in two row pieces, one per rank: no rank wrote a whole one
    entries = FileSystemReader(str(step_dir / sharded.SHARDED_DIR)).read_metadata().state_dict_metadata
    tensors = {k: md for k, md in entries.items() if isinstance(md, TensorStorageMetadata) and len(md.size) == 2}
    assert any(k.startswith("model.") for k in tensors) and any(k.startswith("optim.") for k in tensors)
    for name, md in tensors.items():
        rows = md.size[0]
        assert sorted(c.offsets[0] for c in md.chunks) == [0, -(-rows // 2)], name
        assert all(c.sizes[1] == md.size[1] for c in md.chunks), name


@pytest.mark.slow
def test_fsdp2_resumes_bit_exactly_and_refuses_to_save_a_nan_in_one_shard(run):
    two = run["two"]
    # Bitwise: every weight and optimizer state is restored exactly on the same 2 ranks, so the next step is
    # the same math on the same numbers (a lost momentum or moment moves a weight by about the LR).
    assert two["fsdp2_position"] == SAVE_STEP
    assert two["fsdp2_loss"] == two["straight_loss"]
    assert _equal(two["fsdp2"], two["straight"])
    # rank 1's shard holds the NaN; rank 0, whose result this is, refuses too (the check is all-reduced)
    assert "weights hold NaN or inf (on another rank); not saved" in two["nan_refused"], two["nan_refused"]
    assert [s for s, _ in store.list_checkpoints(run["step_dir"].parent)] == [SAVE_STEP]
    assert not list(run["step_dir"].parent.glob(".step_*"))


@pytest.mark.slow
def test_a_write_that_fails_on_one_rank_is_refused_on_every_rank(run):
    # rank 1's RNG state file failed, after DCP had saved every rank's shards; rank 0, whose result this is,
    # learns of it where the ranks meet, removes the partial save and keeps the earlier checkpoint
    failure = run["two"]["rank_failure"]
    assert failure is not None and failure.startswith(f"step {SAVE_STEP + 2} was not saved: "), failure
    assert "no space left on the disk" in failure and f"{run['step_dir'].name}, is kept" in failure, failure
    assert [s for s, _ in store.list_checkpoints(run["step_dir"].parent)] == [SAVE_STEP]
    assert not list(run["step_dir"].parent.glob(".step_*"))


@pytest.mark.slow
def test_ddp_one_process_and_fsdp2_on_one_rank_restore_the_exact_state_and_fsdp2_resumes_a_ddp_checkpoint(run):
    two, one = run["two"], run["one"]
    saved = two["saved"]
    # DDP (2 ranks, ShardedAdamW keeping rows of the moments) and one process (no process group): DCP reads
    # every rank's pieces into whole tensors. Bitwise: the bytes the ranks wrote, copied.
    assert _equal(two["ddp_loaded"], saved)
    assert _equal(one["loaded"], saved)
    assert two["ddp_position"] == SAVE_STEP
    # the first step after resuming: the same weights on the same batches give the same loss. (The weights after
    # it are not compared: DDP clips with a norm summed in another order than FSDP2's sharded one.)
    assert two["ddp_loss"] == one["loss"] == two["straight_loss"]
    # FSDP2 on another rank count (one): DCP reshards the 2 ranks' pieces, bitwise as well
    assert _equal(one["fsdp2_one_rank_loaded"], saved)
    assert one["fsdp2_one_rank_loss"] == two["straight_loss"]
    # and back: the DDP run's own (unsharded) checkpoint of that state, resumed under FSDP2, bit-exactly
    assert two["from_ddp_loss"] == two["straight_loss"]
    assert _equal(two["from_ddp"], two["straight"])


@pytest.mark.slow
def test_a_damaged_shard_is_skipped_by_resume_auto_and_a_missing_one_is_one_line(run, tmp_path):
    run_dir = tmp_path / "runs" / "fsdp"
    shutil.copytree(run["step_dir"], run_dir / run["step_dir"].name)
    shard = run_dir / run["step_dir"].name / sharded.SHARDED_DIR / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    notices = []
    assert store.find_resume(run_dir, "auto", notices.append) is None
    assert len(notices) == 1 and "__1_0.distcp: sha256 does not match" in notices[0], notices
    # read without the meta's check (as after a file went missing since): one line, not DCP's traceback
    shard.unlink()
    with pytest.raises(UserError, match=r"dcp: cannot read the sharded weights \(FileNotFoundError: .*__1_0\.distcp"):
        store.load_model_state_dict(shard.parent.parent, verify=False)


def _names_by_id(model_config: dict) -> list[dict]:
    """For [AdamW, Muon] as build_optimizers makes them: each optimizer's state-dict ids -> parameter names."""
    model = build_model(GPTConfig(**model_config), device="meta")
    names = {p: n for n, p in model.named_parameters()}
    out = []
    for opt in optim.build_optimizers(model):
        params = [p for group in opt.param_groups for p in group["params"]]
        out.append({i: names[p] for i, p in enumerate(params)})
    return out


@pytest.mark.slow
def test_convert_and_eval_read_the_sharded_checkpoint_as_its_gathered_weights(run, tmp_path):
    saved = run["two"]["saved"]
    loaded = layouts.load_run_checkpoint(run["step_dir"])
    assert _equal(dict(loaded.state_dict), saved["weights"])

    paths = export_to_nanochat(run["step_dir"].parent, base_dir=tmp_path, with_optim=True, log=lambda *_: None)
    model = torch.load(paths["model"], weights_only=True)
    embedding_dtype = nanochat_layout.nanochat_embedding_dtype(loaded.meta, saved["weights"])  # a CPU run's: fp32
    assert _equal(model, dict(nanochat_layout.to_nanochat_state_dict(saved["weights"], loaded.model_config, "saved",
                                                                     embedding_dtype)))
    optim_states = torch.load(paths["optim"], weights_only=False)
    for state, names in zip(optim_states, _names_by_id(loaded.model_config)):
        assert {names[i] for i in state["state"]} == {n for n in names.values()}
        for i, values in state["state"].items():
            assert _equal(values, saved["optim"][names[i]]), names[i]

    # eval of the sharded run checkpoint and of nanochat's copy of the gathered weights: the same numbers
    kwargs = dict(split_tokens=512, device_batch_size=2, shards=run["base"] / "shards", device="cpu",
                  log=lambda *_: None)
    ours = evaluate_checkpoint(run["step_dir"], **kwargs)
    nanochat = evaluate_checkpoint(paths["out_dir"], **kwargs)
    for key in ("train_bpb", "val_bpb", "samples", "step"):
        assert ours[key] == nanochat[key], key
    assert ours["kind"] == "run" and nanochat["kind"] == "nanochat"


@pytest.mark.slow
def test_convert_reads_the_sharded_optimizer_states_as_the_runs_optimizers_would_hold_them(run):
    """convert builds no optimizer to read a sharded checkpoint's optimizer states (checkpoint/sharded.py rebuilds
    them from DCP's metadata): what it exports is what one process's [AdamW, Muon] hold after loading the
    checkpoint, groups, numbering and order included, so optim_N.pt is the same file byte for byte."""
    import io

    meta = store.load_meta(run["step_dir"])
    model = build_model(GPTConfig(**layouts.model_config_kwargs(meta.model_config)), device="cpu")
    optimizers = optim.build_optimizers(model)
    sharded.load_state(run["step_dir"], model, optimizers)
    files = []
    for states in (nanochat_layout.optim_from_sharded(run["step_dir"], meta), [o.state_dict() for o in optimizers]):
        files.append(io.BytesIO())
        torch.save(states, files[-1])
    assert files[0].getvalue() == files[1].getvalue()
