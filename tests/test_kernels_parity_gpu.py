"""GPU parity: the fused path against the torch path on the same weights and batch (skipped without CUDA).

Pass criteria: loss relative difference < 2e-3 and, for every parameter, gradient cosine
similarity > 0.999. The torch path here is nanochat's math run eagerly under bf16 autocast; the fused
path is what training runs (compiled blocks, fused chunked loss). Also: lean mode against fast mode,
and bitsandbytes AdamW8bit's state surviving a save / load.

    pytest tests/test_kernels_parity_gpu.py -s    # prints the measured differences
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from nanochat_unsloth.model import compile as C
from nanochat_unsloth.model import memory as M
from nanochat_unsloth.model.build import ModelOptions, build_model
from nanochat_unsloth.model.gpt import GPT, GPTConfig
from nanochat_unsloth.train import optim

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")

DEPTH, SEQ, VOCAB, B = 4, 1024, 65536, 4


def build(kernels="torch", memory="fast", state=None, fp8=False, lean_checkpoint="torch") -> GPT:
    # B * SEQ rows: FP8's dynamic scaling, as a run of this micro-batch resolves `--fp8_scaling auto`
    options = ModelOptions(kernels=kernels, memory=memory, fp8=fp8, lean_checkpoint=lean_checkpoint)
    model = build_model(GPTConfig.from_depth(DEPTH, SEQ, VOCAB), options, "cuda", seed=0)
    if state is not None:
        model.load_state_dict(state)
    return model


def reference_state() -> dict:
    """nanochat's init, plus small random lm_head / c_proj weights (init zeroes them: trivial gradients)."""
    model = build()
    g = torch.Generator(device="cuda").manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "lm_head.weight" or name.endswith("c_proj.weight"):
                p.copy_(torch.randn(p.shape, device="cuda", generator=g) * 0.02)
    return {k: v.clone() for k, v in model.state_dict().items()}


def data():
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randint(0, VOCAB, (B, SEQ), device="cuda", generator=g)
    y = torch.randint(0, VOCAB, (B, SEQ), device="cuda", generator=g)
    y[0, :100] = -1
    return x.int(), y


def loss_and_grads(model, call=None):
    x, y = data()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = (model if call is None else call)(x, y)  # a compiled wrapper has no truth value
    (loss / 2).backward()  # a non-unit upstream gradient, as with gradient accumulation
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters()}


def compare(name, ref, got, loss_tol=2e-3, cos_min=0.999):
    loss_rel = abs(got[0] - ref[0]) / abs(ref[0])
    cosines = {n: torch.nn.functional.cosine_similarity(got[1][n].flatten(), ref[1][n].flatten(), dim=0).item()
               for n in ref[1]}
    worst = min(cosines, key=cosines.get)
    print(f"\n[{name}] loss {ref[0]:.6f} vs {got[0]:.6f}: rel diff {loss_rel:.2e}; "
          f"min grad cosine {cosines[worst]:.6f} ({worst}); {len(cosines)} parameters")
    assert loss_rel < loss_tol
    assert all(c > cos_min for c in cosines.values()), {n: c for n, c in cosines.items() if c <= cos_min}


@pytest.fixture(scope="module")
def state():
    return reference_state()


@pytest.fixture(scope="module")
def torch_path(state):
    return loss_and_grads(build("torch", state=state))


def test_fused_path_matches_torch_path(state, torch_path):
    model = build("fused", state=state)
    assert model.ops.name == "fused"
    call = C.compile_for_training(model, model, "blocks")
    compare("fused vs torch", torch_path, loss_and_grads(model, call))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_norm_kernels_match_fp64(dtype):
    """The fused set's prologue kernels (rotary_norm.py) against the math in float64, on a strided q (a slice
    of a wider tensor) and a gradient in SDPA's (B, H, T, D) layout. Bounds: fp32 within 1e-5 of the largest
    magnitude (measured 1.5e-7 under Triton's CPU interpreter); bf16 within 2^-7 of it, one bf16 rounding of
    each output at most (measured 4.3e-3 there; 2^-8 is bf16's relative step)."""
    from nanochat_unsloth.model.rotary_norm import _supported, rotary_norm

    B, T, H, D = 2, 256, 3, 128
    g = torch.Generator(device="cuda").manual_seed(3)
    x64 = torch.randn(B, T, 3 * H, D, device="cuda", dtype=torch.float64, generator=g)[:, :, H:2 * H]
    x64[:, :, 0] *= 0.03  # rows whose mean square (~1e-3) shows a wrong eps (bf16's 2^-7 would halve them)
    angle = torch.randn(1, T, 1, D // 2, device="cuda", dtype=torch.float64, generator=g)
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    x = x64.to(dtype).requires_grad_(True)
    assert _supported(x, cos, sin)
    grad = torch.randn(B, H, T, D, device="cuda", dtype=dtype, generator=g).transpose(1, 2)
    out = rotary_norm(x, cos, sin)
    out.backward(grad)

    xr = x.detach().double().requires_grad_(True)
    c, s = cos.double(), sin.double()
    x1, x2 = xr[..., :D // 2], xr[..., D // 2:]
    # F.rms_norm's own eps for this dtype (it computes bf16 in float32): what the torch path uses
    ref = torch.nn.functional.rms_norm(torch.cat([x1 * c + x2 * s, x2 * c - x1 * s], -1), (D,),
                                       eps=torch.finfo(torch.float32).eps)
    ref.backward(grad.double())
    bound = 1e-5 if dtype == torch.float32 else 2**-7
    out_err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    grad_err = ((x.grad.double() - xr.grad).abs().max() / xr.grad.abs().max()).item()
    print(f"\n[rotary_norm {dtype}] output {out_err:.2e}, input gradient {grad_err:.2e} of the largest magnitude")
    assert out_err < bound and grad_err < bound


needs_fp8 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                               reason="needs an FP8 GPU (compute capability 8.9+)")


@needs_fp8
def test_fp8_path_tracks_torch_path(state, torch_path):
    """`--fp8` is a different precision (8-bit operands for the block GEMMs), not the same math: its
    gradients agree with the bf16 path's to FP8 rounding, hence looser bounds than the bf16 criteria's 0.999
    (equal loss is shown by the 300-step curves in docs/PERF.md). Without autograd it is the bf16 fused path."""
    model = build("fused", state=state, fp8=True)
    assert model.ops.fp8 and model.ops.label == "fused+fp8"
    call = C.compile_for_training(model, model, "blocks")
    compare("fused+fp8 vs torch", torch_path, loss_and_grads(model, call), loss_tol=1e-2, cos_min=0.98)
    x, _ = data()  # inference mode: the plain (uncompiled) blocks, as GPT.generate and evaluation run them
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.equal(model(x[:1, :64]), build("fused", state=state)(x[:1, :64]))


@needs_fp8
@pytest.mark.parametrize("recipe", ["torchao_tensorwise", "torchao_rowwise"])
def test_fp8_recipes_compile_and_track_torch_path(state, torch_path, recipe):
    """torchao's --fp8_recipe choices under the per-block compile: the same bounds as our tensorwise recipe.
    They need torchao (the GPU site's packages carry it)."""
    if recipe.startswith("torchao") and importlib.util.find_spec("torchao") is None:
        pytest.skip("needs torchao")
    options = ModelOptions(kernels="fused", fp8=True, fp8_recipe=recipe)
    model = build_model(GPTConfig.from_depth(DEPTH, SEQ, VOCAB), options, "cuda", seed=0)
    model.load_state_dict(state)
    call = C.compile_for_training(model, model, "blocks")
    compare(f"fused+fp8 {recipe} vs torch", torch_path, loss_and_grads(model, call), loss_tol=1e-2, cos_min=0.98)


@pytest.mark.parametrize("lean_impl", ["torch", "offload"])
def test_lean_matches_fast(state, torch_path, lean_impl, monkeypatch):
    if lean_impl == "offload" and importlib.util.find_spec("unsloth_zoo") is None:
        pytest.skip("needs unsloth_zoo")
    monkeypatch.setattr(M, "_LEAN_IMPLS", {})
    model = build("torch", memory="lean", state=state, lean_checkpoint=lean_impl)
    call = C.compile_for_training(model, model, "blocks")
    assert M.lean_checkpoint_impl(torch.device("cuda"), lean_impl) is (M._torch_checkpoint if lean_impl == "torch"
                                                               else M._offload_checkpoint)
    compare(f"lean/{lean_impl} vs torch path", torch_path, loss_and_grads(model, call))


@pytest.mark.parametrize("kernels", ["torch", "fused"])
def test_selective_matches_fast(state, torch_path, kernels):
    """--memory selective re-runs each MLP's c_fc and ReLU^2 in backward: the same math, compiled."""
    model = build(kernels, memory="selective", state=state)
    assert model.block_memory == ["selective"] * DEPTH
    call = C.compile_for_training(model, model, "blocks" if kernels == "fused" else "model")
    compare(f"selective/{kernels} vs torch path", torch_path, loss_and_grads(model, call))


@needs_bnb
def test_adamw8bit_state_saves_and_resumes(state):
    import bitsandbytes as bnb

    def fresh():
        model = build("torch", state=state)
        [opt] = optim.build_optimizers_for("adamw8bit", model)
        return model, opt

    def step(model, opt, i):
        optim.apply_schedules([opt], i, 100)
        loss_and_grads(model)
        opt.step()
        model.zero_grad(set_to_none=True)

    model, opt = fresh()
    assert isinstance(opt, bnb.optim.AdamW8bit)
    for i in range(2):
        step(model, opt, i)
    saved_opt = copy.deepcopy(opt.state_dict())  # state_dict() holds the live tensors
    def tensors(obj):  # bitsandbytes nests its quantisation state one dict deeper
        if torch.is_tensor(obj):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from tensors(v)

    assert any(t.dtype == torch.uint8 for t in tensors(saved_opt["state"])), "8-bit moments expected"
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    step(model, opt, 2)

    model2, opt2 = fresh()
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    step(model2, opt2, 2)
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name


def train_three_steps(accelerator, model, call, cuda_graphs, after_step=None):
    """Three optimizer steps of four accumulated micro-batches of a fixed random stream: the steps' losses
    and the optimizers. `after_step()` runs after each step (e.g. an eval forward between steps)."""
    from nanochat_unsloth.train.step import optimizer_step

    # each test builds several models in one process: a clean cache keeps Dynamo's recompile limit (8 graphs
    # of GPT.forward) from sending a later model to eager, where it would no longer test the compiled step
    torch._dynamo.reset()
    optimizers = optim.build_optimizers_for("muon", model)
    g = torch.Generator(device="cuda").manual_seed(3)

    def next_batch():
        w = torch.randint(0, VOCAB, (B, SEQ + 1), device="cuda", generator=g)
        return w[:, :-1].int(), w[:, 1:]

    losses = []
    for step in range(3):
        out = optimizer_step(accelerator, call, model, optimizers, next_batch, 4, step, 10, cuda_graphs=cuda_graphs)
        losses.append(out.loss.item())
        if after_step is not None:
            after_step()
    return losses, optimizers


@pytest.mark.parametrize("kernels,fp8", [("torch", False), ("fused", True)])
def test_cuda_graphs_train_like_the_plain_whole_model_graph(state, kernels, fp8):
    """`--cuda_graphs on` replays the same compiled kernels, so three optimizer steps of four accumulated
    micro-batches (warm-up, recording, replays) give the plain graph's losses and weights, with an eval
    forward (no grad, per-token losses, as the loop's val bpb) between steps. Without the kept .grad the
    second micro-step raises ("overwritten by a subsequent run"). Bounds: on the H200 the two ways'
    losses agreed to 3e-7 relative at d20 B=4 over six steps (the first three bit for bit; the rest is
    the run-to-run noise of atomic adds in the embedding's backward); here, in two runs on an H200, to 5e-6
    and bit for bit, and on an H100 (2026-12-06) to 1.7e-5. 1e-4 leaves room for that noise. Weights are
    compared for Muon's matrices only, bound 1e-2: the first run's whole-model weight difference was 1.6e-2
    relative (its worst parameter was not recorded), the second's 0, and the H100's worst Muon matrix 4.4e-3
    (Newton-Schulz runs in bf16, whose unit roundoff is 3.9e-3: gradients that differ in their last bits give
    updates that differ at about that size). 1e-2 leaves room for that. AdamW divides each entry's step by its own gradient's size (wte at LR 0.2),
    so an entry whose gradient is only rounding noise takes a full-size step either way; Muon's
    orthogonalised step has no such per-entry division."""
    from accelerate import Accelerator

    from test_convert import reset_accelerate

    if fp8 and not (torch.cuda.get_device_capability() >= (8, 9)):
        pytest.skip("needs an FP8 GPU (compute capability 8.9+)")
    reset_accelerate()
    accelerator = Accelerator(mixed_precision="bf16")
    x_eval, y_eval = data()
    runs = {}
    for cuda_graphs in (False, True):
        model = build(kernels, state=state, fp8=fp8)
        call = C.compile_for_training(model, model, "model", cuda_graphs=cuda_graphs)
        evals = []

        def evaluate():
            with torch.no_grad(), accelerator.autocast():
                evals.append(call(x_eval, y_eval, loss_reduction="none").float().mean().item())

        losses, optimizers = train_three_steps(accelerator, model, call, cuda_graphs, after_step=evaluate)
        if cuda_graphs:
            assert all(p.grad is not None and not p.grad.any() for p in model.parameters())  # kept, zeroed
        muon = {id(p) for opt in optimizers if isinstance(opt, optim.Muon) for g in opt.param_groups for p in g["params"]}
        runs[cuda_graphs] = losses, evals, {n: (id(p) in muon, p.detach().float().clone())
                                             for n, p in model.named_parameters()}
    reset_accelerate()
    (l0, e0, w0), (l1, e1, w1) = runs[False], runs[True]
    loss_rel = max(abs(a - b) / abs(a) for a, b in zip(l0 + e0, l1 + e1))
    rel = {n: ((w0[n][1] - w1[n][1]).norm() / w0[n][1].norm().clamp(min=1e-30)).item() for n in w0}
    worst = {kind: max((n for n in rel if w0[n][0] == is_muon), key=rel.get) for kind, is_muon in
             (("Muon", True), ("AdamW", False))}
    print(f"\n[{kernels}{'+fp8' if fp8 else ''} cuda graphs] losses {l0} vs {l1}, evals {e0} vs {e1}: "
          f"max rel diff {loss_rel:.2e}; weights' max rel diff: "
          + ", ".join(f"{kind} {rel[n]:.2e} ({n})" for kind, n in worst.items()))
    assert loss_rel < 1e-4
    assert rel[worst["Muon"]] < 1e-2


@needs_fp8
@pytest.mark.parametrize("compile_mode,cuda_graphs", [("blocks", False), ("model", True)])
def test_fp8_weight_cache_trains_like_the_uncached_step(state, compile_mode, cuda_graphs):
    """`--fp8_weight_cache on`: each block weight quantised eagerly once per optimizer step, against the compiled
    blocks quantising it in every micro-step (per-block compile, and the whole-model graph replayed as CUDA
    graphs, which must read the cached copies in place). The same function of the same weights, but the cache
    quantises eagerly and the uncached step inside Inductor's graph, whose cast rounds a few elements
    differently: the first step's losses, same weights, already differ by up to 3e-6, and this model's early
    steps amplify any difference (its loss rises 11.14 -> 11.24 over the three). Measured on H100s
    (2026-12-06, four runs): 1.8e-5 to 7.8e-5 relative over three steps of four micro-batches. Bound 2e-4,
    2.5x the largest, and far below what the faults it guards against cost: a copy one step stale, or one a
    CUDA graph captured and never saw rewritten, runs steps 2-3 on older weights, and each step here moves the
    loss by ~5e-3 relative (11.14 -> 11.20 -> 11.24 on uniformly random tokens, whose batches differ little)."""
    from accelerate import Accelerator

    from test_convert import reset_accelerate

    reset_accelerate()
    accelerator = Accelerator(mixed_precision="bf16")
    runs = {}
    for cache in (False, True):
        options = ModelOptions(kernels="fused", fp8=True, fp8_weight_cache=cache)
        model = build_model(GPTConfig.from_depth(DEPTH, SEQ, VOCAB), options, "cuda", seed=0)
        model.load_state_dict(state)
        call = C.compile_for_training(model, model, compile_mode, cuda_graphs=cuda_graphs)
        runs[cache], _ = train_three_steps(accelerator, model, call, cuda_graphs)
        caches = [m.fp8_weight_cache for m in model.modules() if getattr(m, "fp8_weight_cache", None) is not None]
        assert len(caches) == (6 * DEPTH if cache else 0)
        assert all(c.w8 is not None and not c.active for c in caches)  # filled, and off after the step
    reset_accelerate()
    gap = max(abs(a - b) / abs(a) for a, b in zip(runs[False], runs[True]))
    print(f"\n[fp8 weight cache, {compile_mode}{' + CUDA graphs' if cuda_graphs else ''}] losses {runs[False]} vs "
          f"{runs[True]}: max rel gap {gap:.2e}")
    assert gap < 2e-4
