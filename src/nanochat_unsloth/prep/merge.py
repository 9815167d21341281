"""`nanochat-unsloth prep merge`: the parts of a prep split across hosts, joined into the whole prep's shards.

Part I of N (`prep --part I --parts N`) tokenized a contiguous slice of each split's rows, and the slices
follow each other, so a split's whole token stream is the parts' streams one after the other. The merge reads
them in that order and cuts the stream where a one-host prep cuts it (every `shard_tokens` tokens; the last
shard of a split holds the rest). Every shard and manifest.json come out byte for byte as a one-host prep of
the same source writes them: the loader, training and `--resume` cannot tell the two apart, and `prep` on
the merged directory says "already complete".

Each part is checksummed before anything is written. The merge holds --out's prep lock, writes the state
file of a prep that has written nothing yet (an interrupted merge is simply run again), every shard
atomically, then the manifest, then removes the state. It reads no source file and no tokenizer: the parts'
manifests carry all it needs.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from nanochat_unsloth.common import FlagParser, UserError, atomic_write_json, get_base_dir, hold_lock, make_dirs
from nanochat_unsloth.prep.job import (LOCK_NAME, MANIFEST_SOURCE_KEYS, MIN_VAL_TOKENS, OWNED, PART_KEY, PARTS_DIR,
                                       SPLIT_ORDER, STATE_NAME, _fingerprint_sha, fresh_state, manifest_source,
                                       read_state, whole_fingerprint)
from nanochat_unsloth.shards.format import HEADER_BYTES, write_shard
from nanochat_unsloth.shards.manifest import MANIFEST_NAME, ShardEntry, ShardManifest


@dataclass
class MergeResult:
    out_dir: Path
    manifest: ShardManifest
    parts: int
    seconds: float
    already_done: bool = False


def load_parts(part_dirs: list[Path]) -> list[tuple[Path, ShardManifest]]:
    """The parts' directories and manifests in part order, checked to be every part of one prep, once each."""
    if not part_dirs:
        raise UserError("prep merge: no part directories given (and none under <base>/shard_parts); pass the --out "
                        "of every `prep --part I --parts N`")
    loaded = []
    for d in part_dirs:
        d = Path(d).expanduser().resolve()
        m = ShardManifest.load(d)
        part = m.source.get(PART_KEY)
        if part is None:
            raise UserError(f"{d}: holds a whole prep, not a part of one; `prep merge` joins the --out directories "
                            "of `prep --part I --parts N`")
        loaded.append((d, m, part))
    d0, m0, p0 = loaded[0]
    by_index: dict[int, Path] = {}
    for d, m, part in loaded:
        if part["count"] != p0["count"]:
            raise UserError(f"{d}: part {part['index']} of {part['count']}, but {d0} is part of {p0['count']}; "
                            "merge the parts of one split")
        if part["whole_fingerprint_sha256"] != p0["whole_fingerprint_sha256"]:
            raise UserError(f"{d}: a part of another prep than {d0} (another source, tokenizer or options); "
                            "merge the parts of one prep, made with the same flags")
        if part["index"] in by_index:
            raise UserError(f"{d} and {by_index[part['index']]}: both hold part {part['index']} of {part['count']}; "
                            "pass each part once")
        by_index[part["index"]] = d
    missing = [i for i in range(p0["count"]) if i not in by_index]
    if missing:
        names = ", ".join(map(str, missing))
        raise UserError(f"prep merge: part(s) {names} of {p0['count']} missing; run `nanochat-unsloth prep --part I "
                        f"--parts {p0['count']}` (with the same flags) for each and pass its --out")
    return [(d, m) for d, m, _ in sorted(loaded, key=lambda x: x[2]["index"])]


def _whole(parts: list[tuple[Path, ShardManifest]]) -> tuple[dict, dict, str]:
    """(the source's describe(), the whole prep's fingerprint, its sha256), rebuilt from part 0's manifest and
    checked against the sha256 every part recorded (a part written by another prep version fails here)."""
    d0, m0 = parts[0]
    described = {k: v for k, v in m0.source.items() if k not in (*MANIFEST_SOURCE_KEYS, PART_KEY)}
    fingerprint = whole_fingerprint(asdict(m0.tokenizer), described, m0.shard_tokens, m0.source.get("max_tokens"),
                                    m0.source.get("max_val_tokens"))
    sha = _fingerprint_sha(fingerprint)
    if sha != m0.source[PART_KEY]["whole_fingerprint_sha256"]:
        raise UserError(f"{d0}: its manifest does not describe the prep it says it is a part of (written by another "
                        "version?); prep the parts again with this version")
    return described, fingerprint, sha


def _prepare_out(out: Path, sha: str, force: bool, progress: bool) -> ShardManifest | None:
    """-> the finished merge already in --out (verified), or None after clearing --out for a new one."""
    manifest_path, state_path = out / MANIFEST_NAME, out / STATE_NAME
    if manifest_path.exists():
        try:
            existing = ShardManifest.load(out)
        except UserError:
            existing = None
        same = existing is not None and existing.source.get("prep_fingerprint_sha256") == sha
        if same and not force:  # --force deletes even a finished merge of these parts, as `prep --force` does
            try:
                existing.verify(out, checksums=True, progress=progress)
            except UserError as e:
                raise UserError(f"{e} (pass --force to delete {out}'s shards and merge again)") from None
            return existing
        if not same and not force:
            raise UserError(f"--out {out}: holds the shards of another prep; pass --force to delete them, or choose "
                            "another --out")
    elif state_path.exists() and not force:  # --force deletes it unread: it may be what is broken
        state = read_state(state_path)
        if state is None:
            raise UserError(f"--out {out}: holds an unfinished prep with an unreadable {STATE_NAME}; pass --force to "
                            "delete its shards, or choose another --out")
        if state.get("fingerprint_sha256") != sha:
            raise UserError(f"--out {out}: holds an unfinished prep of something else; pass --force to delete its "
                            "shards, or choose another --out")
    elif any(OWNED.match(p.name) and p.suffix == ".bin" for p in out.iterdir()) and not force:
        raise UserError(f"--out {out}: holds shards without a manifest.json or prep_state.json, so their origin is "
                        "unknown; pass --force to delete them, or choose another --out")
    for path in out.iterdir():
        if OWNED.match(path.name) and path.is_file():
            path.unlink()
    return None


def _part_tokens(path: Path, sha256: str) -> np.ndarray:
    """A part's shard as read now, checked against the sha256 its part's manifest lists. The parts were checked
    before the merge began, but a part re-prepped since on its host (`prep --force`) would otherwise slip other
    tokens into shards that the merged manifest, checksumming what it wrote, then vouches for."""
    try:
        raw = path.read_bytes()  # one read: what is checked is what is merged (a rename cannot swap it midway)
    except FileNotFoundError:
        raw = b""
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise UserError(f"{path}: missing or not the shard its part's manifest lists (replaced since the merge "
                        "checked it: is that part being prepped again?); let that prep finish, then merge again")
    return np.frombuffer(raw, dtype="<u2", offset=HEADER_BYTES)


def merge_parts(part_dirs: list[Path], out: Path, min_val_tokens: int = MIN_VAL_TOKENS, force: bool = False,
                progress: bool = True) -> MergeResult:
    from tqdm import tqdm

    t0 = time.time()
    parts = load_parts(part_dirs)
    described, fingerprint, sha = _whole(parts)
    out = Path(out).expanduser().resolve()
    if any(out == d for d, _ in parts):
        raise UserError(f"--out {out}: is one of the parts; merge into another directory")
    for d, m in parts:  # sha256 and token ids of every part before a byte is written
        m.verify(d, checksums=True, progress=progress)
    make_dirs(out, "--out")
    lock = hold_lock(out / LOCK_NAME, f"--out {out}", "wait for that prep or merge to finish, or choose another --out")
    try:
        done = _prepare_out(out, sha, force, progress)
        if done is not None:
            return MergeResult(out, done, len(parts), time.time() - t0, already_done=True)
        atomic_write_json(out / STATE_NAME, fresh_state(fingerprint))
        m0 = parts[0][1]
        vocab, bos, size = m0.tokenizer.vocab_size, m0.tokenizer.bos_id, m0.shard_tokens
        entries: list[ShardEntry] = []
        total = sum(e.tokens for _, m in parts for e in m.shards)
        bar = tqdm(total=total, unit="tok", unit_scale=True, desc="prep merge", disable=not progress,
                   dynamic_ncols=True, mininterval=0.5)
        try:
            for split in SPLIT_ORDER:
                buf = np.empty(size, dtype=np.uint16)
                fill = 0

                def flush() -> None:
                    nonlocal fill
                    name = f"{split}_{sum(e.split == split for e in entries):06d}.bin"
                    info = write_shard(out / name, buf[:fill], vocab, bos)
                    # every document starts with the BOS token and no text encodes to it: the documents that
                    # start in the shard, as the prep counts them
                    entries.append(ShardEntry(name, split, info.tokens, int(np.count_nonzero(buf[:fill] == bos)),
                                              info.sha256))
                    fill = 0

                for d, m in parts:
                    for entry in m.shards_for(split):
                        tokens = _part_tokens(d / entry.file, entry.sha256)
                        pos = 0
                        while pos < len(tokens):
                            take = min(size - fill, len(tokens) - pos)
                            buf[fill:fill + take] = tokens[pos:pos + take]
                            fill, pos = fill + take, pos + take
                            if fill == size:
                                flush()
                            bar.update(take)
                        del tokens  # one part shard in memory at a time
                if fill:
                    flush()
        finally:
            bar.close()
        merged = ShardManifest(
            tokenizer=m0.tokenizer,
            source=manifest_source(described, m0.source.get("max_tokens"), m0.source.get("max_val_tokens"),
                                   {s: sum(m.source["skipped_rows"][s] for _, m in parts) for s in SPLIT_ORDER}, sha),
            shard_tokens=size,
            shards=entries,
        )
        for split, counts in merged.totals().items():  # nothing lost or counted twice between the parts
            want = [sum(m.totals()[split][k] for _, m in parts) for k in ("tokens", "documents")]
            if [counts["tokens"], counts["documents"]] != want:
                raise UserError(f"prep merge: the merged {split} split holds {counts['tokens']:,} tokens / "
                                f"{counts['documents']:,} documents, the parts {want[0]:,} / {want[1]:,}; a part's "
                                "shards are not what its manifest says, prep that part again")
        val_tokens = merged.totals()["val"]["tokens"]
        if val_tokens < min_val_tokens:
            raise UserError(f"prep merge: the val split holds {val_tokens:,} tokens, fewer than --min-val-tokens "
                            f"{min_val_tokens:,}, too few to evaluate on; prep the parts with more val data "
                            "(--val-files)")
        merged.save(out)
        (out / STATE_NAME).unlink(missing_ok=True)
        return MergeResult(out, merged, len(parts), time.time() - t0)
    finally:
        lock.release()


def summary_line(result: MergeResult) -> str:
    totals = result.manifest.totals()
    held = ", ".join(f"{split} {totals[split]['tokens']:,} tokens / {totals[split]['documents']:,} docs in "
                     f"{totals[split]['shards']} shard(s)" for split in ("train", "val"))
    head = "prep merge: already complete" if result.already_done else \
        f"prep merge: {result.parts} parts joined in {result.seconds:.1f}s"
    return f"{head}: {held}; {result.out_dir / MANIFEST_NAME}"


def main(argv: list[str]) -> int:
    parser = FlagParser(prog="nanochat-unsloth prep merge", description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", metavar="PART_DIR",
                        help=f"the --out of every `prep --part I --parts N` (default: <base>/{PARTS_DIR}/part_*)")
    parser.add_argument("--base-dir", default=None, help="default: $NANOCHAT_BASE_DIR or ~/.cache/nanochat")
    parser.add_argument("--out", default=None, help="the merged shard directory (default: <base>/shards)")
    parser.add_argument("--min-val-tokens", type=int, default=MIN_VAL_TOKENS,
                        help=f"refuse a merged val split smaller than this (default {MIN_VAL_TOKENS:,})")
    parser.add_argument("--force", action="store_true", help="DELETE the shards already in --out and merge")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, only the summary")
    args = parser.parse_args(argv)
    base = get_base_dir(args.base_dir)
    part_dirs = [Path(p) for p in args.parts] or sorted((base / PARTS_DIR).glob("part_*_of_*"))
    result = merge_parts(part_dirs, Path(args.out) if args.out else base / "shards",
                         min_val_tokens=args.min_val_tokens, force=args.force, progress=not args.quiet)
    print(summary_line(result))
    return 0
