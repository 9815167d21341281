"""FSDP2 on CPU (2 gloo processes, `fully_shard`): the helpers Muon needs, and the optimizers on DTensors."""

import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from nanochat_unsloth.train import optim
from nanochat_unsloth.train.dist_adamw import ShardedAdamW
from nanochat_unsloth.train.fsdp import apply_full_update, full_grad, full_tensor, is_dtensor

from cpu_launch import exit_without_finalization, free_port, spawn_ranks

WORLD_SIZE = 2
# (out, in) of a chain 7 -> 7 -> 7 -> 7 -> 5: 7 rows split 4 + 3 (uneven), 5 rows 3 + 2; three (7, 7)
# matrices make Muon's ownership uneven too (rank 0 owns two, rank 1 one)
LAYERS = [(7, 7), (7, 7), (7, 7), (5, 7)]
STEPS = 3


def make_module():
    torch.manual_seed(0)
    return torch.nn.ModuleList([torch.nn.Linear(i, o, bias=False) for o, i in LAYERS])


def forward(m, x):
    for layer in m[:-1]:  # called as modules, so FSDP2's hooks gather the weights
        x = torch.tanh(layer(x))
    return m[-1](x)


def batch(rank):
    g = torch.Generator().manual_seed(10 + rank)
    return torch.randn(4, 7, generator=g)


def grads_for(step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(o, i, generator=g) for o, i in LAYERS]


def shard(m, mesh):
    from torch.distributed.fsdp import fully_shard
    for layer in m:
        fully_shard(layer, mesh=mesh)
    return m


def set_grads(m, grads):
    """Every rank gets the same averaged gradient: whole for plain params, its rows for DTensors."""
    from torch.distributed.tensor import distribute_tensor
    for layer, g in zip(m, grads):
        p = layer.weight
        p.grad = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None) if is_dtensor(p) else g.clone()


def run_optimizer(m, make_opt):
    opt = make_opt([layer.weight for layer in m])
    for step in range(STEPS):
        set_grads(m, grads_for(step))
        opt.step()
    return [full_tensor(layer.weight.detach()).clone() for layer in m]


def make_muon(params):
    return optim.Muon(params, lr=0.05, momentum=0.9)


def make_adamw(cls):
    return lambda params: cls([dict(params=params[:2], lr=0.01, weight_decay=0.1), dict(params=params[2:], lr=0.2)],
                              betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)


def _init(rank, port):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    # a short timeout: a collective one rank skips fails the test instead of hanging it
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=60))
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh("cpu", (WORLD_SIZE,))


def _worker(rank, port, out_dir):
    mesh = _init(rank, port)
    out = {}
    try:
        # full_grad: FSDP2's reduce-scattered average, gathered whole on every rank
        m = shard(make_module(), mesh)
        forward(m, batch(rank)).square().mean().backward()
        out["is_dtensor"] = [is_dtensor(layer.weight) and is_dtensor(layer.weight.grad) for layer in m]
        out["local_rows"] = [layer.weight.to_local().shape[0] for layer in m]
        out["full_grads"] = [full_grad(layer.weight).clone() for layer in m]

        # apply_full_update: p += alpha * update, the update whole (and bf16, as Muon's) on every rank
        updates = [torch.randn(o, i, generator=torch.Generator().manual_seed(7)).bfloat16() for o, i in LAYERS]
        with torch.no_grad():
            before = [layer.weight.full_tensor().clone() for layer in m]
            for layer, u in zip(m, updates):
                apply_full_update(layer.weight, u, -0.1)
            out["applied_ok"] = [torch.equal(layer.weight.full_tensor(), b.add(u, alpha=-0.1))
                                 for layer, b, u in zip(m, before, updates)]

        # optimizers on FSDP2 params
        out["sharded_adamw"] = run_optimizer(shard(make_module(), mesh), make_adamw(ShardedAdamW))
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()
    exit_without_finalization()  # results are on disk; see cpu_launch (a Gloo rank can abort at exit)


def _muon_worker(rank, port, out_dir):
    mesh = _init(rank, port)
    try:
        params = run_optimizer(shard(make_module(), mesh), make_muon)
        torch.save(params, Path(out_dir) / f"muon_rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    exit_without_finalization()  # results are on disk; see cpu_launch (a Gloo rank can abort at exit)


def spawn(fn, out_dir):
    spawn_ranks(fn, WORLD_SIZE, (free_port(), str(out_dir)))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("fsdp")
    spawn(_worker, out_dir)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]


@pytest.mark.slow
def test_fully_shard_gives_dim0_dtensor_shards(ranks):
    assert all(all(r["is_dtensor"]) for r in ranks)
    assert [r["local_rows"] for r in ranks] == [[4, 4, 4, 3], [3, 3, 3, 2]]


@pytest.mark.slow
def test_full_grad_is_the_unsharded_average_gradient(ranks):
    m = make_module()
    loss = sum(forward(m, batch(r)).square().mean() for r in range(WORLD_SIZE)) / WORLD_SIZE
    loss.backward()
    # Bitwise, by construction: backward of (l0 + l1) / 2 halves every term of each rank's gradient
    # (halving is exact in binary) and adds the two, which is FSDP2's average of the two ranks' gradients;
    # a sum of two is the same in either order. Measured equal on AVX-512 and AVX2 (ONEDNN_MAX_CPU_ISA=AVX2).
    # A wrong reduction (a sum, or one rank's gradient) is off by a factor or by the other rank's batch.
    for r in ranks:
        for got, layer in zip(r["full_grads"], m):
            assert torch.equal(got, layer.weight.grad)


@pytest.mark.slow
def test_apply_full_update_adds_this_ranks_rows(ranks):
    for r in ranks:
        assert all(r["applied_ok"])


def test_helpers_are_the_identity_on_plain_tensors():
    p = torch.nn.Parameter(torch.randn(3, 4))
    p.grad = torch.randn(3, 4)
    assert full_grad(p) is p.grad
    assert not is_dtensor(p)
    before, u = p.detach().clone(), torch.randn(3, 4).bfloat16()
    with torch.no_grad():
        apply_full_update(p, u, -0.5)
    assert torch.equal(p.detach(), before.add(u, alpha=-0.5))


@pytest.mark.slow
def test_sharded_adamw_on_fsdp2_params_is_torch_adamw(ranks):
    # DTensor params are already sharded: ShardedAdamW updates their local shards like torch AdamW does
    want = run_optimizer(make_module(), make_adamw(torch.optim.AdamW))
    # Bitwise: each element sees the same (unfused) elementwise AdamW operations on its shard as on the whole
    # tensor. Measured equal on AVX-512 and AVX2 (ONEDNN_MAX_CPU_ISA=AVX2); a lost or misplaced row update
    # would move a weight by lr (0.01 to 0.2) per step.
    for r in ranks:
        for got, w in zip(r["sharded_adamw"], want):
            assert torch.equal(got, w)


@pytest.mark.slow
def test_muon_on_fsdp2_params_is_unsharded_muon(tmp_path):
    spawn(_muon_worker, tmp_path)
    want = run_optimizer(make_module(), make_muon)
    # Bitwise: the momentum lerps run on row shards (elementwise), Newton-Schulz on the gathered whole
    # matrix (on the CPU independent of the batch it is in), and each rank adds its rows of the same bf16
    # update. Measured equal on AVX-512 and AVX2 (ONEDNN_MAX_CPU_ISA=AVX2), --cpu_bf16 emulated and native.
    # A mix-up of rows or matrices moves weights by lr (0.05) per step.
    for r in range(WORLD_SIZE):
        for got, w in zip(torch.load(tmp_path / f"muon_rank{r}.pt", weights_only=True), want):
            assert torch.equal(got, w)
