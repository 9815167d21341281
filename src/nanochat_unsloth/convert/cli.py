"""`nanochat-unsloth convert`: our run checkpoints to nanochat's base_checkpoints, and back.

    nanochat-unsloth convert RUN_DIR_OR_CHECKPOINT [--model-tag d20] [--step N] [--base-dir DIR] [--with-optim]
                             [--force]
        -> <base>/base_checkpoints/<tag>/model_XXXXXX.pt, meta_XXXXXX.json (, optim_XXXXXX.pt) and <base>/tokenizer/
    nanochat-unsloth convert --from-nanochat <base>/base_checkpoints/<tag> [--step N] --out <base>/runs/<tag> [--force]
        -> <out>/step_XXXXXX/, which `train --resume auto` continues with a fresh optimizer state

Everything is checked before anything is written, and the files readers take as one set are written
as one (`common.atomic_file_set`): model_N.pt + meta_N.json (+ optim_N.pt), with model_N.pt, what
nanochat lists, landing last; tokenizer.pkl + token_bytes.pt likewise. An existing checkpoint is
replaced only with --force. The layout rules themselves live in `nanochat_layout.py`.

The import builds the state a run would hold at the imported step (the run's optimizers, TrainConfig's
defaults), so it is train/'s (`train/import_nanochat.py`), a floor above this one: `main` parses and checks
both directions' flags, and the top-level CLI hands it the import.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch

from nanochat_unsloth.checkpoint import layouts
from nanochat_unsloth.common import FlagParser, UserError, absolute_path, atomic_file_set, sha256_file
from nanochat_unsloth.convert import nanochat_layout as layout
from nanochat_unsloth.tokenizer import (TOKEN_BYTES_PT, TOKENIZER_PKL, load_tokenizer, token_bytes_mismatch,
                                        write_tokenizer_files)


# -----------------------------------------------------------------------------
# The tokenizer travels with the weights


def plan_tokenizer_copy(src_dir: Path, dst_dir: Path, expected_sha: str | None, force: bool) -> bool:
    """Whether to copy the tokenizer pair from src_dir to dst_dir. Raises, never writes.

    The source must hold the tokenizer the checkpoint was trained with (`expected_sha`, when recorded),
    with its own token_bytes.pt; the destination may hold the same pair (no copy), the same tokenizer.pkl
    beside a token_bytes.pt that is not its pair, nothing, or (only with --force) another tokenizer.
    """
    src_pkl, dst_pkl = src_dir / TOKENIZER_PKL, dst_dir / TOKENIZER_PKL
    if not src_pkl.exists():
        raise UserError(f"{src_pkl}: the checkpoint's tokenizer is not there; the checkpoint must sit in "
                        "<base>/runs/<tag> (or <base>/base_checkpoints/<tag>) next to <base>/tokenizer")
    src_sha = sha256_file(src_pkl)
    if expected_sha is not None and src_sha != expected_sha:
        raise UserError(f"{src_pkl}: sha256 {src_sha[:12]} is not the tokenizer the checkpoint was trained with "
                        f"({expected_sha[:12]}); it was replaced after training, restore the original")
    if not (src_dir / TOKEN_BYTES_PT).exists():
        raise UserError(f"{src_dir / TOKEN_BYTES_PT}: not found; nanochat's bpb evaluation needs it "
                        "(`nanochat-unsloth tokenizer` writes it)")
    enc = load_tokenizer(src_dir)  # its pair is checked by the load_checked_tokenizer that follows
    if src_dir.resolve() == dst_dir.resolve():
        return False
    if not dst_pkl.exists():
        return True
    if sha256_file(dst_pkl) == src_sha:
        return token_bytes_mismatch(dst_dir, enc, src_sha) is not None
    if not force:
        raise UserError(f"{dst_pkl}: a different tokenizer is already there (sha256 {sha256_file(dst_pkl)[:12]}, "
                        f"the checkpoint's is {src_sha[:12]}); nanochat would pair the weights with the wrong "
                        "tokenizer. Use another --base-dir, or --force to replace it")
    return True


def copy_tokenizer(src_dir: Path, dst_dir: Path, copy: bool, log=print) -> None:
    if copy:
        write_tokenizer_files(dst_dir, {name: (src_dir / name).read_bytes() for name in (TOKEN_BYTES_PT, TOKENIZER_PKL)},
                              log)
        log(f"wrote {dst_dir / TOKENIZER_PKL} and {dst_dir / TOKEN_BYTES_PT}")


def write_nanochat_checkpoint(out_dir: Path, step: int, state: dict, meta_bytes: bytes, optim_states: list | None,
                              log=print) -> dict[str, Path]:
    """model_N.pt + meta_N.json (+ optim_N.pt) as one set: nanochat lists model_*.pt, then reads the meta
    and optim of that step, so model_N.pt is the key, removed first and landing last. A kill leaves the old
    checkpoint of step N or none, never new weights beside an old meta or the reverse. An optim_N.pt of the
    old weights goes with them when the new set has none."""
    files = {"meta": layouts.meta_file(step), "model": layouts.model_file(step)}
    if optim_states is not None:
        files = {"optim": layouts.optim_file(step), **files}
    stale = [] if optim_states is not None else [layouts.optim_file(step)]
    if stale and (out_dir / stale[0]).exists():
        log(f"removing stale {out_dir / stale[0]} (it belonged to the weights being replaced)")
    with atomic_file_set(out_dir, list(files.values()), stale=stale) as staged:
        if optim_states is not None:
            torch.save(optim_states, staged[files["optim"]])
        staged[files["meta"]].write_bytes(meta_bytes)
        torch.save(state, staged[files["model"]])
    paths = {kind: out_dir / name for kind, name in files.items()}
    for path in paths.values():
        log(f"wrote {path}")
    return paths


# -----------------------------------------------------------------------------
# Ours -> nanochat


def export_to_nanochat(source: str | Path, model_tag: str | None = None, step: int | None = None,
                       base_dir: str | Path | None = None, with_optim: bool = False, force: bool = False,
                       log=print) -> dict:
    """Write one of our run checkpoints into `<base>/base_checkpoints/<tag>/`; returns the paths written."""
    step_dir = layouts.resolve_run_step_dir(source, step)
    loaded = layouts.load_run_checkpoint(step_dir)
    run_dir = step_dir.parent  # as named: the tag is the run dir's name, even when a link leads elsewhere
    src_base = loaded.base_dir
    dst_base = absolute_path(base_dir) if base_dir else src_base
    tag = model_tag or run_dir.name
    meta = loaded.meta

    # ---- check everything first: nothing is written if any of this fails
    from nanochat_unsloth.tokenizer import load_checked_tokenizer

    src_tok = src_base / "tokenizer"
    copy_pair = plan_tokenizer_copy(src_tok, dst_base / "tokenizer", meta.tokenizer_sha256, force)
    load_checked_tokenizer(src_tok, "the checkpoint", vocab_size=loaded.model_config["vocab_size"],
                           fix="restore the tokenizer it was trained with")
    state = layout.to_nanochat_state_dict(loaded.state_dict, loaded.model_config, str(step_dir),
                                          layout.nanochat_embedding_dtype(meta, loaded.state_dict))
    nano_meta = layout.nanochat_meta(meta, tag)
    optim_states = layout.nanochat_optim_from_run(step_dir, meta) if with_optim else None

    out_dir = dst_base / layouts.NANOCHAT_CHECKPOINTS / tag
    s = loaded.step
    # a step exists when its model file does (nanochat's rule); a meta or optim without one is what a
    # killed write leaves, and the new set replaces it
    if (out_dir / layouts.model_file(s)).exists() and not force:
        raise UserError(f"{out_dir / layouts.model_file(s)} already exists; pass --force to overwrite it, or "
                        "--model-tag to write another tag")
    # nanochat (and `eval` of the tag dir) loads the newest step: a later one already there (another run's, an
    # earlier export's) would be what they load, not the weights this export writes
    newer = [n for n in layouts.list_nanochat_checkpoints(out_dir) if n > s] if out_dir.is_dir() else []
    if newer and not force:
        raise UserError(f"{out_dir} already holds step {newer[-1]}, which nanochat loads (it takes the newest step), "
                        f"not step {s} written here; pass --model-tag to write another tag, or --force to write it "
                        "beside that one")

    # ---- write: the tokenizer pair, then the checkpoint's set
    final = meta.num_iterations
    log(f"converting {step_dir} (step {s}{f' of {final}' if final else ''}) -> {out_dir}")
    if final and s < final:
        log(f"warning: step {s} is not the run's final step ({final}): the run stopped early, or --step picked an "
            f"earlier checkpoint; to export the finished model, complete the run with --resume auto first")
    copy_tokenizer(src_tok, dst_base / "tokenizer", copy_pair, log)
    targets = write_nanochat_checkpoint(out_dir, s, state, layout.nanochat_meta_bytes(nano_meta), optim_states, log)
    return {"out_dir": out_dir, "step": s, **targets}


# -----------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = FlagParser(
        prog="nanochat-unsloth convert",
        description="Convert checkpoints between our runs (<base>/runs/<tag>/step_XXXXXX) and nanochat's "
                    "<base>/base_checkpoints/<tag>/ layout.",
    )
    p.add_argument("source", nargs="?", help="our run dir <base>/runs/<tag> (newest step) or a step_XXXXXX dir")
    p.add_argument("--from-nanochat", metavar="DIR",
                   help="import instead: nanochat's <base>/base_checkpoints/<tag> dir (or a model_XXXXXX.pt)")
    p.add_argument("--out", metavar="RUN_DIR", help="with --from-nanochat: our run dir to write, <base>/runs/<tag>")
    p.add_argument("--step", type=int, help="which step (default: the newest complete one)")
    p.add_argument("--model-tag", help="export: the tag under base_checkpoints/ (default: the run's tag)")
    p.add_argument("--base-dir", help="export: the nanochat base dir to write into (default: the run's base dir)")
    p.add_argument("--with-optim", action="store_true", help="export: also write optim_XXXXXX.pt")
    p.add_argument("--shards", help="import: token shards the resumed run will read (default: <out base>/shards)")
    p.add_argument("--world-size", type=int, default=1, help="import: processes the resumed run will use (default 1)")
    p.add_argument("--force", action="store_true", help="overwrite existing files / replace a different tokenizer")
    return p


def main(argv: list[str], import_from_nanochat: Callable[..., Path] | None = None) -> int:
    """`import_from_nanochat`: train/import_nanochat.py's, which the top-level CLI passes (convert sits below
    train/, so it cannot name it); without it --from-nanochat is refused after its flags are checked."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.from_nanochat:
        if args.source:
            raise UserError(f"give either a run dir ({args.source}) or --from-nanochat, not both")
        if not args.out:
            raise UserError("--from-nanochat needs --out RUN_DIR (e.g. <base>/runs/d20) to write our checkpoint into")
        unused = [f for f, v in (("--model-tag", args.model_tag), ("--base-dir", args.base_dir),
                                 ("--with-optim", args.with_optim)) if v]
        if unused:
            raise UserError(f"{', '.join(unused)}: only for exporting to nanochat; --out decides where the import goes")
        if import_from_nanochat is None:
            raise UserError("--from-nanochat builds a run's state (train/): run it as `nanochat-unsloth convert "
                            "--from-nanochat DIR --out RUN_DIR`")
        import_from_nanochat(args.from_nanochat, args.out, step=args.step, shards=args.shards,
                             world_size=args.world_size, force=args.force)
        return 0
    if not args.source:
        parser.print_usage(sys.stderr)
        raise UserError("give a run dir to export (or --from-nanochat DIR --out RUN_DIR to import)")
    unused = [f for f, v in (("--out", args.out), ("--shards", args.shards),
                             ("--world-size", args.world_size != 1)) if v]
    if unused:
        raise UserError(f"{', '.join(unused)}: only for --from-nanochat")
    export_to_nanochat(args.source, model_tag=args.model_tag, step=args.step, base_dir=args.base_dir,
                       with_optim=args.with_optim, force=args.force)
    return 0


if __name__ == "__main__":
    from nanochat_unsloth.common import run_main

    sys.exit(run_main(main, None))
