"""The sharded layout of an FSDP2 run's checkpoint, written with torch.distributed.checkpoint (DCP):

    step_000123/
        dcp/.metadata           every tensor's name, shape, dtype and where its pieces lie (written by rank 0)
        dcp/__<rank>_0.distcp   each rank's own shards of the weights and optimizer states
        random_states_<rank>.pkl, custom_checkpoint_0.pkl, meta.json   as in every run's checkpoint

No rank gathers a whole weight or optimizer state to save it: each writes the shards it holds. The state is
DCP's `get_state_dict` of the unwrapped model and its optimizers, `{"model": ..., "optim": ...}`, keyed by
parameter name (nanochat's names), never by position, so it loads into any layout of the same model: FSDP2
shards on any number of ranks (DCP reads the overlapping pieces of each saved shard), or whole tensors under
DDP or in one process. `convert` and `eval` read the weights alone (`load_weights`), and `convert` the optimizer
states (`load_optimizer_state`), whole, in one process without a process group.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from nanochat_unsloth.common import UserError

SHARDED_DIR = "dcp"
MODEL_KEY, OPTIM_KEY = "model", "optim"


def is_sharded_checkpoint(step_dir: Path) -> bool:
    return (Path(step_dir) / SHARDED_DIR / ".metadata").is_file()


def _unwrapped(optimizer):
    """The torch optimizer inside Accelerate's AcceleratedOptimizer: DCP steps a fresh one (below), and the
    wrapper's step is skipped outside a gradient-accumulation boundary."""
    return getattr(optimizer, "optimizer", optimizer)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _load(state: dict, path: Path, no_dist: bool) -> None:
    """dcp.load; in one process without its warning that it assumes one process (that is the intent here)."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(state, checkpoint_id=path, no_dist=no_dist)


def training_state(model, optimizers) -> dict:
    """{"model", "optim"}: the state dicts of the unwrapped model and its optimizers, as DCP names them, each
    tensor laid out as the parameter it belongs to is (an FSDP2 shard or whole). Collective under FSDP2.

    An optimizer with no state yet (a resume's fresh one) is given its state first by DCP itself: one step
    with lr 0 on zero gradients, which leaves every weight as it was; the load then replaces that state."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, [_unwrapped(o) for o in optimizers])
    return {MODEL_KEY: model_state, OPTIM_KEY: optim_state}


def _first_failure(e: BaseException) -> BaseException:
    """DCP reports what failed on any rank as one CheckpointException (a BaseException, not an Exception) on
    every rank; its first cause (a full disk is an OSError) is what the store turns into one line."""
    failures = getattr(e, "failures", None) or {}
    for failure in failures.values():
        cause = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(cause, BaseException):
            return cause
    return e


def _why(e: BaseException) -> str:
    """The first cause of a failed load, on one line."""
    cause = _first_failure(e)
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0]}" if text else type(cause).__name__


def save_state(out_dir: Path, model, optimizers) -> None:
    """Collective: every rank writes its own shards of the model and optimizer states into out_dir/dcp/."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.save(training_state(model, optimizers), checkpoint_id=Path(out_dir) / SHARDED_DIR,
                 no_dist=not _distributed())
    except CheckpointException as e:
        raise _first_failure(e) from None


def load_state(step_dir: Path, model, optimizers) -> None:
    """Collective under a process group: a sharded checkpoint's model and optimizer states into `model` and
    `optimizers`, whatever their layout (FSDP2 on any number of ranks, DDP, one process)."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = training_state(model, optimizers)
    path = Path(step_dir) / SHARDED_DIR
    try:
        _load(state, path, no_dist=not _distributed())
    except CheckpointException as e:  # what the run holds is not what was saved (--force past another optimizer)
        raise UserError(f"{path}: cannot load the sharded state ({_why(e)}); resume with the run's own --depth "
                        "and --optimizer") from None
    set_state_dict(model, [_unwrapped(o) for o in optimizers], model_state_dict=state[MODEL_KEY],
                   optim_state_dict=state[OPTIM_KEY])


def load_weights(step_dir: Path) -> dict[str, torch.Tensor]:
    """The weights of a sharded checkpoint, whole, on the CPU of this one process (no process group): only
    the model's entries are read, every rank's pieces of each."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(step_dir) / SHARDED_DIR
    prefix = MODEL_KEY + "."
    try:
        entries = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        weights = {name[len(prefix):]: torch.empty(tuple(md.size), dtype=md.properties.dtype)
                   for name, md in entries.items()
                   if name.startswith(prefix) and isinstance(md, TensorStorageMetadata)}
        _load({MODEL_KEY: weights}, path, no_dist=True)
    # a missing or unreadable file: DCP's CheckpointException (a BaseException), or OSError and pickle's errors
    except (CheckpointException, Exception) as e:
        raise UserError(f"{path}: cannot read the sharded weights ({_why(e)}); the checkpoint is corrupt") from None
    return weights


def load_optimizer_state(step_dir: Path) -> dict:
    """The optimizer states of a sharded checkpoint, whole, on the CPU of this one process (no process group),
    as DCP's `get_state_dict` named them: `{"state": {parameter name: {key: value}}, "param_groups": [{...,
    "params": [parameter names]}]}`, the groups of every optimizer one after another in the run's order.

    Nothing is built to load them into: the metadata records how DCP flattened the saved state (each entry's
    path, in the saved order), and the state is rebuilt along those paths with a placeholder for each entry,
    which the load fills in (an empty tensor of the saved shape and dtype, or None for a value saved as bytes)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(step_dir) / SHARDED_DIR
    state: dict = {}
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
        for name, where in (metadata.planner_data or {}).items():
            if where[0] == OPTIM_KEY:
                md = metadata.state_dict_metadata[name]
                tensor = isinstance(md, TensorStorageMetadata)
                _put(state, where, torch.empty(tuple(md.size), dtype=md.properties.dtype) if tensor else None)
        if OPTIM_KEY in state:
            _load(state, path, no_dist=True)
    # a missing or unreadable file: DCP's CheckpointException (a BaseException), or OSError and pickle's errors
    except (CheckpointException, Exception) as e:
        raise UserError(f"{path}: cannot read the sharded optimizer states ({_why(e)}); the checkpoint is "
                        "corrupt") from None
    if OPTIM_KEY not in state:
        raise UserError(f"{path}: holds no optimizer state (the run saved its weights alone)")
    return state[OPTIM_KEY]


def _put(root: dict, where: tuple, value) -> None:
    """`value` at the path `where` (a str names a dict's key, an int a list's index), making the containers."""
    node = root
    for key, inner in zip(where, where[1:]):
        empty = [] if isinstance(inner, int) else {}
        if isinstance(node, list):
            node.extend([None] * (key + 1 - len(node)))
            if node[key] is None:
                node[key] = empty
            node = node[key]
        else:
            node = node.setdefault(key, empty)
    if isinstance(node, list):
        node.extend([None] * (where[-1] + 1 - len(node)))
    node[where[-1]] = value
