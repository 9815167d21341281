"""`eval`: base_loss's train/val bits per byte and greedy samples, for our checkpoints and nanochat's.

With NANOCHAT_SRC set, nanochat's own build_model + evaluate_bpb + Engine give the same numbers and samples.
"""

from __future__ import annotations

import io
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nanochat_unsloth.cli import main as cli_main
from nanochat_unsloth.common import UserError
from nanochat_unsloth.convert.cli import export_to_nanochat
from nanochat_unsloth.shards.loader import TokenShardLoader
from nanochat_unsloth.eval.metrics import SAMPLE_PROMPTS
from nanochat_unsloth.eval.cli import evaluate_checkpoint

from test_convert import (  # noqa: F401  (isolated_runtime: the same autouse fixture, applied here too)
    B, SEQ, import_nanochat, isolated_runtime, make_base, make_run, needs_nanochat, quiet, reset_accelerate,
)

SPLIT_TOKENS = 4 * B * SEQ  # four batches per split


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_tokenizer_dir, tiny_shards_dir) -> Path:
    base = make_base(tmp_path_factory.mktemp("eval_base"), tiny_tokenizer_dir, tiny_shards_dir)
    make_run(base, "d2", [2], wte_bf16=True)
    export_to_nanochat(base / "runs" / "d2", log=quiet)  # -> <base>/base_checkpoints/d2/model_000002.pt
    return base


@pytest.fixture(scope="module")
def run_result(base) -> dict:
    return evaluate_checkpoint(base / "runs" / "d2", split_tokens=SPLIT_TOKENS, device="cpu", log=quiet)


def reference_bpb(base: Path, split: str, steps: int) -> float:
    """bpb written out from scratch: per-token cross-entropy of the logits over the bytes of the targets."""
    from nanochat_unsloth.checkpoint.layouts import load_run_checkpoint
    from nanochat_unsloth.eval.cli import build_model

    model = build_model(load_run_checkpoint(base / "runs" / "d2"), torch.device("cpu"))
    token_bytes = torch.load(base / "tokenizer" / "token_bytes.pt")
    nats, nbytes = 0.0, 0
    loader = TokenShardLoader(base / "shards", split, B, SEQ)
    with torch.no_grad():
        for _, (x, y) in zip(range(steps), loader):
            logits = model(x).float()
            ce = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), reduction="none")
            counted = token_bytes[y.view(-1)]
            nats += (ce * (counted > 0)).sum().item()
            nbytes += counted.sum().item()
    return nats / (math.log(2) * nbytes)


def test_our_checkpoint_bpb_and_samples(base, run_result):
    r = run_result
    assert r["kind"] == "run" and r["step"] == 2 and r["device_batch_size"] == B and r["max_seq_len"] == SEQ
    assert r["steps"] == {"train": 4, "val": 4}
    # The same per-token losses, summed in another order and precision (evaluate_bpb: an fp32 tensor sum per
    # batch; reference_bpb: Python floats). Measured 4e-8 (AVX-512) and 7.4e-8 (AVX2, ONEDNN_MAX_CPU_ISA=AVX2)
    # relative; bound 1e-5, 135x that and above the worst case of fp32 sums of these 4 batches of 64 positive
    # terms (about 67 x 2^-24 = 4e-6).
    for split in ("train", "val"):
        assert r[f"{split}_bpb"] == pytest.approx(reference_bpb(base, split, 4), rel=1e-5)
    assert len(r["samples"]) == 7
    for sample, prompt in zip(r["samples"], SAMPLE_PROMPTS):
        assert sample.startswith("<|bos|>" + prompt)  # as base_loss prints them


def test_nanochat_layout_gives_the_same_numbers(base, run_result):
    for path in (base / "base_checkpoints" / "d2", base / "base_checkpoints" / "d2" / "model_000002.pt"):
        r = evaluate_checkpoint(path, split_tokens=SPLIT_TOKENS, device="cpu", log=quiet)
        assert r["kind"] == "nanochat" and r["step"] == 2 and r["device_batch_size"] == B
        # the run's wte is bf16, so the conversion is lossless and the numbers are identical
        assert (r["train_bpb"], r["val_bpb"]) == (run_result["train_bpb"], run_result["val_bpb"])
        assert r["samples"] == run_result["samples"]


def test_cli_prints_base_loss_lines(base, capsys):
    assert cli_main(["eval", str(base / "runs" / "d2" / "step_000002"), "--split_tokens", str(SPLIT_TOKENS),
                     "--device", "cpu", "--device-batch-size", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("train bpb: ") for line in lines)
    assert any(line.startswith("val bpb: ") for line in lines)
    assert sum(line.startswith("<|bos|>") for line in lines) == 7


def test_split_tokens_beyond_the_data_are_clamped_to_one_pass(base):
    notes, big_b = [], 64  # big batches: one pass over the tiny splits is a few batches
    r = evaluate_checkpoint(base / "runs" / "d2", split_tokens=10_000 * big_b * SEQ, device_batch_size=big_b,
                            device="cpu", log=notes.append)
    val_windows = TokenShardLoader(base / "shards", "val", big_b, SEQ).num_windows
    assert r["steps"]["val"] == val_windows < 10_000
    assert any(n.startswith("note: the val split holds") for n in notes)
    assert math.isfinite(r["val_bpb"]) and math.isfinite(r["train_bpb"])


def test_a_val_shard_changed_since_prep_is_refused(base, tmp_path):
    """Bit rot in the val split (same size, valid ids: only the checksum sees it) would change val bpb silently."""
    import shutil

    from run_helpers import flip_bytes
    from nanochat_unsloth.shards.format import HEADER_BYTES

    shards = Path(shutil.copytree(base / "shards", tmp_path / "shards"))
    val = next(iter(sorted(shards.glob("val_*.bin"))))
    flip_bytes(val, HEADER_BYTES + 10, 8)
    with pytest.raises(UserError, match=rf"{val.name}: sha256 does not match the manifest"):
        evaluate_checkpoint(base / "runs" / "d2", shards=shards, split_tokens=SPLIT_TOKENS, device="cpu", log=quiet)


def test_bad_input(base, tmp_path, tiny_corpus_docs):
    with pytest.raises(UserError, match="not a multiple of --device-batch-size x sequence_len"):
        evaluate_checkpoint(base / "runs" / "d2", split_tokens=SPLIT_TOKENS + 1, device="cpu", log=quiet)
    with pytest.raises(UserError, match="not found"):
        evaluate_checkpoint(base / "runs" / "nope", device="cpu", log=quiet)
    with pytest.raises(UserError, match="available steps: 2"):
        evaluate_checkpoint(base / "base_checkpoints" / "d2", step=5, device="cpu", log=quiet)
    # a base dir with another tokenizer than the checkpoint was trained with
    from nanochat_unsloth.tokenizer import save_tokenizer, train_tokenizer

    other = tmp_path / "other"
    save_tokenizer(train_tokenizer(iter(tiny_corpus_docs["train"][:40]), 512), other / "tokenizer")
    with pytest.raises(UserError, match="not the tokenizer"):
        evaluate_checkpoint(base / "runs" / "d2", base_dir=other, device="cpu", log=quiet)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            evaluate_checkpoint(base / "runs" / "d2", split_tokens=SPLIT_TOKENS, device="cuda", log=quiet)


@needs_nanochat
def test_nanochat_computes_the_same(base, run_result, monkeypatch):
    """nanochat's build_model, evaluate_bpb and Engine on the converted checkpoint, fed our batches."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    cm = import_nanochat("nanochat.checkpoint_manager")
    loss_eval = import_nanochat("nanochat.loss_eval")
    engine_mod = import_nanochat("nanochat.engine")
    model, tokenizer, meta = cm.build_model(str(base / "base_checkpoints" / "d2"), 2, torch.device("cpu"), "eval")
    token_bytes = import_nanochat("nanochat.tokenizer").get_token_bytes()
    for split in ("train", "val"):
        loader = TokenShardLoader(base / "shards", split, meta["device_batch_size"], meta["max_seq_len"])
        theirs = loss_eval.evaluate_bpb(model, loader, 4, token_bytes)
        # Bitwise: nanochat's forward and evaluate_bpb are the same operations in the same order as ours
        # (test_nanochat_parity's forward is bitwise too). Measured equal on AVX-512 and AVX2.
        assert run_result[f"{split}_bpb"] == theirs, split
    engine = engine_mod.Engine(model, tokenizer)
    samples = []
    for prompt in SAMPLE_PROMPTS:
        tokens = tokenizer(prompt, prepend="<|bos|>")
        out, _ = engine.generate_batch(tokens, num_samples=1, max_tokens=16, temperature=0)
        samples.append(tokenizer.decode(out[0]))
    assert run_result["samples"] == samples


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_eval_under_bf16_autocast_is_close_to_cpu(base, run_result):
    ours = evaluate_checkpoint(base / "runs" / "d2", split_tokens=SPLIT_TOKENS, device="cuda", log=quiet)
    theirs = evaluate_checkpoint(base / "base_checkpoints" / "d2", split_tokens=SPLIT_TOKENS, device="cuda", log=quiet)
    assert (ours["train_bpb"], ours["val_bpb"]) == (theirs["train_bpb"], theirs["val_bpb"])
    assert ours["samples"] == theirs["samples"] and len(ours["samples"]) == 7
    # bf16 autocast on CUDA vs fp32 on CPU: bf16 logits and activations (2^-8 relative rounding). The 2e-2 bound
    # is about five times that rounding, for its growth through the layers; no GPU run has measured it yet.
    for split in ("train", "val"):
        assert ours[f"{split}_bpb"] == pytest.approx(run_result[f"{split}_bpb"], rel=2e-2)


def test_a_mixed_tokenizer_pair_is_refused_by_eval_train_and_convert(base, tmp_path, tiny_corpus_docs, capsys):
    """token_bytes.pt beside a tokenizer.pkl it does not belong to: a larger table gave silently wrong bpb, a
    smaller one an IndexError. Every reader refuses it in one line naming token_bytes.pt."""
    from nanochat_unsloth.cli import normalize_flags
    from nanochat_unsloth.tokenizer import save_tokenizer, train_tokenizer
    from nanochat_unsloth.train.config import parse_train_args
    from nanochat_unsloth.train.loop import train
    from train_fixtures import TINY_TRAIN_ARGS

    own = tmp_path / "base"
    shutil.copytree(base, own)
    other = tmp_path / "other"  # the same vocab size: only the link between the two files tells them apart
    save_tokenizer(train_tokenizer(iter(tiny_corpus_docs["train"][:40]), 512), other)
    smaller = io.BytesIO()
    torch.save(torch.ones(300, dtype=torch.int32), smaller)  # nanochat's format: a bare tensor
    pattern = r"token_bytes\.pt: .*not the pair of tokenizer\.pkl.*re-run `nanochat-unsloth tokenizer`"
    for table in ((other / "token_bytes.pt").read_bytes(), smaller.getvalue()):
        (own / "tokenizer" / "token_bytes.pt").write_bytes(table)
        with pytest.raises(UserError, match=pattern):
            evaluate_checkpoint(own / "runs" / "d2", split_tokens=SPLIT_TOKENS, device="cpu", log=quiet)
        with pytest.raises(UserError, match=pattern):
            export_to_nanochat(own / "runs" / "d2", base_dir=tmp_path / "nano", log=quiet)
        assert not (tmp_path / "nano").exists()
        with pytest.raises(UserError, match=pattern):
            train(parse_train_args(normalize_flags(TINY_TRAIN_ARGS + ["--base-dir", str(own), "--num-iterations",
                                                                      "1", "--model-tag", "t"])))
        reset_accelerate()
    capsys.readouterr()
    assert cli_main(["eval", str(own / "runs" / "d2"), "--split-tokens", str(SPLIT_TOKENS), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "token_bytes.pt" in err


def test_a_linked_runs_dir_keeps_the_base_dir_the_user_named(base, run_result, tmp_path):
    """<base>/runs and <base>/base_checkpoints as links to another disk: eval and convert find tokenizer/ and
    shards/ in the base dir named, not beside the links' targets; the tag is the name of the run dir given."""
    from nanochat_unsloth.train.import_nanochat import import_from_nanochat

    own = tmp_path / "base"
    shutil.copytree(base, own)
    disk = tmp_path / "other_disk"
    disk.mkdir()
    for name in ("runs", "base_checkpoints"):
        shutil.move(own / name, disk / name)
        (own / name).symlink_to(disk / name)
    (own / "runs" / "linked").symlink_to(disk / "runs" / "d2")  # a run dir that is itself a link
    r = evaluate_checkpoint(own / "runs" / "linked", split_tokens=SPLIT_TOKENS, device="cpu", log=quiet)
    assert r["val_bpb"] == run_result["val_bpb"] and r["train_bpb"] == run_result["train_bpb"]  # same computation
    nano = evaluate_checkpoint(own / "base_checkpoints" / "d2", split_tokens=SPLIT_TOKENS, device="cpu", log=quiet)
    assert nano["step"] == 2
    out = export_to_nanochat(own / "runs" / "linked", log=quiet)
    assert out["out_dir"] == own / "base_checkpoints" / "linked" and out["model"].exists()
    step_dir = import_from_nanochat(own / "base_checkpoints" / "linked", own / "runs" / "back", log=quiet)
    assert step_dir == own / "runs" / "back" / "step_000002" and (disk / "runs" / "back" / "step_000002").is_dir()
    reset_accelerate()
