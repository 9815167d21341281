"""Sharded Muon on 2 gloo processes gives the single-process result (uneven ownership, several steps)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat_unsloth.train.optim import Muon

from cpu_launch import exit_without_finalization, free_port

# 5 and 3 same-shape matrices: ranks own 3/2 and 2/1; the lone (8, 8) leaves rank 1 with nothing
SHAPES = [(16, 8)] * 5 + [(8, 16)] * 3 + [(8, 8)]
STEPS = 3
WORLD_SIZE = 2


def make_params():
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in SHAPES]


def make_grads(step):
    # the same on every rank, as after DDP's all-reduce
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g) for s in SHAPES]


def run_muon(params):
    opt = Muon(params, lr=0.05, momentum=0.9)
    for step in range(STEPS):
        for p, grad in zip(params, make_grads(step)):
            p.grad = grad
        opt.step()
    return opt


def _worker(rank, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        params = make_params()
        opt = run_muon(params)
        torch.save({"params": [p.detach() for p in params], "optim": opt.state_dict()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()
    exit_without_finalization()  # results are on disk; see cpu_launch (a Gloo rank can abort at exit)


@pytest.mark.slow
def test_sharded_muon_matches_single_process(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: no GEMM can split its work another way
    try:
        single_params = make_params()
        single_opt = run_muon(single_params)
    finally:
        torch.set_num_threads(threads)
    # Bitwise, by construction: each matrix sees the same fp32 lerps and the same Newton-Schulz whichever
    # rank owns it (on the CPU a batched GEMM computes each matrix alone, so the batch it is in does not
    # matter), and the gathered bf16 updates are added with the same add_. Measured equal, seeds 0-3, on
    # AVX-512 and AVX2 (ONEDNN_MAX_CPU_ISA=AVX2), --cpu_bf16 emulated and native. Any tolerance would
    # only hide a mix-up: an update applied to the wrong matrix moves weights by lr (0.05) per step.
    for r in ranks:
        for got, want in zip(r["params"], single_params):
            assert torch.equal(got, want.detach())
    # weights are bitwise identical across ranks: every rank applied the same gathered updates
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(a, b)
    # every rank holds the full momentum state, equal to the single-process one: any rank can checkpoint
    want_state = single_opt.state_dict()["state"]
    for r in ranks:
        assert r["optim"]["state"].keys() == want_state.keys()
        for k, v in want_state.items():
            assert torch.equal(r["optim"]["state"][k]["momentum_buffer"], v["momentum_buffer"])  # the same lerps
