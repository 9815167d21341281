"""FSDP2 helpers: optimizer math that needs whole matrices (Muon's Newton-Schulz), and checkpoints.

Under FSDP2 (`torch.distributed.fsdp.fully_shard`, which Accelerate applies for `fsdp_version: 2`) every
parameter, and after backward its gradient, is a DTensor sharded on dim 0 across the ranks, the gradient
already averaged. Elementwise math (AdamW, Muon's momentum lerp) runs on the local shards unchanged;
Newton-Schulz does not, so Muon gathers the whole matrix first and adds back only this rank's rows of
the result. Gathering is a collective: every rank must call these in the same order. The plain-tensor
branch of each helper is the identity, so DDP / single-GPU code paths stay bitwise the same.

Checkpoints of an FSDP2 run are written sharded by us, with torch.distributed.checkpoint (checkpoint/sharded.py,
called from train/checkpoint.py), not by Accelerate's save_state: Accelerate's FSDP save pairs optimizer i with
model i, and nanochat trains one model with two optimizers (AdamW and Muon). Each rank writes its own shards,
so no rank ever holds a whole state; the checkpoint resumes on another GPU count, or under DDP, and `convert`
and `eval` read it in one process. A checkpoint of an unsharded run (DDP, one process) resumes under FSDP2
through the helpers at the end of this file.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # torch built without distributed
    DTensor, distribute_tensor = (), None


def is_dtensor(t: Tensor | None) -> bool:
    return isinstance(t, DTensor)


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor on every rank: all-gathers a DTensor (a collective), returns a plain tensor as is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_grad(p: Tensor) -> Tensor:
    """p's whole gradient on every rank (all-gathered under FSDP2; p.grad itself otherwise)."""
    if p.grad is None:
        raise RuntimeError("full_grad: the parameter has no gradient")
    return full_tensor(p.grad)


def apply_full_update(p: Tensor, update: Tensor, alpha: float) -> None:
    """p += alpha * update, where `update` is whole (the same on every rank) and p may be an FSDP2 shard.

    For a DTensor p only this rank's rows of `update` are added, to the local shard in place; the rows
    are cut with `distribute_tensor(..., src_data_rank=None)`, which slices locally exactly as p is
    sharded (torch.chunk on dim 0, uneven last shards included) and communicates nothing.
    """
    if isinstance(p, DTensor):
        if tuple(update.shape) != tuple(p.shape):
            raise ValueError(f"apply_full_update: update {tuple(update.shape)} is not the whole {tuple(p.shape)}")
        mine = distribute_tensor(update, p.device_mesh, p.placements, src_data_rank=None).to_local()
        p.to_local().add_(mine, alpha=alpha)
    else:
        p.add_(update, alpha=alpha)


# -----------------------------------------------------------------------------
# An unsharded run's checkpoint (whole tensors) resumed under FSDP2


def shard_like(whole: Tensor, like: Tensor) -> Tensor:
    """This rank's part of `whole` laid out as the DTensor `like` (sliced locally, nothing is sent); a tensor
    for a plain `like` moves to its device."""
    if isinstance(like, DTensor):
        return distribute_tensor(whole.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
    return whole.to(like.device)


def load_whole_model_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy a whole (unsharded) state dict into a model whose parameters may be FSDP2 shards."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"state dict does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, target in own.items():
            part = shard_like(state[name].to(target.dtype), target)
            (target.to_local() if isinstance(target, DTensor) else target).copy_(
                part.to_local() if isinstance(part, DTensor) else part)


def shard_optimizer_state(state_dict: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A whole optimizer state dict (torch's format) with each per-parameter tensor cut like its parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
    if len(saved_ids) != len(params):
        raise ValueError(f"optimizer state for {len(saved_ids)} parameters, the optimizer has {len(params)}")
    state = {}
    for saved_id, p in zip(saved_ids, params):
        if saved_id in state_dict["state"]:
            state[saved_id] = {k: shard_like(v, p) if isinstance(v, Tensor) and v.shape == p.shape else v
                               for k, v in state_dict["state"][saved_id].items()}
    return {**state_dict, "state": state}
