"""FSDP2 helpers for optimizer math that needs whole matrices (Muon's Newton-Schulz).

Under FSDP2 (`torch.distributed.fsdp.fully_shard`, which Accelerate applies for `fsdp_version: 2`) every
parameter, and after backward its gradient, is a DTensor sharded on dim 0 across the ranks, the gradient
already averaged. Elementwise math (AdamW, Muon's momentum lerp) runs on the local shards unchanged;
Newton-Schulz does not, so Muon gathers the whole matrix first and adds back only this rank's rows of
the result. Gathering is a collective: every rank must call these in the same order. The plain-tensor
branch of each helper is the identity, so DDP / single-GPU code paths stay bitwise the same.
"""

from __future__ import annotations

from torch import Tensor

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
