"""`manifest.json`: what a shard directory holds, which tokenizer made it, and checksums.

Everything that reads shards goes through the manifest, so a shard that was truncated, swapped,
or made by another tokenizer is caught when the directory is opened, not mid-training.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nanochat_unsloth.common import UserError, atomic_write_json, read_json
from nanochat_unsloth.shards.format import HEADER_BYTES, read_shard_header, scan_shard

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "nanochat-unsloth-shards"
MANIFEST_VERSION = 1
SPLITS = ("train", "val")


@dataclass
class TokenizerFingerprint:
    sha256: str  # of tokenizer.pkl
    vocab_size: int
    bos_id: int


@dataclass
class ShardEntry:
    file: str
    split: str
    tokens: int
    documents: int
    sha256: str


@dataclass
class ShardManifest:
    tokenizer: TokenizerFingerprint
    source: dict
    shard_tokens: int
    shards: list[ShardEntry] = field(default_factory=list)
    format: str = MANIFEST_FORMAT
    version: int = MANIFEST_VERSION

    # ---- derived -------------------------------------------------------------------------
    def shards_for(self, split: str) -> list[ShardEntry]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return [s for s in self.shards if s.split == split]

    def totals(self) -> dict:
        return {
            split: {
                "tokens": sum(s.tokens for s in self.shards_for(split)),
                "documents": sum(s.documents for s in self.shards_for(split)),
                "shards": len(self.shards_for(split)),
            }
            for split in SPLITS
        }

    def fingerprint(self) -> str:
        """sha256 of which tokens the shards hold (each shard's file, split, token count and sha256, and the
        tokenizer), not of where they were made: a checkpoint records it, a resume compares it."""
        identity = {"tokenizer": asdict(self.tokenizer),
                    "shards": [[s.file, s.split, s.tokens, s.sha256] for s in self.shards]}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    # ---- io ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["totals"] = self.totals()
        return d

    def save(self, shards_dir: str | Path) -> Path:
        path = Path(shards_dir) / MANIFEST_NAME
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, shards_dir: str | Path) -> "ShardManifest":
        shards_dir = Path(shards_dir)
        if not shards_dir.is_dir():
            raise UserError(f"{shards_dir}: shard directory not found; run `nanochat-unsloth prep` or pass --shards")
        path = shards_dir / MANIFEST_NAME
        if not path.exists():
            raise UserError(f"{path}: no manifest, so {shards_dir} holds no finished prep; run `nanochat-unsloth prep`")
        d = read_json(path, "shard manifest")
        if d.get("format") != MANIFEST_FORMAT:
            raise UserError(f"{path}: not a nanochat-unsloth shard manifest (format={d.get('format')!r})")
        if d.get("version") != MANIFEST_VERSION:
            raise UserError(f"{path}: manifest version {d.get('version')} is not supported (expected {MANIFEST_VERSION})")
        try:
            return cls(
                tokenizer=TokenizerFingerprint(**d["tokenizer"]),
                source=d["source"],
                shard_tokens=int(d["shard_tokens"]),
                shards=[ShardEntry(**s) for s in d["shards"]],
            )
        except (KeyError, TypeError) as e:
            raise UserError(f"{path}: manifest is missing or has unexpected fields ({e}); re-run prep") from None

    # ---- checks --------------------------------------------------------------------------
    def verify(self, shards_dir: str | Path, checksums: bool = False, splits: tuple[str, ...] = SPLITS,
               part: tuple[int, int] = (0, 1), progress: bool | None = False) -> None:
        """Header and size of every shard against the manifest (cheap); with `checksums`, also each shard's
        sha256 and that every token id is below the vocab size (one read of the data).

        `part=(i, n)` checksums only every n-th shard from the i-th: n processes verify a split in 1/n the
        time each (headers and sizes are still checked for all). `progress`: a tqdm bar (stderr) over the bytes
        checksummed; None: only when stderr is a terminal.
        """
        shards_dir = Path(shards_dir)
        entries = [e for e in self.shards if e.split in splits]
        for entry in entries:
            path = shards_dir / entry.file
            header = read_shard_header(path)
            if header.ntok != entry.tokens:
                raise UserError(
                    f"{path}: holds {header.ntok:,} tokens but the manifest says {entry.tokens:,}; "
                    "the shard was replaced or truncated, re-run prep"
                )
            if (header.vocab_size, header.bos_id) != (self.tokenizer.vocab_size, self.tokenizer.bos_id):
                raise UserError(
                    f"{path}: made with vocab {header.vocab_size}/BOS {header.bos_id}, but the manifest's tokenizer "
                    f"has vocab {self.tokenizer.vocab_size}/BOS {self.tokenizer.bos_id}; it belongs to another prep"
                )
        if checksums:
            mine = entries[part[0]::part[1]]
            desc = f"checksums {'+'.join(splits)}" + (f" (share {part[0]} of {part[1]})" if part[1] > 1 else "")
            self._verify_contents(shards_dir, mine, progress, desc)

    def _verify_contents(self, shards_dir: Path, entries: list[ShardEntry], progress: bool | None, desc: str) -> None:
        from tqdm import tqdm

        # hashlib and numpy release the GIL on large buffers: threads scan several shards at once
        with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool, \
                tqdm(total=sum(HEADER_BYTES + 2 * e.tokens for e in entries), unit="B", unit_scale=True,
                     unit_divisor=1024, desc=desc, disable=None if progress is None else not progress, dynamic_ncols=True, mininterval=0.5) as bar:
            scans = pool.map(lambda e: scan_shard(shards_dir / e.file), entries)
            for entry, (digest, max_token) in zip(entries, scans):
                bar.update(HEADER_BYTES + 2 * entry.tokens)
                path = shards_dir / entry.file
                if digest != entry.sha256:
                    raise UserError(f"{path}: sha256 does not match the manifest; the shard is corrupt, re-run prep "
                                    "(with --force, which deletes this --out's shards first)")
                if max_token >= self.tokenizer.vocab_size:
                    raise UserError(f"{path}: holds token id {max_token}, not below the tokenizer's vocab size "
                                    f"{self.tokenizer.vocab_size}; the shard is corrupt, re-run prep")
