"""--optimizer adamw8bit (train/optim.py): its groups and cosine schedule, and the fallback to torch AdamW
without CUDA or bitsandbytes (one notice).
"""

from __future__ import annotations

import builtins
import math

import pytest
import torch

from nanochat_unsloth.common import UserError
from nanochat_unsloth.model.gpt import GPTConfig
from nanochat_unsloth.train import optim
from nanochat_unsloth.train.config import parse_train_args

from tiny_gpt import build_tiny


pytestmark = pytest.mark.usefixtures("fresh_notices")


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
