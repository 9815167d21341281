"""Too little data for the flags is refused at prep and at start-up, before the model, not at the final eval.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nanochat_unsloth.cli import run_main
from nanochat_unsloth.common import UserError

from conftest import write_parquet_files
from train_fixtures import make_train_base_dir
from run_helpers import run_train, one_line_error


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_train_base_dir(tmp_path_factory.mktemp("integrity_base"))


def test_prep_refuses_a_too_small_val_split(tmp_path, tiny_corpus_docs, tiny_tokenizer_dir, capsys):
    from nanochat_unsloth.prep.prep_cli import main as prep_main

    args = ["--tokenizer-dir", str(tiny_tokenizer_dir), "--workers", "0", "--quiet", "--shard-tokens", "5000"]
    data = tmp_path / "data"
    write_parquet_files(data, [tiny_corpus_docs["train"][:40], [""]])  # an empty val document: 1 token (BOS)
    code = run_main(prep_main, ["--source", str(data), "--out", str(tmp_path / "a"), *args])
    err = one_line_error(capsys, code)
    assert "val split holds 1 tokens" in err and "--val-files" in err and "deletes" in err
    assert not (tmp_path / "a" / "train_000000.bin").exists(), "refused before tokenizing train"
    code = run_main(prep_main, ["--source", str(data), "--out", str(tmp_path / "b"), "--max-val-tokens", "100", *args])
    assert "--max-val-tokens 100 is below --min-val-tokens" in one_line_error(capsys, code)


@pytest.mark.parametrize("extra, match", [
    (("--device-batch-size", "8", "--max-seq-len", "1024", "--total-batch-size", "8192"),
     "the val split is too short"),
    (("--max-seq-len", "4096", "--device-batch-size", "16", "--total-batch-size", str(16 * 4096)),
     "train split is too short"),
    (("--eval-tokens", "32"), "--eval_tokens 32 is less than one val batch"),
])
def test_data_too_small_for_the_flags_is_refused_before_the_model(base, no_model, extra, match):
    with pytest.raises(UserError, match=match):
        run_train(base, "--num-iterations", "1", "--model-tag", "small", *extra)
