"""AdamW whose moments are sharded across data-parallel ranks (ZeRO-1 on top of DDP).

nanochat trains wte and lm_head with AdamW. At d20 those are 2 x 65,536 x 1,280 = 168M parameters, whose
two Adam moments take 1.0 GB of every GPU (fp32 for lm_head, bf16 for the bf16 wte; 1.3 GB if all fp32).
Under DDP every rank would hold and update all of it; here rank r keeps the moments of rows
[r*k, (r+1)*k) of each parameter only (k = ceil(rows / W), the last ranks' slices shorter or empty),
updates those rows, and an all-gather hands every rank every updated row.

Why ZeRO-1 and not ZeRO-2 (reduce-scatter the gradients instead of all-reducing them, as nanochat's
DistAdamW does): DDP already all-reduces the gradients bucket by bucket *during* backward, overlapped with
it, and Accelerate owns that wrapper. A reduce-scatter would have to run after backward, where nothing
hides it, and would need wte/lm_head taken out of DDP's buckets. ZeRO-2 would save, on top, only a
transient gradient buffer; the memory that stays resident is the moments, and those ZeRO-1 divides by W.
The price is one extra all-gather of the updated rows per step (wte bf16 + lm_head fp32: 0.5 GB at d20,
1-2 ms on NVLink; not measured here), launched per parameter so it overlaps the next update.
Accelerate's own options (DeepSpeed ZeRO-1/2, FSDP2's SHARD_GRAD_OP) would put another engine around the
model and shard Muon's matrices and gradients too, for no gain on a model whose weights fit one GPU; this
class is a drop-in `torch.optim.AdamW` and nothing else changes.

The math is torch's: `torch.optim.adamw.adamw`, the functional form `torch.optim.AdamW.step` calls, is
run on this rank's row slice with the group's own settings (fused / foreach / capturable ...), so each
element sees exactly the operations it would see in `torch.optim.AdamW`. The moments are kept in the
parameter's dtype, as torch does: for the bf16 wte on CUDA with `fused=True` (nanochat's setup) that is
bf16 moments with the update math done in fp32 inside the fused kernel, rounded once on store. Keeping
fp32 moments for a bf16 parameter would make an 8-GPU run differ from the 1-GPU run (torch AdamW).

Checkpoints: Accelerate calls `optimizer.state_dict()` on every rank, saves the main process's, and
every rank then loads that one file. So `state_dict()` returns the full state, in torch AdamW's format,
on every rank (a collective: all ranks call it in the same order; each moment is gathered and moved to
host memory one at a time, so the device peak is one full tensor), and `load_state_dict()` takes a full
state (from any world size, or from a plain `torch.optim.AdamW`) and keeps this rank's rows.

Without torch.distributed, or with world size 1, it *is* `torch.optim.AdamW`.
Parameters that are already sharded (DTensors under FSDP2) or 0-d are updated whole, like torch does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim.adamw import adamw as adamw_functional

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed
    DTensor = ()

_SLICED_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
# torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single; the same collective
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def row_range(rows: int, rank: int, world_size: int) -> tuple[int, int, int]:
    """This rank's rows [lo, hi) of a `rows`-row tensor, and k = rows per rank after padding."""
    k = -(-rows // world_size)
    lo = min(rank * k, rows)
    return lo, min(lo + k, rows), k


class ShardedAdamW(torch.optim.AdamW):
    """`torch.optim.AdamW` with each parameter's moments split by dim-0 rows across ranks (see module doc).

    Same constructor as torch's AdamW. Under torch.distributed with world size W > 1 the gradients must
    already be averaged across ranks (DDP does it in backward), as for `optim.Muon`.
    """

    def _sharded(self, p: Tensor, world_size: int) -> bool:
        return world_size > 1 and p.ndim > 0 and not isinstance(p, DTensor)

    def _init_state(self, state: dict, like: Tensor, group: dict) -> None:
        # torch AdamW's lazy init, on `like` (this rank's slice of p for sharded params)
        if group["fused"] or group["capturable"]:
            state["step"] = torch.zeros((), dtype=torch.float32, device=like.device)
        else:  # a host scalar: reading it for the bias correction costs no device sync
            dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
            state["step"] = torch.tensor(0.0, dtype=dtype)
        state["exp_avg"] = torch.zeros_like(like, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(like, memory_format=torch.preserve_format)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(like, memory_format=torch.preserve_format)

    @torch.no_grad()
    def step(self, closure=None):
        rank, world_size = rank_and_world_size()
        if world_size == 1:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        gathers = []
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("ShardedAdamW does not support sparse gradients")
                state = self.state[p]
                if self._sharded(p, world_size):
                    lo, hi, k = row_range(p.shape[0], rank, world_size)
                    # the updated rows go to a buffer of exactly k rows (zero padding on the last ranks), so
                    # one all_gather_into_tensor of equal pieces rebuilds the whole parameter
                    send = p.new_zeros((k, *p.shape[1:])) if hi - lo < k else p.new_empty((k, *p.shape[1:]))
                    target, grad = send[:hi - lo], p.grad[lo:hi]
                    target.copy_(p[lo:hi])
                else:
                    target, grad = p, p.grad
                if not state:
                    self._init_state(state, target, group)
                adamw_functional(
                    [target], [grad], [state["exp_avg"]], [state["exp_avg_sq"]],
                    [state["max_exp_avg_sq"]] if group["amsgrad"] else [], [state["step"]],
                    foreach=group["foreach"], capturable=group["capturable"],
                    differentiable=group["differentiable"], fused=group["fused"],
                    amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2, lr=group["lr"],
                    weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
                )
                if target is p:
                    continue
                # async: this gather overlaps the next parameter's update; gather straight into p when the
                # rows split evenly (wte / lm_head: vocab 65,536 on 8 GPUs), else into a padded buffer
                whole = p if p.is_contiguous() and k * world_size == p.shape[0] else None
                out = whole if whole is not None else p.new_empty((k * world_size, *p.shape[1:]))
                work = _all_gather(out, send, async_op=True)
                gathers.append((work, p, out, send))
        for work, p, out, _send in gathers:
            work.wait()
            if out is not p:
                p.copy_(out[:p.shape[0]])
        return loss

    # ---- checkpoints: the full state on every rank, this rank's rows after loading -----------------

    def state_dict(self) -> dict:
        rank, world_size = rank_and_world_size()
        packed = super().state_dict()
        if world_size == 1:
            return packed
        params = [p for group in self.param_groups for p in group["params"]]
        full = {}
        for index, p in enumerate(params):  # the same order on every rank: each gather is a collective
            state = self.state.get(p)
            if not state:
                continue
            full[index] = {key: (self._gather_rows(value, p, rank, world_size)
                                 if key in _SLICED_KEYS and self._sharded(p, world_size) else value)
                           for key, value in state.items()}
        packed["state"] = full
        return packed

    @staticmethod
    def _gather_rows(part: Tensor, p: Tensor, rank: int, world_size: int) -> Tensor:
        lo, hi, k = row_range(p.shape[0], rank, world_size)
        send = part.new_zeros((k, *part.shape[1:]))
        send[:hi - lo] = part
        out = part.new_empty((k * world_size, *part.shape[1:]))
        _all_gather(out, send)
        return out[:p.shape[0]].to("cpu", copy=True)

    def load_state_dict(self, state_dict: dict) -> None:
        rank, world_size = rank_and_world_size()
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        if world_size == 1 or len(saved_ids) != len(params):  # (torch raises on the mismatch)
            return super().load_state_dict(state_dict)
        sliced = {}
        for saved_id, p in zip(saved_ids, params):
            if saved_id not in state_dict["state"]:
                continue
            state = dict(state_dict["state"][saved_id])
            if self._sharded(p, world_size):
                lo, hi, _ = row_range(p.shape[0], rank, world_size)
                for key in _SLICED_KEYS:
                    if key in state:
                        if tuple(state[key].shape) != tuple(p.shape):
                            raise ValueError(f"ShardedAdamW.load_state_dict: {key} has shape "
                                             f"{tuple(state[key].shape)}, expected the full {tuple(p.shape)}")
                        # a copy of the rows, not a view: a view would keep the whole saved tensor alive
                        state[key] = state[key][lo:hi].clone()
            sliced[saved_id] = state
        super().load_state_dict({**state_dict, "state": sliced})
