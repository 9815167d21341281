"""--memory fast/selective/lean and --lean_blocks (model/memory.py): the same math as fast, what each mode
keeps for backward, the CPU fallback of lean's offloading, and the out-of-memory advice.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nanochat_unsloth.cli import normalize_flags
from nanochat_unsloth.common import UserError
from nanochat_unsloth.model import memory as M
from nanochat_unsloth.model.build import ModelOptions, build_model
from nanochat_unsloth.model.gpt import GPT, GPTConfig
from nanochat_unsloth.train.config import parse_train_args

from tiny_gpt import TINY, assert_same_step, build_tiny, loss_and_grads, tiny_batch
from train_fixtures import TINY_TRAIN_ARGS, make_train_base_dir


pytestmark = pytest.mark.usefixtures("fresh_notices")


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
    assert_same_step(loss_lean, g_lean, loss_fast, g_fast)
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
    assert_same_step(loss_partial, g_partial, loss_fast, g_fast)
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


def test_memory_lean_offload_falls_back_on_cpu_with_one_notice(capsys):
    """`--lean_checkpoint offload` where it cannot run; the library default is torch's (a run's `auto`, offload
    where it runs, is train/resolve.py's: tests/test_resolve.py)."""
    model = build_tiny(memory="lean")
    assert model.lean_checkpoint == "torch"
    model.lean_checkpoint = "offload"
    x, y = tiny_batch()
    loss_and_grads(model, x, y)
    loss_and_grads(model, x, y)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("notice: --memory lean") and "torch.utils.checkpoint" in err
    assert M.lean_checkpoint_impl(torch.device("cpu"), "offload") is M._torch_checkpoint


def test_unknown_memory_mode_and_lean_checkpoint():
    with pytest.raises(ValueError, match=r"--memory.*fast, lean"):
        GPT(TINY, memory="tiny")
    with pytest.raises(ValueError, match=r"--lean_checkpoint 'disk'.*offload, torch"):
        build_model(TINY, ModelOptions(memory="lean", lean_checkpoint="disk"))
    with pytest.raises(ValueError, match=r"--lean_checkpoint 'auto'.*train/resolve.py decides auto"):
        build_model(TINY, ModelOptions(memory="lean", lean_checkpoint="auto"))


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
