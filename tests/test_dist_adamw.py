"""ShardedAdamW: world size 1 is torch AdamW; 2 gloo processes give torch AdamW's single-process result,
with ~1/2 of the moments per rank, and checkpoints round-trip across processes and world sizes."""

import copy
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat_unsloth.train.dist_adamw import ShardedAdamW, row_range

from cpu_launch import exit_without_finalization, free_port, launch_cpu_processes


REPO = Path(__file__).resolve().parents[1]
WORLD_SIZE = 2
STEPS = 5
SAVE_AT = 2  # the checkpoint round trip saves after this many steps
# odd rows (7 -> 4 + 3), rows < W (rank 1 holds nothing of the (1, 5)), a vector, and a 0-d scalar
SHAPES = [(7, 4), (6, 3), (1, 5), (5,), ()]
# name -> (param dtype, AdamW kwargs); betas/eps are nanochat's
CASES = {
    "fp32": (torch.float32, dict()),
    "fp32_fused": (torch.float32, dict(fused=True)),
    "fp32_foreach_amsgrad": (torch.float32, dict(foreach=True, amsgrad=True)),
    "bf16_fused": (torch.bfloat16, dict(fused=True)),  # wte on CUDA: bf16, nanochat's fused AdamW
}


def make_params(dtype):
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]


def make_optimizer(cls, params, kwargs):
    # two groups with their own LR and weight decay, as build_optimizers' [lm_head, wte]
    groups = [dict(params=params[:2], lr=0.01, weight_decay=0.1), dict(params=params[2:], lr=0.2)]
    return cls(groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0, **kwargs)


def run_steps(opt, params, start, stop):
    for step in range(start, stop):
        g = torch.Generator().manual_seed(100 + step)
        for p in params:  # the same on every rank, as after DDP's all-reduce
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        for i, group in enumerate(opt.param_groups):  # a schedule: the LRs change every step
            group["lr"] = (0.01, 0.2)[i] * (1 - 0.1 * step)
        opt.step()


def reference(case):
    """Single-process torch.optim.AdamW: params after SAVE_AT and STEPS steps, and its state at SAVE_AT."""
    dtype, kwargs = CASES[case]
    params = make_params(dtype)
    opt = make_optimizer(torch.optim.AdamW, params, kwargs)
    run_steps(opt, params, 0, SAVE_AT)
    at_save = ([p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()))
    run_steps(opt, params, SAVE_AT, STEPS)
    return at_save, [p.detach().clone() for p in params]


# ---- world size 1 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_world_size_one_is_torch_adamw(case):
    dtype, kwargs = CASES[case]
    params = make_params(dtype)
    opt = make_optimizer(ShardedAdamW, params, kwargs)
    run_steps(opt, params, 0, STEPS)
    _, want = reference(case)
    for got, w in zip(params, want):
        assert torch.equal(got.detach(), w)
    assert isinstance(opt, torch.optim.AdamW)


# ---- 2 gloo processes -----------------------------------------------------------------------------


def _worker(rank, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    # a short timeout: a collective one rank skips fails the test instead of hanging it
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=60))
    try:
        for case, (dtype, kwargs) in CASES.items():
            out = {}
            params = make_params(dtype)
            opt = make_optimizer(ShardedAdamW, params, kwargs)
            run_steps(opt, params, 0, SAVE_AT)
            full = opt.state_dict()  # every rank calls it: a collective
            ckpt = Path(out_dir) / f"{case}.pt"
            if rank == 0:  # Accelerate saves the main process's only
                torch.save(full, ckpt)
            out["state_at_save"] = copy.deepcopy(full)  # state_dict() shares the step tensors
            out["state_numel"] = sum(v.numel() for s in opt.state.values() for k, v in s.items() if k != "step")
            saved_params = [p.detach().clone() for p in params]
            run_steps(opt, params, SAVE_AT, STEPS)
            out["straight"] = [p.detach() for p in params]
            dist.barrier()

            # resume: fresh params and optimizer on every rank, all loading rank 0's file
            resumed = [torch.nn.Parameter(p.clone()) for p in saved_params]
            opt2 = make_optimizer(ShardedAdamW, resumed, kwargs)
            opt2.load_state_dict(torch.load(ckpt, weights_only=True))
            run_steps(opt2, resumed, SAVE_AT, STEPS)
            out["resumed"] = [p.detach() for p in resumed]

            # a 1-GPU checkpoint (plain torch AdamW, full state) resumed on 2 ranks
            ref_params = make_params(dtype)
            ref_opt = make_optimizer(torch.optim.AdamW, ref_params, kwargs)
            run_steps(ref_opt, ref_params, 0, SAVE_AT)
            from_single = [torch.nn.Parameter(p.detach().clone()) for p in ref_params]
            opt3 = make_optimizer(ShardedAdamW, from_single, kwargs)
            opt3.load_state_dict(ref_opt.state_dict())
            run_steps(opt3, from_single, SAVE_AT, STEPS)
            out["from_single"] = [p.detach() for p in from_single]
            torch.save(out, Path(out_dir) / f"{case}_rank{rank}.pt")
        dist.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()
    exit_without_finalization()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("dist_adamw")
    mp.spawn(_worker, args=(free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return {case: [torch.load(out_dir / f"{case}_rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
            for case in CASES}


# How far 2 ranks may be from torch AdamW, by case. Each element sees the same elementwise operations on
# the same values, so the unfused kernels (fp32, fp32_foreach_amsgrad) give torch's result bitwise. Only
# torch's fused CPU kernel rounds an element differently depending on where a row slice puts it (its
# vectorised body or its scalar tail). Measured, seeds 0-10, AVX-512 and AVX2 (ONEDNN_MAX_CPU_ISA=AVX2),
# weights and moments: unfused bitwise equal; fp32_fused at most 1 ulp (1.1e-7 relative, 3e-8 absolute),
# bound 1e-6 relative (8 ulps) + 1e-7; bf16_fused bitwise equal, but a 1-ulp fp32 difference may flip a
# bf16 rounding, so it may differ by one bf16 ulp (at most 2^-7 = 7.8e-3 relative), the bound. A lost or
# misplaced row update moves a weight by lr (0.01 to 0.2) per step, >= 1e-2.
TOLERANCE = {
    "fp32": dict(rtol=0, atol=0),
    "fp32_fused": dict(rtol=1e-6, atol=1e-7),
    "fp32_foreach_amsgrad": dict(rtol=0, atol=0),
    "bf16_fused": dict(rtol=8e-3, atol=1e-5),
}


def assert_close(got, want, case, what=""):
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, **TOLERANCE[case], msg=lambda m: f"{what}: {m}")


def assert_params_equal(got, want, case):
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, case, f"param {i} {tuple(w.shape)}")


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_two_ranks_equal_single_process_torch_adamw(two_ranks, case):
    _, want = reference(case)
    for r in two_ranks[case]:
        assert_params_equal(r["straight"], want, case)
    # every rank holds the same weights, bit for bit: all of them come out of the same all-gather
    for a, b in zip(two_ranks[case][0]["straight"], two_ranks[case][1]["straight"]):
        assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_full_state_dict_on_every_rank_is_torch_adamws(two_ranks, case):
    (_, want), _ = reference(case)
    for r in two_ranks[case]:
        got = r["state_at_save"]
        assert got["param_groups"] == want["param_groups"]
        assert got["state"].keys() == want["state"].keys()
        for i, state in want["state"].items():
            assert got["state"][i].keys() == state.keys()
            for key, value in state.items():
                assert got["state"][i][key].shape == value.shape, (i, key)
                assert_close(got["state"][i][key].cpu(), value.cpu(), case, f"state {i} {key}")


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_checkpoint_round_trip_across_processes(two_ranks, case):
    _, want = reference(case)
    for r in two_ranks[case]:
        assert_params_equal(r["resumed"], want, case)      # saved by rank 0, loaded by both
        assert_params_equal(r["from_single"], want, case)  # saved by a 1-process torch AdamW


@pytest.mark.slow
def test_each_rank_holds_about_half_the_moments(two_ranks):
    total = sum(torch.Size(s).numel() for s in SHAPES) * 2  # exp_avg + exp_avg_sq
    per_rank = [r["state_numel"] for r in two_ranks["fp32"]]
    # rows split 4+3, 3+3, 1+0, 3+2; the 0-d scalar is kept whole on both
    assert per_rank == [2 * (16 + 9 + 5 + 3 + 1), 2 * (12 + 9 + 0 + 2 + 1)]
    assert sum(per_rank) == total + 2  # every moment once, plus the scalar's on the second rank
    assert max(per_rank) <= 0.6 * total


def test_row_range_covers_every_row_once():
    for rows in range(0, 20):
        for world in (1, 2, 3, 8):
            seen = []
            for rank in range(world):
                lo, hi, k = row_range(rows, rank, world)
                assert 0 <= hi - lo <= k and k * world >= rows
                seen.extend(range(lo, hi))
            assert seen == list(range(rows))


# ---- end to end through Accelerate: DDP, optimizer_step, save_state / load_state ------------------


def _launch_e2e(out: Path, nproc: int):
    return launch_cpu_processes(nproc, str(REPO / "tests" / "dist_adamw_e2e.py"), str(out))


@pytest.mark.slow
def test_accelerate_two_processes_with_sharded_adamw_equal_one_process(tmp_path):
    one = _launch_e2e(tmp_path / "one", 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _launch_e2e(tmp_path / "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = torch.load(tmp_path / "one" / "result.pt"), torch.load(tmp_path / "two" / "result.pt")
    assert b["adamw_class"] == "ShardedAdamW" and b["world_size"] == 2
    # the same global batches: 1 process x 2 micro-steps == 2 processes x 1. Bitwise: DDP's average
    # g0/2 + g1/2 is what accumulating backward(loss / 2) twice computes (halving is exact in binary).
    assert a["losses"] == b["losses"]
    for name in a["weights"]:
        assert torch.equal(a["weights"][name], b["weights"][name]), name
    # resuming from Accelerate's checkpoint (main process's full AdamW state) continued exactly
    for run in (a, b):
        assert run["losses_resumed"] == run["losses"][run["save_at"]:]
        for name in run["weights"]:
            assert torch.equal(run["weights"][name], run["weights_resumed"][name]), name
