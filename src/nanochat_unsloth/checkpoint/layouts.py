"""Reading a checkpoint of either layout: ours (`<base>/runs/<tag>/step_XXXXXX/`, store.py) or nanochat's
`<base>/base_checkpoints/<tag>/` (b399e43):

    model_000123.pt    torch.save(orig_model.state_dict()): an ordered dict, module order, no
                       `_orig_mod.` prefixes; on CUDA wte is bf16 (init_weights casts it), the rest fp32
    optim_000123.pt    torch.save([adamw.state_dict(), muon.state_dict()])
    meta_000123.json   {"step", "val_bpb", "model_config", "user_config", "device_batch_size", "max_seq_len"}

The parameter names are already nanochat's (our GPT mirrors its module tree), so either layout loads as
the same weights: names and shapes checked against the meta's model_config, in nanochat's module order.
`eval` reads checkpoints here; `convert` adds the rules for writing nanochat's layout.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from nanochat_unsloth.checkpoint import store
from nanochat_unsloth.checkpoint.meta import META_NAME, RunMeta, load_meta
from nanochat_unsloth.common import UserError, absolute_path, read_json

NANOCHAT_CHECKPOINTS = "base_checkpoints"
MODEL_FILE_RE = re.compile(r"^model_(\d{6,})\.pt$")
MODEL_CONFIG_KEYS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")


def load_torch_file(path: Path, what: str, hint: str):
    """torch.load (tensors only) with a one-line UserError naming the file when it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: cannot read {what} ({type(e).__name__}: {e}); {hint}") from None


def model_file(step: int) -> str:
    return f"model_{step:06d}.pt"


def meta_file(step: int) -> str:
    return f"meta_{step:06d}.json"


def optim_file(step: int) -> str:
    return f"optim_{step:06d}.pt"


def expected_shapes(model_config: dict) -> "OrderedDict[str, torch.Size]":
    """Parameter name -> shape, in nanochat's module order, for a model config (built on meta: no memory)."""
    from nanochat_unsloth.model.build import build_model
    from nanochat_unsloth.model.gpt import GPTConfig

    model = build_model(GPTConfig(**model_config_kwargs(model_config)), device="meta")
    return OrderedDict((k, v.shape) for k, v in model.state_dict().items())


def model_config_kwargs(model_config: dict, where: str = "meta") -> dict:
    """The GPTConfig fields of a meta's model_config; UserError if any is missing."""
    if not isinstance(model_config, dict):
        raise UserError(f"{where}: model_config is missing or not a dict")
    missing = [k for k in MODEL_CONFIG_KEYS if k not in model_config]
    if missing:
        raise UserError(f"{where}: model_config lacks {', '.join(missing)}; it is not a nanochat GPT config")
    return {k: int(model_config[k]) for k in MODEL_CONFIG_KEYS}


def check_state_dict(state: dict[str, torch.Tensor], model_config: dict,
                     where: str) -> "OrderedDict[str, torch.Tensor]":
    """Weights in nanochat's module order, after checking names and shapes against model_config."""
    shapes = expected_shapes(model_config)
    missing = [k for k in shapes if k not in state]
    unexpected = [k for k in state if k not in shapes]
    wrong = [f"{k} {tuple(state[k].shape)} (config says {tuple(s)})"
             for k, s in shapes.items() if k in state and state[k].shape != s]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
        if wrong:
            parts.append(f"wrong shape {', '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}")
        raise UserError(f"{where}: the weights do not match the model_config in its meta ({'; '.join(parts)}); "
                        "the checkpoint's config and weights disagree")
    return OrderedDict((k, state[k]) for k in shapes)


def from_nanochat_state_dict(state: dict[str, torch.Tensor], model_config: dict,
                             where: str = "checkpoint") -> "OrderedDict[str, torch.Tensor]":
    """nanochat's weights for our model: names checked and ordered, dtypes kept as nanochat wrote them."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{where}: not a state dict of tensors")
    return check_state_dict(store.strip_wrapper_prefixes(state), model_config, where)


@dataclass
class LoadedCheckpoint:
    """One checkpoint of either layout, as the weights (nanochat names) plus what evaluation needs."""

    kind: str  # "run" (ours) or "nanochat"
    path: Path  # our step dir, or nanochat's model_XXXXXX.pt
    step: int
    state_dict: "OrderedDict[str, torch.Tensor]"
    model_config: dict
    meta: RunMeta | dict  # ours, or nanochat's meta_XXXXXX.json as read
    base_dir: Path  # the base dir the checkpoint sits in (two levels above its tag dir, by name: links kept)
    tokenizer_sha256: str | None  # recorded by our runs; nanochat records none

    @property
    def device_batch_size(self) -> int:
        if self.kind == "run":
            return int(self.meta.train_config.get("device_batch_size", 32))
        return int(self.meta.get("device_batch_size", 32))


def resolve_run_step_dir(path: str | Path, step: int | None = None) -> Path:
    """A run dir (`<base>/runs/<tag>`, newest complete step unless `step`) or a step dir -> the step dir
    (absolute, symlinks kept: see `common.absolute_path`)."""
    path = absolute_path(path)
    if not path.exists():
        raise UserError(f"{path}: not found; pass a run dir (<base>/runs/<tag>) or one of its step_XXXXXX dirs")
    if not path.is_dir():
        raise UserError(f"{path}: not a directory; pass a run dir (<base>/runs/<tag>) or one of its step_XXXXXX dirs")
    m = store.STEP_DIR_RE.match(path.name)
    if m or (path / META_NAME).exists():
        if step is not None and m and int(m.group(1)) != step:
            raise UserError(f"{path} is step {int(m.group(1))}, but --step {step} was asked for; "
                            "pass the run dir instead")
        load_meta(path, checksums=False)  # partial / truncated -> a clear error (the loader checks sha256)
        return path
    found = store.list_checkpoints(path)
    if not found:
        partial = sorted(p.name for p in path.iterdir() if p.name.startswith((".step_", "step_")))
        hint = f" (only partial ones: {', '.join(partial)})" if partial else ""
        raise UserError(f"{path}: no complete checkpoint{hint}; is this a run dir <base>/runs/<tag>?")
    if step is None:
        return found[-1][1]
    for s, step_dir in found:
        if s == step:
            return step_dir
    raise UserError(f"{path}: no complete checkpoint for --step {step}; available steps: "
                    f"{', '.join(str(s) for s, _ in found)}")


def list_nanochat_checkpoints(ckpt_dir: Path) -> list[int]:
    """Steps with both model_XXXXXX.pt and meta_XXXXXX.json, oldest first."""
    steps = []
    for child in Path(ckpt_dir).iterdir():
        m = MODEL_FILE_RE.match(child.name)
        if m and (Path(ckpt_dir) / meta_file(int(m.group(1)))).exists():
            steps.append(int(m.group(1)))
    return sorted(steps)


def resolve_nanochat_checkpoint(path: str | Path, step: int | None = None) -> tuple[Path, int]:
    """`<base>/base_checkpoints/<tag>` (newest step unless `step`) or a model_XXXXXX.pt -> (tag dir, step)."""
    path = absolute_path(path)
    if not path.exists():
        raise UserError(f"{path}: not found; pass nanochat's <base>/base_checkpoints/<tag> dir or a model_XXXXXX.pt")
    if path.is_file():
        m = MODEL_FILE_RE.match(path.name)
        if not m:
            raise UserError(f"{path}: not a nanochat model_XXXXXX.pt file")
        if step is not None and int(m.group(1)) != step:
            raise UserError(f"{path} is step {int(m.group(1))}, but --step {step} was asked for")
        ckpt_dir, step = path.parent, int(m.group(1))
        if not (ckpt_dir / meta_file(step)).exists():
            raise UserError(f"{ckpt_dir / meta_file(step)}: not found, so step {step} is partial; "
                            "nanochat writes it right after the model file")
        return ckpt_dir, step
    steps = list_nanochat_checkpoints(path)
    if step is None:
        if not steps:
            models = sorted(p.name for p in path.glob("model_*.pt"))
            hint = f" ({', '.join(models)} lack their meta_XXXXXX.json: partial)" if models else ""
            raise UserError(f"{path}: no nanochat checkpoint (model_XXXXXX.pt + meta_XXXXXX.json){hint}")
        return path, steps[-1]
    if step not in steps:
        if (path / model_file(step)).exists():
            raise UserError(f"{path / meta_file(step)}: not found, so step {step} is partial")
        raise UserError(f"{path}: no checkpoint for --step {step}; available steps: "
                        f"{', '.join(map(str, steps)) or 'none'}")
    return path, step


def load_run_checkpoint(path: str | Path, step: int | None = None) -> LoadedCheckpoint:
    step_dir = resolve_run_step_dir(path, step)
    meta = load_meta(step_dir)
    model_config = model_config_kwargs(meta.model_config, str(step_dir / META_NAME))
    weights = store.load_model_state_dict(step_dir, verify=False)  # load_meta has just verified every file
    state = check_state_dict(weights, model_config, str(step_dir / store.MODEL_FILE))
    return LoadedCheckpoint(
        kind="run", path=step_dir, step=meta.step, state_dict=state, model_config=model_config, meta=meta,
        base_dir=step_dir.parent.parent.parent, tokenizer_sha256=meta.tokenizer_sha256,
    )


def load_nanochat_checkpoint(path: str | Path, step: int | None = None) -> LoadedCheckpoint:
    ckpt_dir, step = resolve_nanochat_checkpoint(path, step)
    meta_path, model_path = ckpt_dir / meta_file(step), ckpt_dir / model_file(step)
    meta = read_json(meta_path, "nanochat checkpoint meta")
    if not isinstance(meta, dict):
        raise UserError(f"{meta_path}: not a nanochat checkpoint meta (a JSON object)")
    model_config = model_config_kwargs(meta.get("model_config"), str(meta_path))
    if "step" in meta and int(meta["step"]) != step:
        raise UserError(f"{meta_path}: says step {meta['step']}, but its name says {step}; the checkpoint is mixed up")
    state = load_torch_file(model_path, "the weights", "the file is corrupt or was written by an interrupted save")
    state = from_nanochat_state_dict(state, model_config, str(model_path))
    store.check_finite_weights(state.items(), model_path)
    return LoadedCheckpoint(
        kind="nanochat", path=model_path, step=step, state_dict=state, model_config=model_config, meta=meta,
        base_dir=ckpt_dir.parent.parent, tokenizer_sha256=None,
    )


def load_any_checkpoint(path: str | Path, step: int | None = None) -> LoadedCheckpoint:
    """Our run/step dir, or nanochat's base_checkpoints/<tag> dir / model_XXXXXX.pt, told apart by their files."""
    path = Path(path).expanduser()
    if path.is_file() or (path.is_dir() and any(path.glob("model_*.pt"))):
        return load_nanochat_checkpoint(path, step)
    return load_run_checkpoint(path, step)
