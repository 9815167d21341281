"""A prep split across hosts (`prep --part I --parts N`, then `prep merge`) is a one-host prep, byte for byte:
the same shards, the same manifest, the same training losses, and a run resumes across the two."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from nanochat_unsloth.cli import normalize_flags
from nanochat_unsloth.common import UserError
from nanochat_unsloth.prep import prep_cli
from nanochat_unsloth.prep.job import PrepConfig, run_prep
from nanochat_unsloth.shards.format import open_shard_tokens, write_shard
from nanochat_unsloth.shards.manifest import ShardManifest
from nanochat_unsloth.train.config import parse_train_args
from nanochat_unsloth.train.loop import train

from conftest import TINY_SHARD_TOKENS
from train_fixtures import TINY_TRAIN_ARGS

PARTS = 3


def _prep_part(corpus: Path, tokenizer: Path, out: Path, part: int, *extra: str) -> int:
    return prep_cli.main(["--source", str(corpus), "--tokenizer-dir", str(tokenizer), "--out", str(out),
                          "--shard-tokens", str(TINY_SHARD_TOKENS), "--workers", "0", "--quiet",
                          "--part", str(part), "--parts", str(PARTS), *extra])


@pytest.fixture(scope="module")
def part_dirs(tmp_path_factory, tiny_corpus_dir, tiny_tokenizer_dir) -> list[Path]:
    root = tmp_path_factory.mktemp("parts")
    dirs = [root / f"part{i}" for i in range(PARTS)]
    for i, d in enumerate(dirs):
        assert _prep_part(tiny_corpus_dir, tiny_tokenizer_dir, d, i) == 0
    return dirs


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.suffix in (".bin", ".json")}


def test_merged_parts_are_the_one_host_prep_byte_for_byte(part_dirs, tiny_shards_dir, tiny_corpus_dir,
                                                          tiny_tokenizer_dir, tmp_path, capsys):
    manifests = [ShardManifest.load(d) for d in part_dirs]
    whole = ShardManifest.load(tiny_shards_dir)
    for split in ("train", "val"):
        # disjoint slices of the rows, in order, together every row
        ranges = [m.source["part"]["rows"][split] for m in manifests]
        assert ranges[0][0] == 0 and ranges[-1][1] == whole.source["rows"][split]
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(ranges, ranges[1:])), ranges
        assert sum(m.totals()[split]["documents"] for m in manifests) == whole.totals()[split]["documents"]
    # the merge has to re-cut: a part's stream does not end on a shard boundary of the whole stream
    assert any(m.totals()["train"]["tokens"] % TINY_SHARD_TOKENS for m in manifests[:-1])

    merged = tmp_path / "merged"
    assert prep_cli.main(["merge", *map(str, part_dirs), "--out", str(merged), "--quiet"]) == 0
    assert "3 parts joined" in capsys.readouterr().out
    # every shard and manifest.json (its shard list, checksums, source and fingerprint) as the one-host prep's
    assert _files(merged) == _files(tiny_shards_dir)

    # `prep` of the whole source into the merged directory finds it complete, as it would its own output
    again = run_prep(PrepConfig(source=str(tiny_corpus_dir), out_dir=merged, tokenizer_dir=tiny_tokenizer_dir,
                                workers=0, shard_tokens=TINY_SHARD_TOKENS, progress=False))
    assert again.already_done
    # and a second merge says so too, without writing
    assert prep_cli.main(["merge", *map(str, part_dirs), "--out", str(merged), "--quiet"]) == 0
    assert "prep merge: already complete" in capsys.readouterr().out
    # --force merges again, as `prep --force` preps again: what was there is deleted first
    (merged / "train_000099.bin").write_bytes(b"stray")
    assert prep_cli.main(["merge", *map(str, part_dirs), "--out", str(merged), "--quiet", "--force"]) == 0
    assert "already complete" not in capsys.readouterr().out
    assert _files(merged) == _files(tiny_shards_dir)


def test_a_run_resumes_from_one_host_shards_onto_merged_ones(part_dirs, tiny_shards_dir, tiny_tokenizer_dir,
                                                             tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_tokenizer_dir, base / "tokenizer")
    shutil.copytree(tiny_shards_dir, base / "shards")
    merged = tmp_path / "merged"
    assert prep_cli.main(["merge", *map(str, part_dirs), "--out", str(merged), "--quiet"]) == 0

    def run(tag: str, shards: Path, *extra: str) -> None:
        train(parse_train_args(normalize_flags(TINY_TRAIN_ARGS + [
            "--base-dir", str(base), "--shards", str(shards), "--num-iterations", "4", "--model-tag", tag, *extra])))

    def losses(tag: str) -> list[float]:
        return [json.loads(line)["loss"] for line in (base / "runs" / tag / "metrics.jsonl").read_text().splitlines()]

    run("one_host", base / "shards")
    run("moved", base / "shards", "--stop-after", "2")
    run("moved", merged, "--resume", "auto")  # the second half on the merged shards, without --force
    # Bitwise: the same tokens in the same windows, the same model and optimizer state; any difference in the
    # stream would change the losses of steps 2-3.
    assert losses("moved") == losses("one_host")
    assert len(losses("one_host")) == 4


def test_split_prep_refusals(part_dirs, tiny_corpus_dir, tiny_tokenizer_dir, tmp_path):
    with pytest.raises(UserError, match=r"part\(s\) 1 of 3 missing; run `nanochat-unsloth prep --part I --parts 3`"):
        prep_cli.main(["merge", str(part_dirs[0]), str(part_dirs[2]), "--out", str(tmp_path / "m")])
    with pytest.raises(UserError, match="both hold part 0 of 3"):
        prep_cli.main(["merge", str(part_dirs[0]), str(part_dirs[0]), "--out", str(tmp_path / "m")])
    with pytest.raises(UserError, match="--max-tokens with --parts 3: where the cap falls depends on every part"):
        _prep_part(tiny_corpus_dir, tiny_tokenizer_dir, tmp_path / "capped", 0, "--max-tokens", "1000")
    with pytest.raises(UserError, match="--part 3 --parts 3: need"):
        _prep_part(tiny_corpus_dir, tiny_tokenizer_dir, tmp_path / "p3", 3)
    # another part's --out is never taken for this part's
    with pytest.raises(UserError, match="its shards are part 0 of 3, not part 1 of 3"):
        _prep_part(tiny_corpus_dir, tiny_tokenizer_dir, part_dirs[0], 1)


def test_a_part_replaced_after_its_check_is_refused_not_merged(part_dirs, tmp_path, monkeypatch):
    """The parts are checksummed before the merge writes; a part re-prepped on its host after that (`prep --force`
    with other flags) must not slip its new tokens into shards the merged manifest then vouches for."""
    parts = [tmp_path / f"p{i}" for i in range(PARTS)]
    for src, dst in zip(part_dirs, parts):
        shutil.copytree(src, dst)
    victim = parts[1] / ShardManifest.load(parts[1]).shards_for("train")[0].file
    original_verify = ShardManifest.verify

    def verify_then_replace(self, shards_dir, *args, **kwargs):
        original_verify(self, shards_dir, *args, **kwargs)
        if Path(shards_dir) == parts[-1]:  # every part checked: now the victim changes under the merge
            tokens = np.array(open_shard_tokens(victim))
            i = int(np.flatnonzero(tokens != tokens[0])[0])  # a text token (tokens[0] is a document's BOS)
            tokens[i] = tokens[i] + 1 if tokens[i] + 1 != tokens[0] else tokens[i] + 2
            write_shard(victim, tokens, self.tokenizer.vocab_size, self.tokenizer.bos_id)

    monkeypatch.setattr(ShardManifest, "verify", verify_then_replace)
    merged = tmp_path / "merged"
    with pytest.raises(UserError, match=rf"{victim.name}: missing or not the shard its part's manifest lists"):
        prep_cli.main(["merge", *map(str, parts), "--out", str(merged), "--quiet"])
    assert not (merged / "manifest.json").exists()


def test_merge_over_an_unreadable_state_file(part_dirs, tmp_path):
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "prep_state.json").write_text("")  # the name kept, the data lost in a crash
    with pytest.raises(UserError, match=r"unreadable prep_state\.json.*--force"):
        prep_cli.main(["merge", *map(str, part_dirs), "--out", str(merged), "--quiet"])
    assert prep_cli.main(["merge", *map(str, part_dirs), "--out", str(merged), "--quiet", "--force"]) == 0


def test_a_part_alone_is_refused_by_the_loader(part_dirs):
    """One part's --out holds a slice of every split: training or evaluating on it (a merge forgotten, each host's
    part written to its own <base>/shards) would read a third of the data as if it were all of it."""
    from nanochat_unsloth.shards.loader import TokenShardLoader

    for split in ("train", "val"):
        with pytest.raises(UserError, match=r"part 1 of 3 of a prep split across hosts.*prep merge"):
            TokenShardLoader(part_dirs[1], split, 2, 16)
