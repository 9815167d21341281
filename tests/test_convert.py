"""`convert`: our run checkpoints <-> nanochat's base_checkpoints, both ways, and bad input.

Tiny checkpoints are built directly (a CPU Accelerator + save_checkpoint), not by the training loop.
With NANOCHAT_SRC=/path/to/nanochat (b399e43), nanochat's own checkpoint_manager loads what we wrote.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import killed_at, watch_file_ops

from nanochat_unsloth.cli import main as cli_main
from nanochat_unsloth.common import UserError, sha256_file
from nanochat_unsloth.convert import nanochat_layout as layout
from nanochat_unsloth.convert.cli import export_to_nanochat
from nanochat_unsloth.train.import_nanochat import import_from_nanochat
from nanochat_unsloth.checkpoint import layouts, store as ckpt
from nanochat_unsloth.checkpoint.meta import RunMeta

NANOCHAT_SRC = os.environ.get("NANOCHAT_SRC")
needs_nanochat = pytest.mark.skipif(not NANOCHAT_SRC, reason="set NANOCHAT_SRC to a nanochat checkout to run")

DEPTH, SEQ, B, TOTAL = 2, 32, 2, 128  # n_embd 128, one head; 2 micro-steps per step
NANOCHAT_USER_CONFIG_KEYS = [
    "run", "device_type", "depth", "max_seq_len", "num_iterations", "target_flops", "target_param_data_ratio",
    "device_batch_size", "total_batch_size", "embedding_lr", "unembedding_lr", "weight_decay", "matrix_lr",
    "grad_clip", "warmup_ratio", "warmdown_ratio", "final_lr_frac", "eval_every", "eval_tokens",
    "core_metric_every", "core_metric_max_per_task", "sample_every", "model_tag",
]


# ---- helpers (test_eval_cli.py uses them too) -------------------------------------------------------


def make_base(dst: Path, tokenizer_dir: Path, shards_dir: Path) -> Path:
    """A writable base dir: copies of the session's tiny tokenizer and shards."""
    shutil.copytree(tokenizer_dir, dst / "tokenizer")
    shutil.copytree(shards_dir, dst / "shards")
    return dst


def tiny_train_config(tag: str, num_iterations: int) -> dict:
    from nanochat_unsloth.train.config import TrainConfig

    return TrainConfig(depth=DEPTH, max_seq_len=SEQ, device_batch_size=B, total_batch_size=TOTAL,
                       num_iterations=num_iterations, eval_every=-1, eval_tokens=512, sample_every=-1,
                       kernels="torch", model_tag=tag).to_dict()


def make_run(base: Path, tag: str, steps: list[int], wte_bf16: bool, seed: int = 0) -> Path:
    """<base>/runs/<tag>/step_XXXXXX for each step: a tiny model trained one optimizer step per checkpoint.

    wte_bf16 mimics a CUDA run (init_weights leaves wte bf16 there); False is what a CPU run saves.
    """
    from accelerate import Accelerator

    from nanochat_unsloth.tokenizer import load_tokenizer
    from nanochat_unsloth.shards.loader import TokenShardLoader
    from nanochat_unsloth.model.gpt import GPT, GPTConfig
    from nanochat_unsloth.train import optim

    vocab = load_tokenizer(base / "tokenizer").n_vocab
    sha = sha256_file(base / "tokenizer" / "tokenizer.pkl")
    config = GPTConfig.from_depth(DEPTH, SEQ, vocab)
    torch.manual_seed(seed)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():  # lm_head and the c_proj's start at zero: make every tensor carry information
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    if wte_bf16:
        model.transformer.wte.to(dtype=torch.bfloat16)
    optimizers = optim.build_optimizers(model)
    grad_accum = optim.grad_accum_steps(TOTAL, B, SEQ, 1)
    loader = TokenShardLoader(base / "shards", "train", B, SEQ, grad_accum=grad_accum, tokenizer_sha256=sha)
    accelerator = Accelerator(cpu=True)
    model, *optimizers = accelerator.prepare(model, *optimizers)
    accelerator.register_for_checkpointing(loader)
    run_dir = base / "runs" / tag
    done = 0
    for step in steps:
        while done < step:
            for _ in range(grad_accum):
                x, y = next(loader)
                # a bf16 wte needs autocast, as on CUDA (the loop's accelerator.autocast)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=wte_bf16):
                    loss = model(x, y)
                (loss / grad_accum).backward()
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
            done += 1
        meta = RunMeta(model_config=dataclasses.asdict(config), train_config=tiny_train_config(tag, steps[-1] + 1),
                       tokenizer_sha256=sha, val_bpb=1.5 + step, world_size=1, grad_accum=grad_accum,
                       num_iterations=steps[-1] + 1)
        ckpt.save_checkpoint(accelerator, run_dir, step, meta, keep_last=0)
    return run_dir


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes, to prove that a refused command wrote nothing."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def import_nanochat(name: str):
    """Import a nanochat module from NANOCHAT_SRC; third-party modules we lack are stubbed, nanochat's never."""
    def stub(mod_name):
        mod = types.ModuleType(mod_name)

        def missing_attr(attr):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return type(attr, (), {})  # a placeholder class: only the import has to succeed
        mod.__getattr__ = missing_attr
        return mod

    if NANOCHAT_SRC not in sys.path:
        sys.path.insert(0, NANOCHAT_SRC)
    for _ in range(20):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is None or e.name.split(".")[0] == "nanochat":
                raise
            sys.modules[e.name] = stub(e.name)
    raise RuntimeError(f"too many missing modules while importing {name}")


# ---- fixtures ---------------------------------------------------------------------------------------


def reset_accelerate() -> None:
    """Forget Accelerate's process-wide state: our CPU Accelerators must not pin the device or precision of
    Accelerators made later in the same pytest process (the loop's bf16 one on a CUDA machine)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module", autouse=True)
def isolated_runtime():
    """Tiny matmuls: one intra-op thread is several times faster than two on a shared, busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    reset_accelerate()
    yield
    reset_accelerate()
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_tokenizer_dir, tiny_shards_dir) -> Path:
    """Read-only for tests: runs 'd2' (bf16 wte, steps 2 and 3) and 'cpu' (fp32 wte, step 3)."""
    base = make_base(tmp_path_factory.mktemp("convert_base"), tiny_tokenizer_dir, tiny_shards_dir)
    make_run(base, "d2", [2, 3], wte_bf16=True)
    make_run(base, "cpu", [3], wte_bf16=False, seed=1)
    return base


@pytest.fixture
def work(base, tmp_path) -> Path:
    """A writable copy of `base`."""
    shutil.copytree(base, tmp_path / "base")
    return tmp_path / "base"


@pytest.fixture
def other_tokenizer(tmp_path, tiny_corpus_docs) -> Path:
    from nanochat_unsloth.tokenizer import save_tokenizer, train_tokenizer

    out = tmp_path / "other_tokenizer"
    save_tokenizer(train_tokenizer(iter(tiny_corpus_docs["train"][:40]), 300), out)
    return out


def quiet(*args, **kwargs):
    pass


# ---- ours -> nanochat -------------------------------------------------------------------------------


def test_export_writes_nanochat_layout(base, tmp_path):
    target = tmp_path / "nanochat_base"
    out = export_to_nanochat(base / "runs" / "d2", base_dir=target, log=quiet)
    out_dir = target / "base_checkpoints" / "d2"
    assert out["step"] == 3 and out["out_dir"] == out_dir
    assert sorted(p.name for p in out_dir.iterdir()) == ["meta_000003.json", "model_000003.pt"]

    state = torch.load(out_dir / "model_000003.pt", map_location="cpu", weights_only=True)
    run_meta = ckpt.load_meta(base / "runs" / "d2" / "step_000003")
    assert list(state) == list(layouts.expected_shapes(run_meta.model_config)), "nanochat's module order"
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in state)
    for name, tensor in state.items():
        want = torch.bfloat16 if name == "transformer.wte.weight" else torch.float32
        assert tensor.dtype == want, name
    theirs = ckpt.load_model_state_dict(base / "runs" / "d2" / "step_000003")
    for name, tensor in state.items():
        assert torch.equal(tensor, theirs[name]), name

    meta = json.loads((out_dir / "meta_000003.json").read_text())
    assert list(meta) == ["step", "val_bpb", "model_config", "user_config", "device_batch_size", "max_seq_len"]
    assert meta["step"] == 3 and meta["val_bpb"] == run_meta.val_bpb
    assert meta["model_config"] == run_meta.model_config
    assert sorted(meta["model_config"]) == sorted(layouts.MODEL_CONFIG_KEYS)
    assert list(meta["user_config"]) == NANOCHAT_USER_CONFIG_KEYS
    assert meta["user_config"]["depth"] == DEPTH and meta["user_config"]["total_batch_size"] == TOTAL
    assert meta["user_config"]["core_metric_every"] == -1  # the run's own setting (off by default here)
    assert (meta["device_batch_size"], meta["max_seq_len"]) == (B, SEQ)

    # the tokenizer came along, byte for byte
    for name in ("tokenizer.pkl", "token_bytes.pt"):
        assert (target / "tokenizer" / name).read_bytes() == (base / "tokenizer" / name).read_bytes()


def test_export_defaults_to_the_runs_base_and_tag(work):
    before = snapshot(work / "tokenizer")
    export_to_nanochat(work / "runs" / "d2" / "step_000002", log=quiet)
    assert (work / "base_checkpoints" / "d2" / "model_000002.pt").exists()
    assert snapshot(work / "tokenizer") == before
    export_to_nanochat(work / "runs" / "d2", model_tag="d2b", step=2, log=quiet)
    assert (work / "base_checkpoints" / "d2b" / "meta_000002.json").exists()


def test_with_optim_is_nanochats_list_of_two_state_dicts(base, tmp_path):
    out = export_to_nanochat(base / "runs" / "d2", base_dir=tmp_path, with_optim=True, log=quiet)
    optim_states = torch.load(out["optim"], map_location="cpu", weights_only=True)
    assert isinstance(optim_states, list) and len(optim_states) == 2
    step_dir = base / "runs" / "d2" / "step_000003"
    for ours, name in zip(optim_states, ("optimizer.bin", "optimizer_1.bin")):
        saved = torch.load(step_dir / name, map_location="cpu", weights_only=True)
        assert ours["param_groups"] == saved["param_groups"]
        assert ours["state"].keys() == saved["state"].keys() and ours["state"]
        for idx in saved["state"]:
            for key, value in saved["state"][idx].items():
                assert torch.equal(torch.as_tensor(ours["state"][idx][key]), torch.as_tensor(value))
    adamw, muon = optim_states
    assert len(adamw["param_groups"]) == 2 and "exp_avg" in adamw["state"][0]
    assert "momentum_buffer" in muon["state"][0]


def test_round_trip_ours_nanochat_ours_is_identical(base, tmp_path):
    nano_base = tmp_path / "nano"
    export_to_nanochat(base / "runs" / "d2", base_dir=nano_base, log=quiet)
    out_base = tmp_path / "ours"
    shutil.copytree(base / "shards", out_base / "shards")
    step_dir = import_from_nanochat(nano_base / "base_checkpoints" / "d2", out_base / "runs" / "back", log=quiet)
    assert step_dir == out_base / "runs" / "back" / "step_000003"
    original = ckpt.load_model_state_dict(base / "runs" / "d2" / "step_000003")
    back = ckpt.load_model_state_dict(step_dir)
    assert back.keys() == original.keys()
    for name in original:
        assert back[name].dtype == original[name].dtype and torch.equal(back[name], original[name]), name

    meta = ckpt.load_meta(step_dir)
    assert meta.fresh_optimizer is True and meta.step == 3 and meta.world_size == 1
    assert meta.tokenizer_sha256 == sha256_file(base / "tokenizer" / "tokenizer.pkl")
    assert meta.model_config == ckpt.load_meta(base / "runs" / "d2" / "step_000003").model_config
    for key in ("depth", "max_seq_len", "device_batch_size", "total_batch_size", "matrix_lr", "num_iterations"):
        assert meta.train_config[key] == tiny_train_config("d2", 4)[key], key
    assert meta.train_config["model_tag"] == "back"
    # the tokenizer came with it, and the loader stands where our loop's would after 3 steps of 2 micro-steps
    assert sha256_file(out_base / "tokenizer" / "tokenizer.pkl") == meta.tokenizer_sha256
    loader_state = torch.load(step_dir / "custom_checkpoint_0.pkl", weights_only=False)
    assert loader_state["cursor"] == 3 * 2 and loader_state["grad_accum"] == 2
    # a complete Accelerate checkpoint: everything our loop's load_state reads
    for name in ("model.safetensors", "optimizer.bin", "optimizer_1.bin", "random_states_0.pkl",
                 "custom_checkpoint_0.pkl", "meta.json"):
        assert (step_dir / name).exists(), name

    # and nanochat -> ours -> nanochat: the model file's tensors come back identical
    export_to_nanochat(step_dir, base_dir=tmp_path / "nano2", model_tag="d2", log=quiet)
    a = torch.load(nano_base / "base_checkpoints" / "d2" / "model_000003.pt", weights_only=True)
    b = torch.load(tmp_path / "nano2" / "base_checkpoints" / "d2" / "model_000003.pt", weights_only=True)
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_cpu_run_export_is_lossless(base, tmp_path):
    # nanochat keeps wte in fp32 on the CPU (its init_weights casts to bf16 on CUDA only): so do we
    export_to_nanochat(base / "runs" / "cpu", base_dir=tmp_path, log=quiet)
    state = torch.load(tmp_path / "base_checkpoints" / "cpu" / "model_000003.pt", weights_only=True)
    original = ckpt.load_model_state_dict(base / "runs" / "cpu" / "step_000003")
    assert original["transformer.wte.weight"].dtype == torch.float32
    assert sorted(state) == sorted(original)
    for name, tensor in state.items():
        assert tensor.dtype == original[name].dtype and torch.equal(tensor, original[name]), name


@pytest.mark.parametrize("device_type, wte_dtype", [("cuda", torch.bfloat16), ("cpu", torch.float32)])
def test_export_writes_wte_as_nanochat_would_on_the_runs_device(base, tmp_path, device_type, wte_dtype):
    # the meta's device decides, not the checkpoint's dtype: an FSDP2 run on CUDA holds an fp32 wte
    run = tmp_path / "base" / "runs" / "moved"
    shutil.copytree(base / "runs" / "cpu", run)
    for name in ("tokenizer", "shards"):
        shutil.copytree(base / name, tmp_path / "base" / name)
    meta_path = run / "step_000003" / "meta.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "device_type": device_type}))
    export_to_nanochat(run, base_dir=tmp_path / "out", log=quiet)
    state = torch.load(tmp_path / "out" / "base_checkpoints" / "moved" / "model_000003.pt", weights_only=True)
    original = ckpt.load_model_state_dict(run / "step_000003")["transformer.wte.weight"]
    assert state["transformer.wte.weight"].dtype == wte_dtype
    assert torch.equal(state["transformer.wte.weight"], original.to(wte_dtype))


def test_step_selection(base, tmp_path):
    assert export_to_nanochat(base / "runs" / "d2", step=2, base_dir=tmp_path, log=quiet)["step"] == 2
    with pytest.raises(UserError, match=r"--step 7.*available steps: 2, 3"):
        export_to_nanochat(base / "runs" / "d2", step=7, base_dir=tmp_path, log=quiet)
    with pytest.raises(UserError, match="is step 3, but --step 2"):
        export_to_nanochat(base / "runs" / "d2" / "step_000003", step=2, base_dir=tmp_path, log=quiet)


# ---- bad input: clear errors, nothing written -------------------------------------------------------


def test_missing_and_partial_checkpoints(work, tmp_path):
    target = tmp_path / "target"
    with pytest.raises(UserError, match="not found"):
        export_to_nanochat(work / "runs" / "nope", base_dir=target, log=quiet)
    (work / "runs" / "empty" / ".step_000009.tmp").mkdir(parents=True)
    with pytest.raises(UserError, match=r"no complete checkpoint \(only partial ones: .step_000009.tmp\)"):
        export_to_nanochat(work / "runs" / "empty", base_dir=target, log=quiet)
    (work / "runs" / "d2" / "step_000003" / "meta.json").unlink()  # a save interrupted before its meta
    with pytest.raises(UserError, match="partial"):
        export_to_nanochat(work / "runs" / "d2" / "step_000003", base_dir=target, log=quiet)
    # the run dir itself falls back to the newest *complete* step
    assert export_to_nanochat(work / "runs" / "d2", base_dir=target, log=quiet)["step"] == 2
    model = work / "runs" / "cpu" / "step_000003" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:1000])  # truncated
    with pytest.raises(UserError, match="corrupt"):
        export_to_nanochat(work / "runs" / "cpu", base_dir=target, log=quiet)
    assert not (target / "base_checkpoints" / "cpu").exists()


def test_existing_target_needs_force(work):
    export_to_nanochat(work / "runs" / "d2", log=quiet)
    before = snapshot(work / "base_checkpoints")
    with pytest.raises(UserError, match="already exists; pass --force"):
        export_to_nanochat(work / "runs" / "d2", log=quiet)
    with pytest.raises(UserError, match="already exists; pass --force"):
        export_to_nanochat(work / "runs" / "cpu", model_tag="d2", step=3, log=quiet)
    assert snapshot(work / "base_checkpoints") == before
    export_to_nanochat(work / "runs" / "cpu", model_tag="d2", force=True, log=quiet)
    state = torch.load(work / "base_checkpoints" / "d2" / "model_000003.pt", weights_only=True)
    cpu = ckpt.load_model_state_dict(work / "runs" / "cpu" / "step_000003")
    assert torch.equal(state["lm_head.weight"], cpu["lm_head.weight"])
    assert not list((work / "base_checkpoints" / "d2").glob(".*.tmp")), "no temporary files left behind"


STEP3 = ("model_000003.pt", "meta_000003.json", "optim_000003.pt")


def nanochat_view(tag_dir: Path, sets: dict[str, dict]) -> str:
    """What nanochat's checkpoint_manager finds for step 3: it lists model_*.pt, then reads that step's meta
    (and optim, when resuming). 'none' without model_000003.pt, else the name of the set it reads; a
    mixed set fails the test."""
    if not (tag_dir / STEP3[0]).exists():
        return "none"
    found = {name: (tag_dir / name).read_bytes() if (tag_dir / name).exists() else None for name in STEP3}
    for label, files in sets.items():
        if found == files:
            return label
    raise AssertionError(f"step 3 is a mix of two conversions: {sorted(n for n, b in found.items() if b)}")


def test_force_replaces_the_checkpoint_as_one_set_wherever_it_is_killed(work, tmp_path, monkeypatch):
    """--force over step 3 of tag d2 (old: d2's weights with an optim file; new: the cpu run's, without one)."""
    tag_dir = work / "base_checkpoints" / "d2"
    sets = {}
    for label, run, with_optim in (("old", "d2", True), ("new", "cpu", False)):
        export_to_nanochat(work / "runs" / run, model_tag="d2", base_dir=tmp_path / label, with_optim=with_optim,
                           log=quiet)
        ref = tmp_path / label / "base_checkpoints" / "d2"
        sets[label] = {name: (ref / name).read_bytes() if (ref / name).exists() else None for name in STEP3}

    def write(label: str, force: bool = True) -> None:
        run, with_optim = ("d2", True) if label == "old" else ("cpu", False)
        export_to_nanochat(work / "runs" / run, model_tag="d2", with_optim=with_optim, force=force, log=quiet)

    # every point a kill can land: the old set, no step 3, or the new set; never weights beside another meta
    write("old", force=False)
    seen = []
    with monkeypatch.context() as m:
        watch_file_ops(m, lambda: seen.append(nanochat_view(tag_dir, sets)))
        write("new")
    seen.append(nanochat_view(tag_dir, sets))
    assert seen[0] == "old" and seen[-1] == "new" and "none" in seen, seen

    # an error at each of those points leaves no staging dir; where it left no step 3, a plain convert
    # (no --force) writes it, over the meta or optim file left without its model
    for k in range(len(seen) - 1):
        write("old")
        with killed_at(monkeypatch, k):
            write("new")
        state = nanochat_view(tag_dir, sets)
        assert state in ("old", "none") and not list(tag_dir.glob(".*.tmp")), (k, state)
        write("new", force=state == "old")
        assert nanochat_view(tag_dir, sets) == "new"
    # a kill -9 leaves its staging dir, which nanochat's listing never sees; the next write removes it
    leftover = tag_dir / ".model_000003.pt.abc123.staging.tmp"
    leftover.mkdir()
    (leftover / "model_000003.pt").write_bytes(b"half")
    assert layouts.list_nanochat_checkpoints(tag_dir) == [3]
    write("old")
    assert not leftover.exists() and nanochat_view(tag_dir, sets) == "old"


def test_different_tokenizer_in_target_is_refused(base, tmp_path, other_tokenizer):
    target = tmp_path / "target"
    shutil.copytree(other_tokenizer, target / "tokenizer")
    before = snapshot(target)
    with pytest.raises(UserError, match="different tokenizer is already there"):
        export_to_nanochat(base / "runs" / "d2", base_dir=target, log=quiet)
    assert snapshot(target) == before
    export_to_nanochat(base / "runs" / "d2", base_dir=target, force=True, log=quiet)
    assert sha256_file(target / "tokenizer" / "tokenizer.pkl") == sha256_file(base / "tokenizer" / "tokenizer.pkl")
    token_bytes = (target / "tokenizer" / "token_bytes.pt").read_bytes()
    assert token_bytes == (base / "tokenizer" / "token_bytes.pt").read_bytes()
    # the tokenizer --force replaced is kept, every file of it: what the target's own shards and runs need back
    kept = target / "tokenizer" / "previous_1"
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == {p.name: p.read_bytes() for p in other_tokenizer.iterdir()
                                                                if p.is_file()}
    export_to_nanochat(base / "runs" / "d2", base_dir=target, force=True, log=quiet)  # the same tokenizer: no copy
    assert sorted(p.name for p in (target / "tokenizer").iterdir() if p.is_dir()) == ["previous_1"]


def test_source_tokenizer_replaced_after_training_is_refused(work, tmp_path, other_tokenizer):
    shutil.copy(other_tokenizer / "tokenizer.pkl", work / "tokenizer" / "tokenizer.pkl")
    with pytest.raises(UserError, match="not the tokenizer the checkpoint was trained with"):
        export_to_nanochat(work / "runs" / "d2", base_dir=tmp_path / "t", log=quiet)
    (work / "tokenizer" / "tokenizer.pkl").unlink()
    with pytest.raises(UserError, match="tokenizer is not there"):
        export_to_nanochat(work / "runs" / "d2", base_dir=tmp_path / "t", log=quiet)
    assert not (tmp_path / "t").exists()


def test_config_mismatch_is_refused(work, tmp_path):
    meta_path = work / "runs" / "d2" / "step_000003" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["model_config"]["n_embd"] = 64
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="do not match the model_config"):
        export_to_nanochat(work / "runs" / "d2", base_dir=tmp_path / "t", log=quiet)
    meta["model_config"]["n_embd"] = 128
    meta["model_config"]["vocab_size"] += 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="do not match the model_config"):
        export_to_nanochat(work / "runs" / "d2", base_dir=tmp_path / "t", log=quiet)
    assert not (tmp_path / "t").exists()


def test_cli_flags_and_one_line_errors(base, tmp_path, capsys):
    rc = cli_main(["convert", str(base / "runs" / "d2"), "--base_dir", str(tmp_path), "--model_tag", "x",
                   "--with_optim", "--step", "2"])
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "base_checkpoints" / "x").iterdir()) == [
        "meta_000002.json", "model_000002.pt", "optim_000002.pt"]
    capsys.readouterr()
    assert cli_main(["convert", str(base / "runs" / "d2"), "--base-dir", str(tmp_path), "--model-tag", "x",
                     "--step", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--force" in err
    assert cli_main(["convert", "--from-nanochat", str(tmp_path / "base_checkpoints" / "x")]) == 2
    assert "--out" in capsys.readouterr().err


# ---- nanochat -> ours -------------------------------------------------------------------------------


@pytest.fixture
def nano(base, tmp_path) -> Path:
    """A nanochat base dir with base_checkpoints/d2 at step 3 (bf16 wte) and the tokenizer; plus shards."""
    nano = tmp_path / "nano"
    export_to_nanochat(base / "runs" / "d2", base_dir=nano, log=quiet)
    shutil.copytree(base / "shards", nano / "shards")
    return nano


def test_import_then_resume_continues_with_fresh_optimizer(nano, capsys):
    from nanochat_unsloth.cli import normalize_flags
    from nanochat_unsloth.train.config import parse_train_args
    from nanochat_unsloth.train.loop import train

    import_from_nanochat(nano / "base_checkpoints" / "d2", nano / "runs" / "d2")
    log = capsys.readouterr().out
    assert "FRESH optimizer state" in log
    hint = next(line for line in log.splitlines() if line.startswith("continue with:"))
    for flag in ("--resume auto", "--depth 2", "--max_seq_len 32", "--device_batch_size 2", "--num_iterations 4"):
        assert flag in hint, flag
    reset_accelerate()  # the loop makes its own Accelerator (bf16 on CUDA); ours were CPU ones
    args = ["--depth", str(DEPTH), "--max-seq-len", str(SEQ), "--device-batch-size", str(B),
            "--total-batch-size", str(TOTAL), "--num-iterations", "4", "--eval-every", "-1", "--eval-tokens", "512",
            "--sample-every", "-1", "--kernels", "torch", "--base-dir", str(nano), "--model-tag", "d2",
            "--resume", "auto"]
    result = train(parse_train_args(normalize_flags(args)))
    out = capsys.readouterr().out
    assert result["start_step"] == 3 and result["final_step"] == 4
    assert "fresh optimizer state" in out
    before = ckpt.load_model_state_dict(nano / "runs" / "d2" / "step_000003")
    after = ckpt.load_model_state_dict(nano / "runs" / "d2" / "step_000004")
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"]), "it trained from the imported weights"


def test_import_accepts_orig_mod_prefixes_and_a_model_file(nano, tmp_path):
    model_path = nano / "base_checkpoints" / "d2" / "model_000003.pt"
    state = torch.load(model_path, weights_only=True)
    torch.save({f"_orig_mod.{k}": v for k, v in state.items()}, model_path)  # nanochat's torch.compile hack
    step_dir = import_from_nanochat(model_path, nano / "runs" / "p", log=quiet)
    back = ckpt.load_model_state_dict(step_dir)
    for name in state:
        assert torch.equal(back[name], state[name]), name


def test_import_bad_input(nano, tmp_path, other_tokenizer):
    src = nano / "base_checkpoints" / "d2"
    out = nano / "runs" / "imp"
    with pytest.raises(UserError, match="not found"):
        import_from_nanochat(nano / "base_checkpoints" / "nope", out, log=quiet)
    with pytest.raises(UserError, match="--step 5.*available steps: 3"):
        import_from_nanochat(src, out, step=5, log=quiet)
    # partial: a model file whose meta was never written
    shutil.copy(src / "model_000003.pt", src / "model_000009.pt")
    with pytest.raises(UserError, match="step 9 is partial"):
        import_from_nanochat(src, out, step=9, log=quiet)
    assert import_from_nanochat(src, out, log=quiet).name == "step_000003"  # newest *complete* step
    (src / "model_000009.pt").unlink()
    # existing target
    before = snapshot(out)
    with pytest.raises(UserError, match="already exists; pass --force"):
        import_from_nanochat(src, out, log=quiet)
    assert snapshot(out) == before
    import_from_nanochat(src, out, force=True, log=quiet)
    # config mismatch: meta says another width than the weights have
    meta_path = src / "meta_000003.json"
    meta = json.loads(meta_path.read_text())
    bad = dict(meta, model_config={**meta["model_config"], "n_embd": 64})
    meta_path.write_text(json.dumps(bad))
    with pytest.raises(UserError, match="do not match the model_config"):
        import_from_nanochat(src, nano / "runs" / "imp2", log=quiet)
    # a shape our trainer cannot rebuild from --depth
    gqa = dict(meta, model_config={**meta["model_config"], "n_head": 2, "n_kv_head": 2})  # same shapes
    meta_path.write_text(json.dumps(gqa))
    with pytest.raises(UserError, match="is not what depth 2 gives"):
        import_from_nanochat(src, nano / "runs" / "imp2", log=quiet)
    meta_path.write_text(json.dumps(meta))
    # tokenizer mismatch: nanochat's base holds another tokenizer than the one the weights were trained with
    shutil.copy(other_tokenizer / "tokenizer.pkl", nano / "tokenizer" / "tokenizer.pkl")
    with pytest.raises(UserError, match="not the tokenizer it was trained with"):
        import_from_nanochat(src, nano / "runs" / "imp2", log=quiet)
    assert not (nano / "runs" / "imp2").exists()


def test_import_refuses_shards_of_another_tokenizer(nano, tmp_path, other_tokenizer):
    out_base = tmp_path / "ours"
    shutil.copytree(nano / "shards", out_base / "shards")
    manifest = json.loads((out_base / "shards" / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = sha256_file(other_tokenizer / "tokenizer.pkl")
    (out_base / "shards" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="shards were made with tokenizer"):
        import_from_nanochat(nano / "base_checkpoints" / "d2", out_base / "runs" / "x", log=quiet)
    assert not (out_base / "runs").exists() and not (out_base / "tokenizer").exists()
    with pytest.raises(UserError, match="shard directory not found"):
        import_from_nanochat(nano / "base_checkpoints" / "d2", tmp_path / "no_shards" / "runs" / "x", log=quiet)


# ---- opt-in: nanochat's own code on our files -------------------------------------------------------


@needs_nanochat
def test_nanochat_build_model_loads_converted_checkpoint(base, tmp_path, monkeypatch):
    from nanochat_unsloth.eval.cli import build_model

    target = tmp_path / "nanochat_base"
    export_to_nanochat(base / "runs" / "cpu", base_dir=target, model_tag="d2", log=quiet)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(target))
    cm = import_nanochat("nanochat.checkpoint_manager")
    tok = import_nanochat("nanochat.tokenizer").get_tokenizer()
    assert tok.get_vocab_size() == ckpt.load_meta(base / "runs" / "cpu" / "step_000003").model_config["vocab_size"]
    text = "The capital of France is Paris."
    from nanochat_unsloth.tokenizer import load_tokenizer
    assert tok.encode(text) == load_tokenizer(base / "tokenizer").encode_ordinary(text)

    theirs, tokenizer, meta = cm.build_model(str(target / "base_checkpoints" / "d2"), 3, torch.device("cpu"), "eval")
    assert meta["step"] == 3 and tokenizer.get_vocab_size() == theirs.config.vocab_size
    ours = build_model(layouts.load_nanochat_checkpoint(target / "base_checkpoints" / "d2"), torch.device("cpu"))
    # nanochat's loader gets the CPU run's weights exactly, fp32 wte included
    trained = ckpt.load_model_state_dict(base / "runs" / "cpu" / "step_000003")
    for name, tensor in theirs.state_dict().items():
        assert torch.equal(tensor, trained[name]), name
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, theirs.config.vocab_size, (2, SEQ), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), theirs(idx), rtol=0, atol=0)
        targets = torch.randint(0, theirs.config.vocab_size, (2, SEQ), generator=g)
        assert ours(idx, targets).item() == theirs(idx, targets).item()


@needs_nanochat
def test_checkpoint_written_by_nanochat_imports(base, tmp_path, monkeypatch):
    """nanochat's own save_checkpoint writes the checkpoint; we import it and get its weights back."""
    cm = import_nanochat("nanochat.checkpoint_manager")
    gpt = import_nanochat("nanochat.gpt")
    nano = tmp_path / "nano"
    shutil.copytree(base / "tokenizer", nano / "tokenizer")
    shutil.copytree(base / "shards", nano / "shards")
    model_config = ckpt.load_meta(base / "runs" / "d2" / "step_000003").model_config
    torch.manual_seed(5)
    model = gpt.GPT(gpt.GPTConfig(**model_config))
    model.init_weights()
    model.transformer.wte.to(dtype=torch.bfloat16)  # as on CUDA
    user_config = {**layout.NANOCHAT_USER_CONFIG_DEFAULTS, "depth": DEPTH, "max_seq_len": SEQ,
                   "device_batch_size": B, "total_batch_size": TOTAL, "num_iterations": 10}
    cm.save_checkpoint(str(nano / "base_checkpoints" / "d2"), 7, model.state_dict(), None,
                       {"step": 7, "val_bpb": 2.5, "model_config": model_config, "user_config": user_config,
                        "device_batch_size": B, "max_seq_len": SEQ})
    step_dir = import_from_nanochat(nano / "base_checkpoints" / "d2", nano / "runs" / "d2", log=quiet)
    back = ckpt.load_model_state_dict(step_dir)
    for name, tensor in model.state_dict().items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    meta = ckpt.load_meta(step_dir)
    assert meta.step == 7 and meta.val_bpb == 2.5 and meta.train_config["num_iterations"] == 10
    # and back out: nanochat's file and ours agree tensor for tensor
    export_to_nanochat(step_dir, base_dir=tmp_path / "again", log=quiet)
    again = torch.load(tmp_path / "again" / "base_checkpoints" / "d2" / "model_000007.pt", weights_only=True)
    original = torch.load(nano / "base_checkpoints" / "d2" / "model_000007.pt", weights_only=True)
    assert list(again) == list(original)
    for name in original:
        assert again[name].dtype == original[name].dtype and torch.equal(again[name], original[name]), name


def test_import_into_a_run_dir_with_checkpoints_needs_force_and_sets_them_aside(nano):
    """The run dir's own checkpoints are another history: without --force the import is refused (a resume of
    the import would prune them); with it they move to previous_N/, the same step included, never deleted,
    so that --resume auto continues the import."""
    src, out = nano / "base_checkpoints" / "d2", nano / "runs" / "own"
    make_run(nano, "own", [1, 2], wte_bf16=False, seed=2)  # older than the import's 3
    before = snapshot(out)
    with pytest.raises(UserError, match="already holds"):
        import_from_nanochat(src, out, log=quiet)
    assert snapshot(out) == before
    import_from_nanochat(src, out, force=True, log=quiet)
    assert snapshot(out / "previous_0") == before
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [3]
    old_step3 = snapshot(out / "step_000003")
    import_from_nanochat(src, out, force=True, log=quiet)  # the same step again: the first import goes aside
    assert snapshot(out / "previous_1" / "step_000003") == old_step3


def test_export_below_a_newer_step_in_the_tag_is_refused(work):
    """nanochat (and `eval` of the tag dir) load a tag's newest step: an export of step 2 into a tag that holds
    another run's step 3 would be silently shadowed by it, so it is refused unless --force."""
    export_to_nanochat(work / "runs" / "cpu", model_tag="d2", log=quiet)  # step 3, the cpu run
    before = snapshot(work / "base_checkpoints")
    with pytest.raises(UserError, match=r"already holds step 3, which nanochat loads.*--model-tag.*--force"):
        export_to_nanochat(work / "runs" / "d2", step=2, log=quiet)
    assert snapshot(work / "base_checkpoints") == before
    export_to_nanochat(work / "runs" / "d2", step=2, force=True, log=quiet)
    assert (work / "base_checkpoints" / "d2" / "model_000002.pt").exists()


def test_an_import_is_resumed_only_on_the_shards_it_placed_the_loader_in(nano):
    """The import puts the loader where our run would stand after the step, in the --shards it was given; a
    resume on other shards with as many windows (another prep capped at the same --max-tokens) passed the
    loader's own checks and went on in other data, where a run of ours is refused unless --force."""
    import numpy as np

    from nanochat_unsloth.checkpoint.meta import load_meta
    from nanochat_unsloth.checkpoint.resume import check_resume_data
    from nanochat_unsloth.shards.format import open_shard_tokens, write_shard
    from nanochat_unsloth.shards.manifest import ShardManifest

    step_dir = import_from_nanochat(nano / "base_checkpoints" / "d2", nano / "runs" / "imp", log=quiet)
    other = nano / "other_shards"  # the same tokenizer and token counts, one text token changed
    shutil.copytree(nano / "shards", other)
    manifest = ShardManifest.load(other)
    entry = manifest.shards_for("train")[0]
    tokens = np.array(open_shard_tokens(other / entry.file))
    i = int(np.flatnonzero(tokens != manifest.tokenizer.bos_id)[0])
    tokens[i] = (tokens[i] + 1) % manifest.tokenizer.bos_id
    entry.sha256 = write_shard(other / entry.file, tokens, manifest.tokenizer.vocab_size, manifest.tokenizer.bos_id).sha256
    manifest.save(other)
    meta = load_meta(step_dir)
    check_resume_data(meta, step_dir, ShardManifest.load(nano / "shards"), nano / "shards", force=False)
    with pytest.raises(UserError, match="was trained on other shards than those in"):
        check_resume_data(meta, step_dir, ShardManifest.load(other), other, force=False)
