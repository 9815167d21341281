"""TokenShardLoader: batches of (inputs, targets) from the token shards, deterministic and resumable.

The split's shards, in manifest order, form one token stream cut into windows of B*T+1 tokens:
window g = stream[g*(B*T+1) : (g+1)*(B*T+1)], which may span a shard boundary.

Which window a batch reads is a pure function of how many batches this rank has yielded (the cursor c):

    step s = c // grad_accum,  micro-step m = c % grad_accum
    g      = s * (grad_accum * world_size) + m * world_size + rank        (train; wraps every epoch)
    g      = c * world_size + rank                                        (val; finite)

so one optimizer step always consumes global windows [s*K, (s+1)*K) with K = grad_accum * world_size,
however (world_size, grad_accum) splits K: one GPU accumulating 8 and eight GPUs without accumulation
train on the same tokens in the same steps. The cursor is the same on every rank, which matters because
Accelerate saves the custom state of the main process only and every rank loads that one file.

A saved state therefore loads into another split of the same K (a run moved from 8 GPUs to 4): the
cursor is rescaled to the same step and the run stays bit-identical. A different window size or K
(another --device_batch_size or --total_batch_size) is refused unless `allow_new_layout` is set
(the loop's --force): the run then continues at the same step of the new layout, whose windows are
cut differently: tokens may be read twice or skipped, as many as the notice says.

Val reads windows [0, eval_windows) whatever the number of processes: each rank yields
ceil(eval_windows / world_size) batches, and a window past eval_windows comes with every target -1
(counted neither in nats nor in bytes), so every rank runs as many forwards (a collective under FSDP)
and one evaluation scores the same tokens on 1 or 3 or 8 processes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from nanochat_unsloth.common import UserError
from nanochat_unsloth.shards.format import open_shard_tokens
from nanochat_unsloth.shards.manifest import SPLITS, ShardManifest

STATE_FORMAT = "nanochat-unsloth-loader"
STATE_VERSION = 1
# the keys a state must agree on with the loader it is loaded into (the step layout is checked apart)
_ALWAYS_SAME = ("split", "T")


class TokenShardLoader:
    """Iterator over `(inputs int32 [B,T], targets int64 [B,T])`; infinite for train, finite for val."""

    def __init__(
        self,
        shards_dir: str | Path,
        split: str,
        B: int,
        T: int,
        rank: int = 0,
        world_size: int = 1,
        grad_accum: int = 1,
        device: str | torch.device = "cpu",
        tokenizer_sha256: str | None = None,
        verify_checksums: bool = False,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if B < 1 or T < 1:
            raise UserError(f"--device_batch_size ({B}) and --max_seq_len ({T}) must both be at least 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be at least 1, got {grad_accum}")
        self.shards_dir = Path(shards_dir)
        self.split, self.B, self.T = split, int(B), int(T)
        self.rank, self.world_size, self.grad_accum = int(rank), int(world_size), int(grad_accum)
        self.device = torch.device(device)
        self._pin = self.device.type == "cuda"

        # ---- open and check the shards: everything that can be wrong fails here, not mid-run
        manifest = ShardManifest.load(self.shards_dir)
        if tokenizer_sha256 is not None and tokenizer_sha256 != manifest.tokenizer.sha256:
            raise UserError(
                f"{self.shards_dir}: shards were made with tokenizer sha256 {manifest.tokenizer.sha256[:12]}, but this "
                f"run's tokenizer is {tokenizer_sha256[:12]}; re-run prep with this tokenizer or pass matching --shards"
            )
        # a part of a prep split across hosts holds a slice of every split: read alone, it would pass for the
        # whole data set (same tokenizer, a train and a val split) while holding only 1/N of it
        part = manifest.source.get("part")
        if isinstance(part, dict):
            raise UserError(
                f"{self.shards_dir}: holds part {part.get('index')} of {part.get('count')} of a prep split across "
                "hosts, a slice of the data; join every part with `nanochat-unsloth prep merge` and pass its --out"
            )
        entries = manifest.shards_for(split)
        if not entries:
            raise UserError(f"{self.shards_dir}: the manifest has no {split} shards; re-run `nanochat-unsloth prep`")
        # with several processes each checksums its share of the shards (a bad one stops the whole job);
        # rank 0 shows its share's progress to a terminal (a log file gets the loop's one-line summary)
        manifest.verify(self.shards_dir, checksums=verify_checksums, splits=(split,), part=(rank, world_size),
                        progress=None if verify_checksums and rank == 0 else False)
        self._vocab_size = manifest.tokenizer.vocab_size
        self._bos_id = manifest.tokenizer.bos_id
        self._paths = [self.shards_dir / e.file for e in entries]
        self._shards = [open_shard_tokens(path) for path in self._paths]
        sizes = np.array([len(m) for m in self._shards], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(sizes)])  # stream offset of each shard, plus the end
        self._tokens = int(self._starts[-1])

        self.window = self.B * self.T + 1
        self._num_windows = self._tokens // self.window
        if self._num_windows < 1:
            raise UserError(
                f"{self.shards_dir}: the {split} split is too short: need {self.window:,} tokens for "
                f"--device_batch_size {B} x --max_seq_len {T} (+1), have {self._tokens:,}; "
                "lower --device_batch_size/--max_seq_len or prep more data"
            )
        if split == "val" and self._num_windows < self.world_size:
            raise UserError(
                f"{self.shards_dir}: the val split holds {self._num_windows} window(s) of --device_batch_size {B} x "
                f"--max_seq_len {T}, fewer than the {world_size} processes; lower --device_batch_size or prep more val data"
            )

        self.eval_windows = self._num_windows  # val: windows one pass scores, all ranks together (set_eval_windows)
        self._cursor = 0  # batches this rank has yielded (the same number on every rank)
        self._epoch = 0  # epoch of the last batch yielded
        self.allow_new_layout = False  # load_state_dict: accept another window size / K (the loop's --force)
        self.notice: str | None = None  # what load_state_dict changed, for the log
        self.reads_again = False  # load_state_dict: the new layout goes on behind where the checkpoint had read

    # ---- sizes -----------------------------------------------------------------------------
    @property
    def num_windows(self) -> int:
        """Windows of B*T+1 tokens in one pass over the whole split (all ranks together)."""
        return self._num_windows

    @property
    def tokens_per_epoch(self) -> int:
        """Tokens the windows of one epoch cover (the split's tail shorter than a window is never read)."""
        return self._num_windows * self.window

    @property
    def batches_per_rank(self) -> int:
        """Val: batches each rank yields per pass, the same on every rank so collective evals never hang."""
        return -(-self.eval_windows // self.world_size)

    def set_eval_windows(self, n: int) -> None:
        """Val: score windows [0, n) in one pass (the loop's --eval_tokens); a rank left without one of them
        yields a batch whose targets are all -1."""
        if self.split != "val" or not 1 <= n <= self._num_windows:
            raise ValueError(f"set_eval_windows: a val loader and 1 <= n <= {self._num_windows}, got {n}")
        self.eval_windows = int(n)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def epoch(self) -> int:
        """Epoch of the last batch yielded (0 before the first)."""
        return self._epoch

    @property
    def cursor(self) -> int:
        """Batches this rank has yielded since the start (train) or since the last restart (val)."""
        return self._cursor

    # ---- iteration -------------------------------------------------------------------------
    def global_window(self, c: int) -> int:
        """The global window index (before wrapping) of this rank's c-th batch."""
        if self.split == "val":
            return c * self.world_size + self.rank
        s, m = divmod(c, self.grad_accum)
        return s * (self.grad_accum * self.world_size) + m * self.world_size + self.rank

    def reset(self) -> None:
        """Start over from the first batch (what `iter()` does for val)."""
        self._cursor = 0
        self._epoch = 0

    def __iter__(self) -> "TokenShardLoader":
        if self.split == "val":
            self.reset()
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.split == "val" and self._cursor >= self.batches_per_rank:
            raise StopIteration
        gw = self.global_window(self._cursor)
        epoch, g = divmod(gw, self._num_windows)
        padding = self.split == "val" and gw >= self.eval_windows  # val never wraps
        window = self._read(0 if padding else g * self.window)
        self._cursor += 1
        self._epoch = epoch
        # one (async, from pinned memory) copy of the int64 window; on CUDA the int32 cast runs on the GPU
        window = window.to(self.device, non_blocking=True)
        inputs = window[:-1].view(self.B, self.T).to(torch.int32)
        targets = window[1:].view(self.B, self.T)
        if padding:  # ignored targets: this rank keeps step with the others without scoring a token twice
            targets = torch.full_like(targets, -1)
        return inputs, targets

    def _read(self, start: int) -> torch.Tensor:
        """Stream tokens [start, start + window) as a fresh int64 CPU tensor (pinned for CUDA)."""
        out = torch.empty(self.window, dtype=torch.int64, pin_memory=self._pin)
        buf = out.numpy()
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        done = 0
        while done < self.window:
            lo = start + done - int(self._starts[i])
            n = min(self.window - done, len(self._shards[i]) - lo)
            chunk = self._shards[i][lo : lo + n]
            # an id past the vocab would be an IndexError deep in the model (eval does not checksum the shards);
            # the uint16 max is cheap next to the step (docs/perf-log/2026-11-28.md, "Shard verification at run start")
            if n and int(chunk.max()) >= self._vocab_size:
                raise UserError(f"{self._paths[i]}: holds token id {int(chunk.max())}, not below the vocab size "
                                f"{self._vocab_size}; the shard is corrupt, re-run prep")
            buf[done : done + n] = chunk  # uint16 -> int64 in one numpy pass
            done += n
            i += 1
        return out

    # ---- checkpointing (Accelerate's register_for_checkpointing calls these) ---------------
    def state_dict(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "cursor": self._cursor,
            "epoch": self._epoch,
            "split": self.split,
            "B": self.B,
            "T": self.T,
            "world_size": self.world_size,
            "grad_accum": self.grad_accum,
            "num_windows": self._num_windows,
        }

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise UserError("loader state in the checkpoint is not a TokenShardLoader state; the checkpoint is foreign")
        if state.get("version") != STATE_VERSION:
            raise UserError(f"loader state version {state.get('version')} is not supported (expected {STATE_VERSION})")
        mine = self.state_dict()
        diffs = [f"{k} {state.get(k)!r} vs {mine[k]!r} now" for k in _ALWAYS_SAME if state.get(k) != mine[k]]
        if diffs:
            raise UserError("the checkpoint's loader state was made for a different setup (" + ", ".join(diffs) + "); "
                            "resume with the same --max_seq_len and shards")
        cursor, old_accum = int(state["cursor"]), int(state["grad_accum"])
        if self.split == "val":
            if cursor < 0 or cursor > self.batches_per_rank:
                raise UserError(f"loader state has cursor {cursor}, out of range for the val split; it is corrupt")
        else:
            if cursor < 0:
                raise UserError(f"loader state has cursor {cursor}; the checkpoint is corrupt")
            self._check_layout(state)
            if (state["world_size"], old_accum) != (self.world_size, self.grad_accum):
                if cursor % old_accum:  # checkpoints are saved between steps, never inside one
                    raise UserError(f"loader state has cursor {cursor}, inside a step of {old_accum} micro-batches; "
                                    "resume it with the same number of processes and --total_batch_size")
                cursor = cursor // old_accum * self.grad_accum  # the same step, in this run's split of it
        self._cursor = cursor
        self._epoch = self.global_window(cursor - 1) // self._num_windows if cursor > 0 else 0

    def _check_layout(self, state: dict) -> None:
        """Steps are the same tokens when the window size, K and the shards are: else refuse or note."""
        old_k, new_k = int(state["world_size"]) * int(state["grad_accum"]), self.world_size * self.grad_accum
        layout = [f"{name} {old} (now {new})" for name, old, new in (
            ("device batch size", state["B"], self.B), ("windows per step", old_k, new_k),
            ("windows in the split", state["num_windows"], self._num_windows)) if old != new]
        moved = (state["world_size"], state["grad_accum"]) != (self.world_size, self.grad_accum)
        if not layout:
            if moved:
                self.notice = (f"loader: {state['world_size']} process(es) x {state['grad_accum']} accumulation -> "
                               f"{self.world_size} x {self.grad_accum}: the same tokens in every step")
            return
        if not self.allow_new_layout:
            raise UserError("cannot resume: the steps would read other tokens (" + ", ".join(layout) + "); resume "
                            "with the same --device_batch_size, --total_batch_size and shards, or pass --force to "
                            "continue on the new layout (not bit-identical to an uninterrupted run)")
        self.notice = ("--force: the loader continues at the same step on a new layout (" + ", ".join(layout) +
                       "): " + self._jump(state, old_k, new_k))

    def _jump(self, state: dict, old_k: int, new_k: int) -> str:
        """Where the checkpoint's layout had read the split to and where this one goes on, at the step's start:
        another number of tokens per step moves the run far back (read again) or ahead (skipped) in the data."""
        step = int(state["cursor"]) // int(state["grad_accum"])
        old_pass, old_w = divmod(step * old_k, int(state["num_windows"]))
        new_pass, new_w = divmod(step * new_k, self._num_windows)
        old_tok, new_tok = old_w * (int(state["B"]) * self.T + 1), new_w * self.window
        self.reads_again = (new_pass, new_tok) < (old_pass, old_tok)
        where = (f"the checkpoint had read the train split to token {old_tok:,} of pass {old_pass + 1}, this run "
                 f"goes on from token {new_tok:,} of pass {new_pass + 1}")
        if old_pass != new_pass or old_tok == new_tok:
            return where
        moved = f"{old_tok - new_tok:,} tokens read a second time" if new_tok < old_tok else \
            f"{new_tok - old_tok:,} tokens skipped"
        return f"{where}: {moved}"
