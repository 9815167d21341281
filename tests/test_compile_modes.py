"""--compile and --cuda_graphs (model/compile.py): what each compile mode does, state-dict names kept, CUDA
graphs only on the whole-model graph, compiled blocks in training only. What `auto` picks: tests/test_resolve.py.
"""

from __future__ import annotations

import pytest
import torch

from nanochat_unsloth.cli import normalize_flags
from nanochat_unsloth.common import UserError
from nanochat_unsloth.model import compile as C
from nanochat_unsloth.train import optim
from nanochat_unsloth.train.config import parse_train_args

from tiny_gpt import TINY, build_tiny, tiny_batch


pytestmark = pytest.mark.usefixtures("fresh_notices")


def test_blocks_keep_state_dict_names():
    """Which mode a run compiles in is train/resolve.py's (tests/test_resolve.py); here what each mode does."""
    model = build_tiny()
    names = list(model.state_dict())
    assert C.compile_for_training(model, model, "none") is model and model.compiled_blocks is None
    assert C.compile_for_training(model, model, "blocks") is model  # compiles lazily, on first call
    assert len(model.compiled_blocks) == TINY.n_layer
    assert list(model.state_dict()) == names and len(list(model.parameters())) == len(names)
    with pytest.raises(ValueError):
        C.compile_for_training(model, model, "fastest")
    with pytest.raises(ValueError, match="compile mode 'auto'"):
        C.compile_for_training(model, model, "auto")


def test_cuda_graphs_only_replay_the_whole_model_graph():
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
