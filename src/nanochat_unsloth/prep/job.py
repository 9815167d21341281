"""The prep job: documents -> `<|bos|>` + encode_ordinary(text), back to back -> uint16 token shards.

One writer (this process) consumes the tokenized batches strictly in source order, so the bytes of
every shard and of manifest.json depend only on the source, the tokenizer and the shard options,
never on the number of workers or on interruptions:

  * each split ("val" first, then "train") is one token stream cut into shards of exactly
    `shard_tokens` tokens (the split's last shard holds the rest); documents may span shards;
  * a shard appears only by rename, and after each one `prep_state.json` records the finished
    shards and the resume cursor (split, row, token offset inside that row's document);
  * a re-run with the same fingerprint skips to the cursor (parquet: by row-group metadata,
    without reading text) and continues; manifest.json is written last, then the state removed.

The fingerprint holds what decides the tokens (source files, tokenizer, options), not where they
live: a moved or copied base dir re-preps as "already complete". One prep at a time per --out
(an advisory lock, `.prep.lock`); a val split too small to evaluate on is refused before the train
split is tokenized.

Split across hosts (`--part I --parts N`): part I takes rows [I*R/N, (I+1)*R/N) of each split's R rows,
so the parts' token streams, one after the other, are the whole prep's stream. Each part writes its own
--out; `prep merge` (prep/merge.py) cuts the parts' streams into the whole prep's shards, byte for byte,
and writes the manifest a one-host prep would have written.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from nanochat_unsloth.common import UserError, atomic_write_json, hold_lock, make_dirs, read_json
from nanochat_unsloth.prep.sources import DEFAULT_VAL_DOCS, DEFAULT_VAL_FILES, Source, open_source
from nanochat_unsloth.tokenizer import TOKENIZER_PKL, bos_id, check_token_bytes, load_tokenizer
from nanochat_unsloth.shards.format import check_vocab_fits, read_shard_header, write_shard
from nanochat_unsloth.shards.manifest import MANIFEST_NAME, ShardEntry, ShardManifest, TokenizerFingerprint

STATE_NAME = "prep_state.json"
DATA_VERSION = "data_version"  # prep_state.json: a streamed source's `data_version()` when the prep began
SPLIT_ORDER = ("val", "train")  # val first: it is small, and then a --max-tokens run is ready to train on early
DONE = "done"
PREP_VERSION = 1  # bump when the token stream for the same inputs would change
# Files prep owns in --out (what --force may delete): shards, manifest, state, and their temp files.
OWNED = re.compile(r"^\.?((train|val)_\d{6}\.bin|manifest\.json|prep_state\.json)(\..*\.tmp)?$")
LOCK_NAME = ".prep.lock"
# one 2048-token sequence + its shifted target: less val than this cannot evaluate nanochat's default context
MIN_VAL_TOKENS = 2049
# describe() keys that say where the source lives, not what it holds: not part of the fingerprint
LOCATION_KEYS = ("path", "description")
PART_KEY = "part"  # the manifest's source["part"] of one part of a split prep (absent in a whole prep)
PARTS_DIR = "shard_parts"  # <base>/shard_parts/part_III_of_NNN: the parts of a prep split across hosts


def part_rows(rows: int, part: int, parts: int) -> tuple[int, int]:
    """Rows [begin, end) of a split of `rows` rows that part `part` of `parts` tokenizes: contiguous, disjoint,
    together all rows, in order; sizes differ by at most one."""
    return rows * part // parts, rows * (part + 1) // parts


@dataclass
class PrepConfig:
    source: str  # a parquet directory (nanochat layout) or hf:NAME
    out_dir: Path  # where shards + manifest.json go, usually <base>/shards
    tokenizer_dir: Path  # holds tokenizer.pkl, usually <base>/tokenizer
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)  # 0: tokenize in this process
    shard_tokens: int = 100_000_000  # tokens per shard, except the last of each split
    max_tokens: int | None = None  # cap on train tokens (None: the whole train split)
    max_val_tokens: int | None = None  # cap on val tokens (None: the whole val split)
    min_val_tokens: int = MIN_VAL_TOKENS  # refuse a val split smaller than this (before tokenizing train)
    val_files: int = DEFAULT_VAL_FILES  # parquet dir: the last K files are val
    val_docs: int = DEFAULT_VAL_DOCS  # hf: the first N documents of the stream are val
    hf_config: str | None = None
    hf_data_files: str | list[str] | None = None
    force: bool = False  # delete what --out holds (even a complete prep of the same inputs) and prep from scratch
    progress: bool = True  # tqdm bars on stderr
    batch_chars: int = 1 << 20  # text per task handed to a worker; does not change the output
    stop_after_shards: int | None = None  # return after writing this many shards (simulated interruption)
    part: int = 0  # which slice of the source's rows this host tokenizes (see part_rows) ...
    parts: int = 1  # ... of how many; `prep merge` joins the parts' outputs


@dataclass
class PrepResult:
    complete: bool  # False only when stopped by stop_after_shards
    out_dir: Path
    manifest: ShardManifest | None
    shards_written: int  # by this run
    tokens_written: int  # by this run
    skipped_rows: dict
    seconds: float
    already_done: bool = False
    deleted: int = 0  # files of an earlier prep that --force deleted before starting over


class _Stop(Exception):
    pass


# ---------------------------------------------------------------------------------------------------
# Tokenization, in worker processes (or in this process when workers == 0)

_enc = None
_bos = None


def _init_encoder(tokenizer_bytes: bytes) -> None:
    import pickle

    global _enc, _bos
    _enc = pickle.loads(tokenizer_bytes)
    _bos = bos_id(_enc)


def _encode_batch(texts: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """-> (length of each row's token sequence incl. BOS, -1 for a null/non-text row; all tokens, uint16).

    Same tokens as `encode_ordinary_batch`, but a plain loop: with num_threads=1 that function still
    hands every document to a thread-pool thread and back, which is slower (docs/perf-log/2026-11-23.md,
    "Prep throughput"); the processes are the parallelism.
    """
    encode, bos = _enc.encode_ordinary, _bos
    lengths = np.full(len(texts), -1, dtype=np.int64)
    flat: list[int] = []
    for i, text in enumerate(texts):
        if isinstance(text, str):
            ids = encode(text)
            lengths[i] = len(ids) + 1
            flat.append(bos)
            flat.extend(ids)
    return lengths, np.array(flat, dtype=np.uint16)


def _batches(source: Source, split: str, start_doc: int, batch_chars: int,
             end_doc: int | None = None) -> Iterator[tuple[int, list]]:
    """(first row index, rows) in order from `start_doc` up to `end_doc` (None: the split's end), each batch
    about batch_chars characters."""
    row, rows, chars = start_doc, [], 0
    documents = source.iter_documents(split, start_doc)
    if end_doc is not None:
        documents = itertools.islice(documents, max(0, end_doc - start_doc))
    for text in documents:
        rows.append(text)
        chars += len(text) if isinstance(text, str) else 0
        if chars >= batch_chars or len(rows) >= 8192:
            yield row, rows
            row, rows, chars = row + len(rows), [], 0
    if rows:
        yield row, rows


def _encoded(pool, batches: Iterator[tuple[int, list]], in_flight: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Results in submission order, with at most `in_flight` batches queued (Pool.imap would read the
    whole source ahead into memory)."""
    if pool is None:
        for row0, rows in batches:
            yield (row0, *_encode_batch(rows))
        return
    pending: collections.deque = collections.deque()
    for row0, rows in batches:
        pending.append((row0, pool.apply_async(_encode_batch, (rows,))))
        if len(pending) >= in_flight:
            row, res = pending.popleft()
            yield (row, *res.get())
    while pending:
        row, res = pending.popleft()
        yield (row, *res.get())


# ---------------------------------------------------------------------------------------------------
# The job


def _check_part(config: PrepConfig) -> None:
    """--part/--parts: in range, and only where a part's rows are known before reading (one line otherwise)."""
    if config.parts < 1 or not 0 <= config.part < config.parts:
        raise UserError(f"--part {config.part} --parts {config.parts}: need --parts 1 or more and "
                        "0 <= --part < --parts (parts are numbered from 0)")
    if config.parts == 1:
        return
    if config.source.startswith("hf:"):
        raise UserError(f"--parts {config.parts}: a streamed hf: source's row count is unknown until it is read, so "
                        "it cannot be split; download it as parquet files (nanochat's `python -m nanochat.dataset`) "
                        "and prep that directory, or prep it on one host")
    for name in ("max_tokens", "max_val_tokens"):
        if getattr(config, name) is not None:
            raise UserError(f"--{name.replace('_', '-')} with --parts {config.parts}: where the cap falls depends on "
                            "every part before it; split the prep without a cap, or prep on one host")


def _fingerprint_sha(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def whole_fingerprint(tokenizer: dict, described: dict, shard_tokens: int, max_tokens: int | None,
                      max_val_tokens: int | None) -> dict:
    """What decides a whole prep's tokens (recorded by its state file; its sha256 by its manifest)."""
    return {
        "prep_version": PREP_VERSION,
        "tokenizer": tokenizer,
        "source": {k: v for k, v in described.items() if k not in LOCATION_KEYS},
        "shard_tokens": shard_tokens,
        "max_tokens": max_tokens,
        "max_val_tokens": max_val_tokens,
    }


MANIFEST_SOURCE_KEYS = ("max_tokens", "max_val_tokens", "skipped_rows", "prep_fingerprint_sha256")


def manifest_source(described: dict, max_tokens: int | None, max_val_tokens: int | None, skipped_rows: dict,
                    fingerprint_sha: str) -> dict:
    """The manifest's `source`: the source's describe() plus these MANIFEST_SOURCE_KEYS."""
    return {
        **described,
        "max_tokens": max_tokens,
        "max_val_tokens": max_val_tokens,
        "skipped_rows": skipped_rows,  # null / non-string rows are skipped, not fatal: see _run_split
        "prep_fingerprint_sha256": fingerprint_sha,
    }


def read_state(path: Path) -> dict | None:
    """prep_state.json, or None when it is not a JSON object (a file system that kept the name but lost the
    data in a crash): the caller refuses naming --force, which deletes it unread."""
    try:
        state = read_json(path, "prep progress file")
    except UserError:
        return None
    return state if isinstance(state, dict) else None


def fresh_state(fingerprint: dict, first_doc: int = 0) -> dict:
    """prep_state.json of a prep that has written nothing yet."""
    return {"fingerprint_sha256": _fingerprint_sha(fingerprint), "fingerprint": fingerprint, "shards": [],
            "cursor": {"split": SPLIT_ORDER[0], "doc": first_doc, "offset": 0},
            "skipped_rows": {s: 0 for s in SPLIT_ORDER}}


class PrepJob:
    def __init__(self, config: PrepConfig):
        self.cfg = config
        for name in ("shard_tokens", "max_tokens", "max_val_tokens", "batch_chars", "min_val_tokens"):
            value = getattr(config, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} {value}: must be a positive number")
        if config.max_val_tokens is not None and config.max_val_tokens < config.min_val_tokens:
            raise UserError(f"--max-val-tokens {config.max_val_tokens:,} is below --min-val-tokens "
                            f"{config.min_val_tokens:,}: too little val data to evaluate on; raise --max-val-tokens")
        if config.workers < 0:
            raise UserError(f"--workers {config.workers}: must be 0 (tokenize in this process) or more")
        _check_part(config)
        self.out = Path(config.out_dir).expanduser().resolve()
        # Tokenizer first: it is the cheapest thing to get wrong and the message says what to run.
        self.tok_path = Path(config.tokenizer_dir).expanduser().resolve() / TOKENIZER_PKL
        self.enc = load_tokenizer(self.tok_path.parent)
        self.tokenizer_bytes = self.tok_path.read_bytes()
        check_vocab_fits(self.enc.n_vocab, where=str(self.tok_path))
        self.tokenizer = TokenizerFingerprint(
            sha256=hashlib.sha256(self.tokenizer_bytes).hexdigest(), vocab_size=self.enc.n_vocab, bos_id=bos_id(self.enc)
        )
        # shards of a half-replaced tokenizer dir would be refused by train later: refuse them now
        check_token_bytes(self.tok_path.parent, self.enc, self.tokenizer.sha256)
        self.source = open_source(
            config.source,
            val_files=config.val_files,
            val_docs=config.val_docs,
            hf_config=config.hf_config,
            hf_data_files=config.hf_data_files,
        )
        self.described = described = self.source.describe()
        self.fingerprint = whole_fingerprint(asdict(self.tokenizer), described, config.shard_tokens,
                                             config.max_tokens, config.max_val_tokens)
        # a part's fingerprint is the whole prep's plus which part: its --out is never taken for the whole
        self.whole_fingerprint, self.whole_fingerprint_sha = self.fingerprint, _fingerprint_sha(self.fingerprint)
        self.rows = {split: (0, None) for split in SPLIT_ORDER}  # [begin, end) of each split; None: to its end
        if config.parts > 1:
            self.rows = {split: part_rows(self.source.num_documents(split), config.part, config.parts)
                         for split in SPLIT_ORDER}
            self.fingerprint = {**self.fingerprint, PART_KEY: {"index": config.part, "count": config.parts}}
        self.fingerprint_sha = _fingerprint_sha(self.fingerprint)
        # what preps before the location left the fingerprint recorded: still "the same prep" here
        self.legacy_fingerprint_sha = _fingerprint_sha({**self.fingerprint, "source": described})

    def _same_prep(self, sha: str | None) -> bool:
        return sha in (self.fingerprint_sha, self.legacy_fingerprint_sha)

    # ---- what is already in --out ---------------------------------------------------------------
    def _difference(self, tokenizer: dict, source: dict, options: dict, part: dict | None = None) -> str:
        mine_part = self.fingerprint.get(PART_KEY)
        if part is not None:
            part = {"index": part.get("index"), "count": part.get("count")}
        if part != mine_part:
            def name(p):
                return f"part {p['index']} of {p['count']}" if p else "a whole prep (no --parts)"
            return f"are {name(part)}, not {name(mine_part)}"
        if tokenizer.get("sha256") != self.tokenizer.sha256:
            return (f"were made with another tokenizer (sha256 {str(tokenizer.get('sha256'))[:12]}, "
                    f"not {self.tok_path}'s {self.tokenizer.sha256[:12]})")
        mine = self.fingerprint["source"]
        if {k: source.get(k) for k in mine} != mine:
            return f"come from another source ({source.get('description', '?')})"
        diffs = [f"--{k.replace('_', '-')} {options.get(k)} (this run: {self.fingerprint[k]})"
                 for k in ("shard_tokens", "max_tokens", "max_val_tokens") if options.get(k) != self.fingerprint[k]]
        if not diffs and source.get("path") not in (None, self.described.get("path")):
            return (f"were made from the same files at {source['path']} by an older version, whose fingerprint "
                    "included that path")
        return f"were made with other options: {', '.join(diffs) or 'another prep version'}"

    def _refuse(self, why: str, whose: str = "its shards") -> None:
        raise UserError(
            f"--out {self.out}: {whose} {why}; pass --force to delete them and start over, "
            "or choose another --out"
        )

    def _check_val_size(self, val_tokens: int) -> None:
        if val_tokens >= self.cfg.min_val_tokens:
            return
        hf = self.fingerprint["source"].get("kind") == "hf"
        more = "--val-docs" if hf else "--val-files (or a val file with text)"
        raise UserError(
            f"--out {self.out}: the val split holds {val_tokens:,} tokens, fewer than --min-val-tokens "
            f"{self.cfg.min_val_tokens:,}, too few to evaluate on; give more val data with {more} or a higher "
            "--max-val-tokens, then re-run with --force (which deletes the shards this prep wrote)")

    def _clear_out_dir(self) -> int:
        """Delete prep's own files in --out (shards, manifest, state); -> how many shards and manifests went."""
        deleted = 0
        for path in self.out.iterdir():
            if OWNED.match(path.name) and path.is_file():
                path.unlink()
                deleted += not path.name.startswith(".")  # temp files are not counted
        return deleted

    def _load_existing(self) -> dict | None:
        """-> the state to resume from, a fresh state, or None when --out already holds this exact prep."""
        fresh = fresh_state(self.fingerprint, self.rows[SPLIT_ORDER[0]][0])
        # a streamed source's data version: a resume must read the rows the interrupted run counted
        fresh[DATA_VERSION] = self.data_version = getattr(self.source, "data_version", lambda: None)()
        self.out.mkdir(parents=True, exist_ok=True)
        manifest_path, state_path = self.out / MANIFEST_NAME, self.out / STATE_NAME
        if manifest_path.exists():
            try:
                manifest = ShardManifest.load(self.out)
                same = self._same_prep(manifest.source.get("prep_fingerprint_sha256"))
            except UserError:
                manifest, same = None, False
            if same and not self.cfg.force:
                try:  # sizes, headers, sha256 and token ids: "already complete" means intact
                    manifest.verify(self.out, checksums=True, progress=self.cfg.progress)
                except UserError as e:
                    raise UserError(f"{e} (pass --force to delete {self.out}'s shards and prep again "
                                    "from scratch)") from None
                self.manifest = manifest
                state_path.unlink(missing_ok=True)  # a crash between manifest and state removal
                return None
            if not same and not self.cfg.force:
                if manifest is None:
                    self._refuse("have an unreadable manifest.json")
                options = {k: manifest.source.get(k) for k in ("max_tokens", "max_val_tokens")}
                options["shard_tokens"] = manifest.shard_tokens
                self._refuse(self._difference(asdict(manifest.tokenizer), manifest.source, options,
                                              manifest.source.get(PART_KEY)))
        elif state_path.exists() and not self.cfg.force:  # --force deletes it unread: it may be what is broken
            state = read_state(state_path)
            if state is None:
                self._refuse(f"have an unreadable {STATE_NAME}", whose="the shards of its unfinished prep")
            if self._same_prep(state.get("fingerprint_sha256")):
                if state.get(DATA_VERSION, self.data_version) != self.data_version:
                    self._refuse("were made from another version of the data than --source reads now (its files "
                                 "changed since this prep began), so resuming would join two versions' documents",
                                 whose="the shards of its unfinished prep")
                self._check_finished_shards(state)
                return state
            fp = state.get("fingerprint", {})
            options = {k: fp.get(k) for k in ("shard_tokens", "max_tokens", "max_val_tokens")}
            self._refuse(self._difference(fp.get("tokenizer", {}), fp.get("source", {}), options, fp.get(PART_KEY)),
                         whose="the shards of its unfinished prep")
        elif any(OWNED.match(p.name) and p.suffix == ".bin" for p in self.out.iterdir()) and not self.cfg.force:
            self._refuse("have no manifest.json or prep_state.json, so their origin is unknown")
        self.deleted = self._clear_out_dir()
        return fresh

    def _check_finished_shards(self, state: dict) -> None:
        """The shards the state lists as finished are still there, whole (header against size and count): the
        manifest will list them without reading them again, so a shard deleted or cut short since (an `rm *.bin`
        that kept the state) would be named by a manifest the loader then refuses."""
        for entry in state["shards"]:
            path = self.out / entry["file"]
            try:
                header = read_shard_header(path)
                intact = (header.ntok, header.vocab_size, header.bos_id) == (
                    entry["tokens"], self.tokenizer.vocab_size, self.tokenizer.bos_id)
            except UserError:
                intact = False
            if not intact:
                raise UserError(f"--out {self.out}: {STATE_NAME} lists {entry['file']} as finished, but it is missing "
                                "or not the shard prep wrote there (deleted or cut short?); pass --force to delete "
                                "this --out's shards and prep from scratch, or choose another --out")

    # ---- running --------------------------------------------------------------------------------
    def run(self) -> PrepResult:
        make_dirs(self.out, "--out")
        lock = hold_lock(self.out / LOCK_NAME, f"--out {self.out}",
                         "wait for that prep to finish (or stop it), or choose another --out")
        try:
            return self._run()
        finally:
            lock.release()

    def _run(self) -> PrepResult:
        t0 = time.time()
        self.deleted = 0
        state = self._load_existing()
        if state is None:
            m = self.manifest
            return PrepResult(True, self.out, m, 0, 0, m.source.get("skipped_rows", {}), time.time() - t0, already_done=True)
        # leftovers of a killed run: temp files never renamed into place
        for path in self.out.iterdir():
            if path.name.startswith(".") and path.name.endswith(".tmp") and OWNED.match(path.name):
                path.unlink()
        self.state = state
        self.written_shards = self.written_tokens = 0
        self.t0 = t0
        ctx = mp.get_context("spawn")  # no fork: the parent may hold threads (tqdm, torch, rayon)
        pool = None
        if self.cfg.workers > 0:
            pool = ctx.Pool(self.cfg.workers, initializer=_init_encoder, initargs=(self.tokenizer_bytes,))
        else:
            _init_encoder(self.tokenizer_bytes)
        try:
            while state["cursor"]["split"] != DONE:
                # val is done: refuse it now, not at a final eval (a part's share of val: at the merge)
                if state["cursor"]["split"] != "val" and self.cfg.parts == 1:
                    self._check_val_size(sum(e["tokens"] for e in state["shards"] if e["split"] == "val"))
                self._run_split(pool)
        except _Stop:
            return PrepResult(False, self.out, None, self.written_shards, self.written_tokens,
                              dict(state["skipped_rows"]), time.time() - t0, deleted=self.deleted)
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
        if not any(e["split"] == "train" and e["tokens"] for e in state["shards"]):
            skipped = state["skipped_rows"]["train"]
            raise UserError(
                f"--source {self.described.get('description', self.cfg.source)}: its train split holds no text "
                f"({skipped:,} row(s) skipped, all null, non-text or not valid UTF-8), so there is nothing to train "
                "on; point --source at documents in a string 'text' column")
        manifest = ShardManifest(
            tokenizer=self.tokenizer,
            source={
                **manifest_source(self.described, self.cfg.max_tokens, self.cfg.max_val_tokens,
                                  dict(state["skipped_rows"]), self.fingerprint_sha),
                # a part: what `prep merge` needs to check the parts and write the whole prep's manifest
                **({PART_KEY: {"index": self.cfg.part, "count": self.cfg.parts, "rows": self.rows,
                               "whole_fingerprint_sha256": self.whole_fingerprint_sha}} if self.cfg.parts > 1 else {}),
            },
            shard_tokens=self.cfg.shard_tokens,
            shards=[ShardEntry(**e) for e in state["shards"]],
        )
        manifest.save(self.out)
        (self.out / STATE_NAME).unlink(missing_ok=True)
        return PrepResult(True, self.out, manifest, self.written_shards, self.written_tokens,
                          dict(state["skipped_rows"]), time.time() - t0, deleted=self.deleted)

    def _save_state(self) -> None:
        atomic_write_json(self.out / STATE_NAME, self.state)

    def _run_split(self, pool) -> None:
        """Continue the cursor's split to its end (or cap), writing shards; then move the cursor on."""
        from tqdm import tqdm

        cfg, state = self.cfg, self.state
        split, start_doc, drop = state["cursor"]["split"], state["cursor"]["doc"], state["cursor"]["offset"]
        cap = cfg.max_tokens if split == "train" else cfg.max_val_tokens
        done_entries = [e for e in state["shards"] if e["split"] == split]
        written = sum(e["tokens"] for e in done_entries)  # tokens of this split already in finished shards
        skipped = state["skipped_rows"][split]  # bad rows before the cursor
        buf = np.empty(cfg.shard_tokens, dtype=np.uint16)
        fill = shard_docs = 0
        capped = False

        def flush(cursor: dict, skipped_below: int) -> None:
            nonlocal fill, shard_docs, written
            name = f"{split}_{len([e for e in state['shards'] if e['split'] == split]):06d}.bin"
            info = write_shard(self.out / name, buf[:fill], self.tokenizer.vocab_size, self.tokenizer.bos_id)
            state["shards"].append(asdict(ShardEntry(name, split, info.tokens, shard_docs, info.sha256)))
            state["cursor"], state["skipped_rows"][split] = cursor, skipped_below
            self._save_state()
            written += fill
            self.written_tokens += fill
            self.written_shards += 1
            fill = shard_docs = 0
            if cfg.stop_after_shards is not None and self.written_shards >= cfg.stop_after_shards:
                raise _Stop

        first_doc, end_doc = self.rows[split]
        total_docs = self.source.num_documents(split) if end_doc is None else end_doc - first_doc
        done_docs = start_doc - first_doc
        bar = tqdm(total=total_docs, initial=min(done_docs, total_docs or done_docs), unit="doc",
                   desc=f"prep {split}" + (f" (part {cfg.part} of {cfg.parts})" if cfg.parts > 1 else ""),
                   disable=not cfg.progress, dynamic_ncols=True, mininterval=0.5)
        in_flight = max(2, 4 * cfg.workers)
        try:
            batches = _batches(self.source, split, start_doc, cfg.batch_chars, end_doc)
            for row0, lengths, tokens in _encoded(pool, batches, in_flight):
                # Null or non-string rows are skipped and counted (summary + manifest), not fatal: web
                # dumps carry the odd empty record, and dying hours into a 100B-token prep over one is
                # worse than dropping it; emitting a bare BOS would teach the model an empty document.
                # Row numbers still count them, so resuming is unaffected.
                valid = lengths >= 0
                vrows = row0 + np.flatnonzero(valid)
                vlen = lengths[valid]
                vstart = np.cumsum(vlen) - vlen - drop  # where each valid row's tokens start in `tokens`
                if drop:  # resuming inside a document: its first `drop` tokens are in the last shard
                    tokens, drop = tokens[drop:], 0
                total = len(tokens)
                if cap is not None and written + fill + total >= cap:
                    total, capped = cap - written - fill, True

                def cursor_after(pos: int) -> tuple[dict, int]:
                    """Cursor just past token `pos - 1`, and the bad rows before it (both independent of batching)."""
                    j = int(np.searchsorted(vstart, pos - 1, side="right")) - 1
                    doc, offset = int(vrows[j]), int(pos - vstart[j])
                    if offset == vlen[j]:
                        doc, offset = doc + 1, 0
                    bad_below = int(np.count_nonzero(~valid[: doc - row0]))
                    return {"split": split, "doc": doc, "offset": offset}, skipped + bad_below

                pos = 0
                while pos < total:
                    take = min(cfg.shard_tokens - fill, total - pos)
                    buf[fill:fill + take] = tokens[pos:pos + take]
                    shard_docs += int(np.searchsorted(vstart, pos + take) - np.searchsorted(vstart, pos))
                    fill += take
                    pos += take
                    if fill == cfg.shard_tokens and not (capped and pos == total):
                        flush(*cursor_after(pos))
                rate = (self.written_tokens + fill) / max(time.time() - self.t0, 1e-9)  # this run's tokens
                bar.set_postfix_str(f"{written + fill:,} tok, {rate:,.0f} tok/s", refresh=False)
                bar.update(len(lengths))
                if capped:
                    if total > 0:
                        skipped = cursor_after(total)[1]
                    break
                skipped += int(np.count_nonzero(~valid))
        finally:
            bar.close()
        # end of the split (or its cap): the rest is its last shard; the cursor moves to the next split
        nxt = SPLIT_ORDER.index(split) + 1
        cursor = {"split": SPLIT_ORDER[nxt], "doc": self.rows[SPLIT_ORDER[nxt]][0], "offset": 0} \
            if nxt < len(SPLIT_ORDER) else {"split": DONE, "doc": 0, "offset": 0}
        if fill:
            flush(cursor, skipped)
        else:
            state["cursor"], state["skipped_rows"][split] = cursor, skipped
            self._save_state()


def run_prep(config: PrepConfig) -> PrepResult:
    return PrepJob(config).run()


def summary_line(result: PrepResult, workers: int) -> str:
    if not result.complete:
        return (f"prep: stopped after {result.shards_written} shard(s) this run; "
                f"re-run the same command to continue ({result.out_dir / STATE_NAME})")
    totals = result.manifest.totals()
    parts = [f"{split} {totals[split]['tokens']:,} tokens / {totals[split]['documents']:,} docs in "
             f"{totals[split]['shards']} shard(s)" for split in ("train", "val")]
    skipped = sum(result.skipped_rows.values())
    head = "prep: already complete" if result.already_done else f"prep: done in {result.seconds:.1f}s"
    if result.deleted:
        head += f" (--force: first deleted the {result.deleted} file(s) of the earlier prep)"
    rate = "" if result.already_done else (
        f"; {result.tokens_written:,} tokens written at {result.tokens_written / max(result.seconds, 1e-9):,.0f} tok/s "
        f"({workers} worker{'s' if workers != 1 else ''})")
    part = result.manifest.source.get(PART_KEY)
    then = (f"; part {part['index']} of {part['count']}: when every part is done, join them with "
            "`nanochat-unsloth prep merge`") if part else ""
    return (f"{head}: {', '.join(parts)}; {skipped:,} null/non-text/undecodable row(s) skipped{rate}; "
            f"{result.out_dir / MANIFEST_NAME}{then}")
