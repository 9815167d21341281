"""The GPU-side options on a machine without them: dispatch, fallbacks and the CPU-testable math.

--kernels fused, --memory lean, --optimizer adamw8bit and --fp8 must run without a GPU, unsloth_zoo or
bitsandbytes, each with at most one notice line; the fused chunked loss and lean mode must compute
exactly what the torch path computes.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import math

import pytest
import torch

from nanochat_unsloth.cli import normalize_flags
from nanochat_unsloth.common import UserError
from nanochat_unsloth.model import compile as C
from nanochat_unsloth.model import lm_head_loss as L
from nanochat_unsloth.model import memory as M
from nanochat_unsloth.model import ops as K
from nanochat_unsloth.model.build import ModelOptions, build_model, get_kernels
from nanochat_unsloth.model.gpt import GPT, GPTConfig
from nanochat_unsloth.model.rotary_norm import rotary_norm
from nanochat_unsloth.train import optim
from nanochat_unsloth.train.config import parse_train_args

from tiny_gpt import TINY, build_tiny, loss_and_grads, tiny_batch
from train_fixtures import TINY_TRAIN_ARGS, make_train_base_dir

pytestmark = pytest.mark.usefixtures("fresh_notices")


def pretend_cuda(monkeypatch):
    """CUDA "available": all the fused set checks before it is built."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


# -----------------------------------------------------------------------------
# --kernels


def test_fused_kernels_fall_back_without_cuda_with_one_notice(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert get_kernels("fused") is K.TORCH_KERNELS
    assert get_kernels("unsloth") is K.TORCH_KERNELS
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("notice: --kernels fused") and "CUDA" in err


def test_fused_set_dispatch_when_available(monkeypatch):
    pretend_cuda(monkeypatch)
    ops = get_kernels("fused")
    assert ops.name == "fused" and ops.lm_head_loss == L.ChunkedLMHeadLoss(L.DEFAULT_CHUNK_MB)
    # q's and k's prologue is our kernel (on CUDA tensors); the input norms and attention stay the torch
    # ops (Inductor fuses them inside compiled blocks)
    assert ops.rotary_norm is rotary_norm and ops.rms_norm is K.torch_rms_norm
    x, cos, sin = torch.randn(1, 4, 2, 16), torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8)
    torch.testing.assert_close(ops.rotary_norm(x, cos, sin), K.torch_rotary_norm(x, cos, sin), rtol=0, atol=0)


def test_import_unsloth_module_restores_compile_settings(monkeypatch, tmp_path):
    # a stand-in module that does what `import unsloth` does to the global settings
    (tmp_path / "fake_unsloth_side_effects.py").write_text(
        "import os, torch._dynamo.config as d, torch._inductor.config as i\n"
        "d.suppress_errors = not d.suppress_errors\n"
        "i.fallback_random = not i.fallback_random\n"
        "os.environ['PYTORCH_CUDA_ALLOC_CONF'] = 'garbage'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    before = (dynamo_config.suppress_errors, inductor_config.fallback_random)
    M.import_unsloth_module("fake_unsloth_side_effects")
    assert (dynamo_config.suppress_errors, inductor_config.fallback_random) == before
    import os
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


# -----------------------------------------------------------------------------
# The chunked loss: the torch loss's numbers, one chunk at a time


@pytest.mark.parametrize("chunk_mb", [2048, 0.0004])  # one chunk; ~3 rows per chunk
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_loss_matches_torch_loss_and_gradients(chunk_mb, reduction):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 11, 32, generator=g, dtype=torch.float64) * 2
    w = torch.randn(96, 32, generator=g, dtype=torch.float64)
    t = torch.randint(0, 96, (4, 11), generator=g)
    t[1, 3:9] = -1
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    ws = [w.clone().requires_grad_(True) for _ in range(2)]
    # the torch loss's math in float64 (torch_lm_head_loss itself rounds the logits to fp32)
    logits = 15.0 * torch.tanh(xs[0] @ ws[0].T / 15.0)
    ref = torch.nn.functional.cross_entropy(logits.view(-1, 96), t.view(-1), ignore_index=-1, reduction=reduction)
    got = L.ChunkedLMHeadLoss(chunk_mb)(xs[1], ws[1], t, 15.0, reduction)
    (ref * 0.37).backward()  # a non-unit upstream gradient, like loss / grad_accum
    (got * 0.37).backward()
    # float64 both ways, summed in other orders (per chunk vs at once). Measured, AVX-512 and AVX2
    # (ONEDNN_MAX_CPU_ISA=AVX2): loss <= 4.2e-16 relative, grads <= 1.6e-15 absolute (<= 5e-5 of these
    # bounds). A chunk lost, counted twice or mis-scaled moves them by whole per-token terms (percent level).
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(ws[1].grad, ws[0].grad, rtol=1e-9, atol=1e-11)
    if chunk_mb != 2048:
        assert L.loss_chunk_rows(44, 96, chunk_mb) < 44  # the multi-chunk path really ran


def test_chunked_loss_none_reduction_and_no_grad():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 5, 16, generator=g), torch.randn(40, 16, generator=g)
    t = torch.randint(0, 40, (2, 5), generator=g)
    t[0, 0] = -1
    # fp32, the two losses' own formulations (chunked logsumexp vs torch's cross_entropy): measured <= 9.5e-7
    # absolute, 2.2e-7 relative per token on AVX-512 and AVX2, <= 5% of torch's fp32 default bound
    # (rtol 1.3e-6, atol 1e-5), stated here. The mean came out equal.
    fp32 = dict(rtol=1.3e-6, atol=1e-5)
    torch.testing.assert_close(L.chunked_lm_head_loss(x, w, t, 15.0, "none"),
                               K.torch_lm_head_loss(x, w, t, 15.0, "none"), **fp32)
    with torch.no_grad():
        torch.testing.assert_close(L.chunked_lm_head_loss(x, w, t, 15.0, "mean"),
                                   K.torch_lm_head_loss(x, w, t, 15.0, "mean"), **fp32)
    with pytest.raises(ValueError, match="reduction"):
        L.chunked_lm_head_loss(x, w, t, 15.0, "max")


def test_chunk_rows_split_evenly():
    assert L.loss_chunk_rows(65536, 65536) == 8192  # d20 B=32: 8 chunks of 8192 rows (2 GiB of logits + grad)
    assert L.loss_chunk_rows(1000, 65536) == 1000
    rows = L.loss_chunk_rows(100, 96, 0.01)
    assert -(-100 // rows) * rows - 100 < -(-100 // rows)  # chunks differ by less than one row each


def test_gpt_with_fused_set_matches_torch_path(monkeypatch):
    ref = build_tiny("torch")
    pretend_cuda(monkeypatch)
    fused = build_tiny("fused", loss_chunk_mb=0.001)  # several chunks at this size
    assert fused.ops.name == "fused" and fused.ops.lm_head_loss.chunk_mb == 0.001
    x, y = tiny_batch()
    loss_ref, g_ref = loss_and_grads(ref, x, y)
    loss, g = loss_and_grads(fused, x, y)
    # The chunked loss's rounding, fp32, through the tiny GPT. Measured on AVX-512 and AVX2
    # (ONEDNN_MAX_CPU_ISA=AVX2): loss equal, per-token losses <= 9.5e-7 absolute (1.3e-7 relative),
    # gradients <= 7.8e-8 absolute; each within 8% of its bound (grads were 1e-4/1e-5, 0.5% used).
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-5, atol=1e-6, msg=name)
    # per-token losses (bits-per-byte evaluation) through the same seam; torch's fp32 default bound
    with torch.no_grad():
        torch.testing.assert_close(fused(x, y, loss_reduction="none"), ref(x, y, loss_reduction="none"),
                                   rtol=1.3e-6, atol=1e-5)


# -----------------------------------------------------------------------------
# --memory


def test_memory_lean_matches_fast_and_checkpoints_every_block(monkeypatch):
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast, lean = build_tiny(memory="fast"), build_tiny(memory="lean")
    lean.lean_checkpoint = "torch"
    x, y = tiny_batch()
    loss_fast, g_fast = loss_and_grads(fast, x, y)
    loss_lean, g_lean = loss_and_grads(lean, x, y)
    assert len(calls) == TINY.n_layer
    # Bitwise: lean recomputes each block's forward with the same operations on the same values, and its
    # backward is fast mode's. Measured equal on AVX-512 and AVX2 (ONEDNN_MAX_CPU_ISA=AVX2).
    torch.testing.assert_close(loss_lean, loss_fast, rtol=0, atol=0)
    for name in g_fast:
        torch.testing.assert_close(g_lean[name], g_fast[name], rtol=0, atol=0, msg=name)
    calls.clear()
    with torch.no_grad():  # evaluation never checkpoints
        lean(x, y)
    lean.eval()
    lean(x, y)
    assert calls == []


@pytest.mark.parametrize("memory", ["lean", "selective"])
def test_lean_blocks_limits_the_memory_mode_to_the_first_k_blocks_and_matches_fast(monkeypatch, memory):
    """--lean_blocks 3 of 4: lean checkpoints the first three blocks, selective their MLPs only; either
    way the step is fast mode's, exactly. Evaluation never checkpoints."""
    config = GPTConfig(sequence_len=16, vocab_size=96, n_layer=4, n_head=4, n_kv_head=2, n_embd=32)
    checkpointed = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda fn, *a, **k: checkpointed.append(fn) or real(fn, *a, **k))
    fast = build_tiny(memory="fast", config=config)
    with torch.device("meta"):
        partial = GPT(config, memory=memory, lean_blocks=3, lean_checkpoint="torch")
    partial.to_empty(device="cpu")
    partial.load_state_dict(fast.state_dict())
    partial.cos, partial.sin = fast.cos, fast.sin
    assert partial.block_memory == [memory] * 3 + ["fast"]
    x, y = tiny_batch(config)
    loss_fast, g_fast = loss_and_grads(fast, x, y)
    loss_partial, g_partial = loss_and_grads(partial, x, y)
    first_three = list(partial.transformer.h)[:3]
    # once each: the blocks (lean) or only their MLPs (selective)
    assert checkpointed == (first_three if memory == "lean" else [b.mlp._mlp for b in first_three])
    # bitwise, as in the test above (measured equal on AVX-512 and AVX2)
    torch.testing.assert_close(loss_partial, loss_fast, rtol=0, atol=0)
    for name in g_fast:
        torch.testing.assert_close(g_partial[name], g_fast[name], rtol=0, atol=0, msg=name)
    checkpointed.clear()
    with torch.no_grad():
        partial(x, y)
    assert checkpointed == []


def test_memory_selective_keeps_less_for_backward_under_torch_compile():
    """Compiled with the min-cut partitioner (Inductor's, without its code generation), a selective block
    keeps at least the MLP's (rows x 4*n_embd) hidden activation less for backward than a fast one."""
    def saved_bytes(memory):
        torch._dynamo.reset()
        model = build_tiny(memory=memory)
        block = torch.compile(model.transformer.h[0], backend="aot_eager_decomp_partition", dynamic=False)
        x = torch.randn(8, TINY.sequence_len, TINY.n_embd, generator=torch.Generator().manual_seed(4))
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            out = block(x.requires_grad_(), model.cos[:, :TINY.sequence_len], model.sin[:, :TINY.sequence_len])
        out.sum().backward()
        return sum(sizes)

    hidden = 8 * TINY.sequence_len * 4 * TINY.n_embd * 4  # fp32 on the CPU
    assert saved_bytes("selective") <= saved_bytes("fast") - hidden


@pytest.mark.parametrize("memory", ["fast", "selective"])
def test_memory_selective_tags_the_fp8_mlp_gemms_must_recompute(monkeypatch, memory):
    """The partitioner sees every GEMM of a selective MLP tagged MUST_RECOMPUTE, and none of a fast block.

    A plain `checkpoint` tags them PREFER_RECOMPUTE, which torch 2.11's partitioner overrode for the FP8
    GEMMs on the H100: it kept the bf16 pre-activation, as in fast mode (docs/PERF.md). This CPU torch
    honours either tag, so the tag itself is what is checked."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    from nanochat_unsloth.model import fp8

    monkeypatch.setattr(fp8, "fp8_supported", lambda device: (True, ""))
    tags = []

    def partition(joint, inputs, **kwargs):
        tags.extend(str(n.meta.get("recompute")) for n in joint.graph.nodes
                    if n.op == "call_function" and n.target is torch.ops.aten._scaled_mm.default)
        return min_cut_rematerialization_partition(joint, inputs, **kwargs)

    torch._dynamo.reset()
    model = build_model(TINY, ModelOptions(fp8=True, fp8_scaling="delayed", memory=memory), "cpu", seed=0)
    backend = aot_autograd(fw_compiler=lambda gm, _: gm, bw_compiler=lambda gm, _: gm, partition_fn=partition)
    block = torch.compile(model.transformer.h[0], backend=backend, dynamic=False)
    x = torch.randn(8, TINY.sequence_len, TINY.n_embd, generator=torch.Generator().manual_seed(4))
    block(x.requires_grad_(), model.cos[:, :TINY.sequence_len], model.sin[:, :TINY.sequence_len]).sum().backward()
    # 6 Linears: 6 forward GEMMs and 12 backward ones; the MLP's two forward GEMMs are the region's
    assert len(tags) == 18
    must = tags.count("CheckpointPolicy.MUST_RECOMPUTE")
    assert must == (2 if memory == "selective" else 0), tags
    assert tags.count("None") == 18 - must


def test_block_memory_modes():
    assert M.block_memory_modes("lean", -1, 3) == ["lean"] * 3
    assert M.block_memory_modes("lean", 3, 3) == ["lean"] * 3
    assert M.block_memory_modes("lean", 1, 3) == ["lean", "fast", "fast"]
    assert M.block_memory_modes("lean", 0, 3) == ["fast"] * 3
    assert M.block_memory_modes("fast", -1, 3) == ["fast"] * 3
    assert M.block_memory_modes("selective", -1, 2) == ["selective"] * 2
    assert M.block_memory_modes("selective", 1, 3) == ["selective", "fast", "fast"]
    with pytest.raises(ValueError, match=r"--lean_blocks 2 needs --memory lean"):
        M.block_memory_modes("fast", 2, 3)
    for bad in (4, -2):
        with pytest.raises(ValueError, match=rf"--lean_blocks {bad} is outside -1..3"):
            M.block_memory_modes("lean", bad, 3)


def test_fp8_delayed_scaling_only_in_blocks_that_are_not_checkpointed(monkeypatch):
    from nanochat_unsloth.model import fp8

    monkeypatch.setattr(fp8, "fp8_supported", lambda device: (True, ""))
    config = GPTConfig(sequence_len=16, vocab_size=96, n_layer=3, n_head=4, n_kv_head=2, n_embd=32)
    def with_state(module):
        return [name for name, m in module.named_modules() if hasattr(m, "fp8_scaling")]

    options = ModelOptions(fp8=True, fp8_scaling="delayed", lean_blocks=2)
    model = build_model(config, dataclasses.replace(options, memory="lean"), "cpu", seed=0)
    assert [len(with_state(b)) for b in model.transformer.h] == [0, 0, 6]
    # selective blocks re-run only their MLP: the attention's four Linears keep delayed scaling
    model = build_model(config, dataclasses.replace(options, memory="selective"), "cpu", seed=0)
    assert [with_state(b) for b in model.transformer.h][0] == ["attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj"]
    assert [len(with_state(b)) for b in model.transformer.h] == [4, 4, 6]


@pytest.mark.parametrize("choice", [None, "auto", "offload"])  # the default is Unsloth's offloading
def test_memory_lean_offload_falls_back_on_cpu_with_one_notice(capsys, choice):
    model = build_tiny(memory="lean")
    if choice:
        model.lean_checkpoint = choice
    x, y = tiny_batch()
    loss_and_grads(model, x, y)
    loss_and_grads(model, x, y)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("notice: --memory lean") and "torch.utils.checkpoint" in err
    assert M.lean_checkpoint_impl(torch.device("cpu"), choice or "auto") is M._torch_checkpoint


def test_unknown_memory_mode_and_lean_checkpoint():
    with pytest.raises(ValueError, match=r"--memory.*fast, lean"):
        GPT(TINY, memory="tiny")
    with pytest.raises(ValueError, match=r"--lean_checkpoint 'disk'.*auto, offload, torch"):
        build_model(TINY, ModelOptions(memory="lean", lean_checkpoint="disk"))


def test_compile_modes_and_blocks_keep_state_dict_names():
    assert C.compile_mode("torch", "fast") == "model"
    assert C.compile_mode("fused", "fast") == "blocks"
    assert C.compile_mode("torch", "lean") == "blocks"
    assert C.compile_mode("fused", "lean", "none") == "none"
    assert C.compile_mode("torch", "fast", "blocks") == "blocks"
    assert C.compile_mode("fused", "fast", "model") == "model"  # one graph, the fused loss outside it
    # auto: the whole model for the FP8 fused set on small micro-batches in fast mode only
    small, large = C.SMALL_MICRO_BATCH_ROWS - 16, C.SMALL_MICRO_BATCH_ROWS
    assert C.compile_mode("fused", "fast", fp8=True, rows=small) == "model"
    assert C.compile_mode("fused", "fast", fp8=True, rows=large) == "blocks"
    assert C.compile_mode("fused", "fast", fp8=True) == "blocks"  # rows unknown
    assert C.compile_mode("fused", "fast", fp8=False, rows=small) == "blocks"
    assert C.compile_mode("fused", "selective", fp8=True, rows=small) == "blocks"
    assert C.compile_mode("fused", "lean", fp8=True, rows=small) == "blocks"
    assert C.compile_mode("fused", "fast", "blocks", fp8=True, rows=small) == "blocks"
    with pytest.raises(ValueError, match="--compile 'fastest'"):
        C.compile_mode("torch", "fast", "fastest")
    model = build_tiny()
    names = list(model.state_dict())
    assert C.compile_for_training(model, model, "blocks") is model  # compiles lazily, on first call
    assert len(model.compiled_blocks) == TINY.n_layer
    assert list(model.state_dict()) == names and len(list(model.parameters())) == len(names)
    with pytest.raises(ValueError):
        C.compile_for_training(model, model, "fastest")


def test_cuda_graphs_only_replay_the_whole_model_graph_in_one_process():
    small, large = C.SMALL_MICRO_BATCH_ROWS - 16, C.SMALL_MICRO_BATCH_ROWS
    # auto: where it was measured to pay, the fused FP8 whole-model graph on small micro-batches, one process
    assert C.use_cuda_graphs("auto", "model", "fused", True, small) is True
    assert C.use_cuda_graphs("auto", "model", "fused", True, large) is False
    assert C.use_cuda_graphs("auto", "model", "fused", True, None) is False  # rows unknown
    assert C.use_cuda_graphs("auto", "blocks", "fused", True, small) is False
    assert C.use_cuda_graphs("auto", "model", "fused", True, small, processes=2) is False
    assert C.use_cuda_graphs("auto", "model", "fused", False, small) is False
    assert C.use_cuda_graphs("auto", "model", "torch", False, small) is False
    assert C.use_cuda_graphs("auto", "model", "torch", True, small) is False
    assert C.use_cuda_graphs("off", "model", "fused", True, small) is False
    assert C.use_cuda_graphs("on", "model", "torch", False, large) is True
    with pytest.raises(ValueError, match="--cuda_graphs on .*'blocks': add --compile model"):
        C.use_cuda_graphs("on", "blocks", "fused", True, small)
    with pytest.raises(ValueError, match="--cuda_graphs on runs in one process only"):
        C.use_cuda_graphs("on", "model", "fused", True, small, processes=8)
    with pytest.raises(ValueError, match="--cuda_graphs 'yes'"):
        C.use_cuda_graphs("yes", "model")
    model = build_tiny()
    with pytest.raises(ValueError, match="not compile mode 'blocks'"):
        C.compile_for_training(model, model, "blocks", cuda_graphs=True)
    cfg = parse_train_args(normalize_flags(["--cuda_graphs=on", "--compile", "blocks"]))
    with pytest.raises(UserError, match="--cuda_graphs on .* not --compile blocks"):
        cfg.validate()
    cfg = parse_train_args(normalize_flags(["--cuda-graphs", "sometimes"]))
    with pytest.raises(UserError, match="--cuda_graphs 'sometimes' is not one of: auto, on, off"):
        cfg.validate()


def test_step_for_cuda_graphs_keeps_zeroed_grads_and_the_same_math():
    """What `optimizer_step(..., cuda_graphs=True)` changes besides the graph marks (no-ops without CUDA
    graphs): every .grad is allocated before the first backward and zeroed, not freed, after the update.
    Accumulating into zeros adds exactly, so losses and weights equal the plain step's bit for bit."""
    from accelerate import Accelerator

    from nanochat_unsloth.train.step import optimizer_step
    from test_convert import reset_accelerate

    reset_accelerate()
    accelerator = Accelerator(cpu=True)
    runs = {}
    for cuda_graphs in (False, True):
        model = build_tiny()
        optimizers = optim.build_optimizers_for("muon", model)
        batches = iter([tiny_batch(seed=s) for s in range(6)])
        losses = [optimizer_step(accelerator, model, model, optimizers, lambda: next(batches), 3, step, 2,
                                 cuda_graphs=cuda_graphs).loss.item() for step in range(2)]
        runs[cuda_graphs] = losses, model.state_dict(), [p.grad for p in model.parameters()]
    reset_accelerate()
    (l0, w0, g0), (l1, w1, g1) = runs[False], runs[True]
    assert all(g is None for g in g0)
    assert all(g is not None and not g.any() for g in g1)
    assert l0 == l1 and l0[0] != l0[1]
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


def test_compiled_blocks_run_in_training_not_in_generate():
    model = build_tiny()
    seen = []
    # stand-ins for the compiled twins, recording their calls
    model.compiled_blocks = [lambda x, cos, sin, b=block: seen.append(1) or b(x, cos, sin)
                             for block in model.transformer.h]
    x, y = tiny_batch()
    model(x, y)
    assert len(seen) == TINY.n_layer
    seen.clear()
    list(model.generate([1, 2, 3], max_tokens=2, temperature=0))
    assert seen == []


# -----------------------------------------------------------------------------
# --optimizer adamw8bit


def test_adamw8bit_falls_back_to_torch_adamw_on_cpu(capsys):
    model = build_tiny(config=GPTConfig(sequence_len=16, vocab_size=96, n_layer=2, n_head=2, n_kv_head=2, n_embd=192))
    [opt] = optim.build_optimizers_for("adamw8bit", model)
    assert type(opt) is torch.optim.AdamW
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("notice: --optimizer adamw8bit") and "torch AdamW" in err
    scale = (192 / 768) ** -0.5
    other, emb = opt.param_groups
    assert other["lr"] == pytest.approx(3e-4 * scale) and emb["lr"] == pytest.approx(3e-5 * scale)
    assert emb["params"] == [model.transformer.wte.weight]
    assert len(other["params"]) + 1 == len(list(model.parameters()))
    assert all(g["weight_decay"] == 0.01 and g["schedule"] == "cosine" and g["warmup_ratio"] == 0.02
               for g in opt.param_groups)


def test_adamw8bit_without_bitsandbytes(capsys, monkeypatch):
    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name.startswith("bitsandbytes"):
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    assert optim.adamw8bit_class(on_cuda=True) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bitsandbytes is not importable" in err


def test_cosine_schedule_with_warmup():
    n = 1000
    assert optim.cosine_lr_multiplier(0, n) == pytest.approx(1 / 20)
    assert optim.cosine_lr_multiplier(19, n) == pytest.approx(1.0)
    assert optim.cosine_lr_multiplier(20, n) == pytest.approx(1.0)
    assert optim.cosine_lr_multiplier(20 + 490, n) == pytest.approx(0.5)
    assert optim.cosine_lr_multiplier(n, n) == pytest.approx(0.0, abs=1e-12)
    assert optim.cosine_lr_multiplier(n, n, final_lr_frac=0.1) == pytest.approx(0.1)
    model = build_tiny()
    opts = optim.build_optimizers_for("adamw8bit", model)
    lrm = optim.apply_schedules(opts, 510, n)
    assert lrm == pytest.approx(0.5)
    assert opts[0].param_groups[0]["lr"] == pytest.approx(opts[0].param_groups[0]["initial_lr"] * 0.5)
    # the muon recipe keeps nanochat's schedule
    muon_opts = optim.build_optimizers_for("muon", model)
    assert optim.apply_schedules(muon_opts, 510, n) == 1.0
    assert math.isclose(optim.apply_schedules(muon_opts, 900, n), 0.5)


def test_unknown_optimizer():
    with pytest.raises(UserError, match=r"--optimizer 'sgd' is not one of: muon, adamw8bit"):
        parse_train_args(["--optimizer", "sgd"]).validate()


# -----------------------------------------------------------------------------
# All four flags through the training loop on CPU


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_train_base_dir(tmp_path_factory.mktemp("fallback_base"))


def run_train(base, *extra):
    from nanochat_unsloth.train.loop import train

    cfg = parse_train_args(normalize_flags(TINY_TRAIN_ARGS + ["--base-dir", str(base), *extra]))
    return train(cfg)


def test_train_loop_with_every_gpu_flag_falls_back_and_resumes_exactly(base, capsys):
    flags = ["--kernels", "unsloth", "--memory", "lean", "--lean-blocks", "1", "--optimizer", "adamw8bit", "--fp8"]
    # (--kernels unsloth: the fused set's former name, still accepted)
    run_train(base, "--num-iterations", "4", "--model-tag", "straight", *flags)
    captured = capsys.readouterr()
    assert "memory=lean (1 of 2 blocks checkpointed)" in captured.out
    err = captured.err
    notices = [line for line in err.splitlines() if line.startswith("notice:")]
    for flag in ("--kernels fused", "--memory lean", "--optimizer adamw8bit", "--fp8"):
        assert sum(flag in n for n in notices) == 1, (flag, notices)
    assert len(notices) == len(set(notices))  # each at most once
    run_train(base, "--num-iterations", "4", "--model-tag", "resumed", "--stop-after", "2", *flags)
    run_train(base, "--num-iterations", "4", "--model-tag", "resumed", "--resume", "auto", *flags)

    def losses(tag):
        lines = (base / "runs" / tag / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines if line.strip()]

    straight, resumed = losses("straight"), losses("resumed")
    assert len(straight) == 4 and all(math.isfinite(v) for v in straight)
    assert resumed == straight  # AdamW state and the cosine schedule resume exactly


def test_fp8_refuses_rows_that_are_not_a_multiple_of_16(base, monkeypatch):
    from nanochat_unsloth.model import fp8

    monkeypatch.setattr(fp8, "fp8_supported", lambda device: (True, ""))  # as on an H100
    with pytest.raises(UserError, match=r"--fp8 needs --device_batch_size x --max_seq_len .* 1 x 24"):
        run_train(base, "--num-iterations", "1", "--model-tag", "fp8rows", "--fp8", "--device-batch-size", "1",
                  "--max-seq-len", "24", "--total-batch-size", "96")


def test_fp8_trains_through_the_loop_where_supported(base, monkeypatch, capsys):
    """With FP8 "supported" (as on an H100), the loop trains with FP8 block GEMMs: torch._scaled_mm runs
    on the CPU too, slowly, which is fine at this size."""
    from nanochat_unsloth.model import fp8

    monkeypatch.setattr(fp8, "fp8_supported", lambda device: (True, ""))
    calls = []
    real = fp8._scaled_mm
    monkeypatch.setattr(fp8, "_scaled_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    switched = []
    real_start = fp8.start_delayed_scaling
    monkeypatch.setattr(fp8, "start_delayed_scaling", lambda model: switched.append(real_start(model)) or switched[-1])
    # delayed at any size: the tiny batch has 2 x 32 rows
    run_train(base, "--num-iterations", "3", "--model-tag", "fp8loop", "--fp8", "--fp8-scaling", "delayed")
    out = capsys.readouterr().out
    assert "kernels=torch+fp8" in out
    assert len(calls) == 3 * 2 * (2 * 6 * 3)  # steps x micro-steps x (layers x Linears x GEMMs)
    # lm_head and the c_proj's start at zero: step 0's block gradients are all zero, and in step 1 the
    # q/k/v/fc gradients still are (they pass through the still-zero c_proj's): delayed from step 3 on
    assert switched == [False, False, True]
    lines = (base / "runs" / "fp8loop" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(math.isfinite(json.loads(line)["loss"]) for line in lines)


def test_memory_selective_trains_through_the_loop_like_fast(base, capsys):
    run_train(base, "--num-iterations", "2", "--model-tag", "sel_fast")
    run_train(base, "--num-iterations", "2", "--model-tag", "sel", "--memory", "selective", "--lean-blocks", "1")
    assert "memory=selective (1 of 2 blocks recomputing their MLP)" in capsys.readouterr().out
    losses = {tag: [json.loads(line)["loss"] for line in (base / "runs" / tag / "metrics.jsonl").read_text().splitlines()]
              for tag in ("sel_fast", "sel")}
    assert len(losses["sel"]) == 2 and losses["sel"] == losses["sel_fast"]  # the same math, recomputed


def test_config_flags_parse():
    cfg = parse_train_args(normalize_flags(["--memory", "lean", "--optimizer=adamw8bit"]))
    assert (cfg.memory, cfg.optimizer) == ("lean", "adamw8bit")
    assert parse_train_args([]).memory == "fast" and parse_train_args([]).optimizer == "muon"


def test_train_refuses_unknown_memory_and_optimizer(base):
    with pytest.raises(UserError, match="--memory"):
        run_train(base, "--num-iterations", "1", "--model-tag", "bad1", "--memory", "small")
    with pytest.raises(UserError, match="--optimizer"):
        run_train(base, "--num-iterations", "1", "--model-tag", "bad2", "--optimizer", "lion")
    with pytest.raises(UserError, match="--lean_blocks 1 needs --memory lean"):
        run_train(base, "--num-iterations", "1", "--model-tag", "bad3", "--lean-blocks", "1")


def test_out_of_memory_advice_names_the_flags_cheapest_first():
    fast = M.out_of_memory_advice(32, "fast", -1, False, 77.9, 79.1)
    assert fast.startswith("out of GPU memory (peak 77.9 of 79.1 GiB) at --device_batch_size=32 --memory=fast: ")
    assert fast.index("--memory selective") < fast.index("--device_batch_size to 16") < fast.index("--memory lean")
    assert "--fp8" not in fast and "\n" not in fast
    partial = M.out_of_memory_advice(8, "selective", 14, True, 15.9, 16.0)
    assert "--lean_blocks=14: raise --lean_blocks" in partial and "add --fp8" in partial
    assert "add --memory selective" not in partial
    floor = M.out_of_memory_advice(1, "lean", -1, False, 70.0, 79.1)
    assert "--device_batch_size to" not in floor and "--depth" in floor and "MULTI_GPU" in floor


def test_training_step_out_of_memory_is_a_one_line_user_error(tmp_path, monkeypatch):
    from nanochat_unsloth.train import loop

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loop, "optimizer_step", out_of_memory)
    base = make_train_base_dir(tmp_path)
    cfg = parse_train_args(normalize_flags(TINY_TRAIN_ARGS + ["--base-dir", str(base), "--num-iterations", "2"]))
    with pytest.raises(UserError, match=r"^out of GPU memory .* --device_batch_size=\d+ --memory=fast: add --memory selective"):
        loop.train(cfg)
