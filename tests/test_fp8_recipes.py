"""--fp8_recipe and the FP8 scaling settings a resume must keep.

Our tensorwise recipe is checked GEMM by GEMM (which operands are FP8, which accumulation each GEMM takes);
the GEMMs' values against their quantized operands are test_fp8.py's. The torchao recipes run on the GPU
only (test_kernels_parity_gpu.py).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nanochat_unsloth.checkpoint.meta import RunMeta
from nanochat_unsloth.checkpoint.resume import RESUME_GUARDED_FIELDS, auto_fp8_scaling, check_resume_compatible
from nanochat_unsloth.common import UserError
from nanochat_unsloth.model import fp8 as F8
from nanochat_unsloth.train import optim
from nanochat_unsloth.train.config import TrainConfig, parse_train_args

pytestmark = pytest.mark.usefixtures("fresh_notices")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_tensorwise_runs_three_fp8_gemms_with_fast_accumulation_in_the_forward_only(monkeypatch):
    real, calls = F8._scaled_mm, []

    def record(a, a_inv, b, b_inv, out_dtype, fast_accum):
        calls.append((a.dtype, b.dtype, out_dtype, fast_accum))
        return real(a, a_inv, b, b_inv, out_dtype, fast_accum)

    monkeypatch.setattr(F8, "_scaled_mm", record)
    x = torch.randn(32, 64, generator=gen(1)).requires_grad_()
    w = (torch.randn(48, 64, generator=gen(2)) * 0.1).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = F8.fp8_matmul(x, w)
    y.backward(torch.randn(32, 48, generator=gen(3)).to(torch.bfloat16))
    e4, e5, bf, f32 = F8.E4M3, F8.E5M2, torch.bfloat16, torch.float32
    # forward y (e4m3 x, e4m3 W), then dx (e5m2 dy, e4m3 W) and dW (e5m2 dy, e4m3 x) straight into fp32
    assert calls == [(e4, e4, bf, True), (e5, e4, bf, False), (e5, e4, f32, False)]
    assert x.grad is not None and w.grad.dtype == torch.float32


def test_recipe_flag_parses_validates_and_is_guarded_on_resume():
    cfg = parse_train_args(["--fp8", "--fp8-recipe", "torchao_rowwise"])
    assert cfg.fp8_recipe == "torchao_rowwise"
    cfg.validate()
    assert {"fp8_recipe", "fp8_scaling"} <= set(RESUME_GUARDED_FIELDS)
    # the recipes of the 2026-12-06 ablation that measured no gain are gone: one line naming the flag
    for gone in ("bf16_wgrad", "forward_only", "backward_only", "full_accum"):
        with pytest.raises(UserError, match=f"--fp8_recipe '{gone}' is not one of: tensorwise, torchao_tensorwise"):
            dataclasses.replace(TrainConfig(), fp8_recipe=gone).validate()
    with pytest.raises(UserError, match="unknown flag --fp8-warmdown"):
        parse_train_args(["--fp8", "--fp8-warmdown", "bf16"])


def test_warmdown_starts_where_the_lr_starts_to_decay():
    for n, ratio in ((288, 0.2), (10, 0.5), (7, 0.0)):
        start = optim.warmdown_start(n, ratio)
        assert optim.lr_multiplier(start, n, 0.0, ratio) == 1.0
        if start + 1 <= n and ratio > 0:
            assert optim.lr_multiplier(start + 1, n, 0.0, ratio) < 1.0


# -----------------------------------------------------------------------------
# --fp8_scaling auto meant delayed scaling at >= 16,384 rows before 2026-12-06, dynamic since


def meta_of(resolved=None, **config) -> RunMeta:
    return RunMeta(step=10, train_config={"depth": 2, "max_seq_len": 2048, **config}, resolved=resolved)


def cfg_of(**flags) -> TrainConfig:
    return dataclasses.replace(TrainConfig(), depth=2, max_seq_len=2048, **flags)


@pytest.mark.parametrize("config, resolved, expect", [
    ({"fp8": True, "device_batch_size": 32}, None, "delayed"),  # 65,536 rows, before the record existed
    ({"fp8": True, "device_batch_size": 4}, None, "dynamic"),  # 8,192 rows
    ({"fp8": True, "device_batch_size": 32}, {"fp8_scaling": "dynamic"}, "dynamic"),  # as the run resolved it
    ({"fp8": True, "device_batch_size": 4, "fp8_scaling": "delayed"}, None, None),  # named: not auto's choice
])
def test_auto_fp8_scaling_reads_the_record_or_the_former_auto_rule(config, resolved, expect):
    assert auto_fp8_scaling(meta_of(resolved, **config)) == expect


def test_a_run_that_auto_scaled_delayed_resumes_dynamic_with_a_notice_or_keeps_delayed_when_named(capsys):
    old = meta_of(fp8=True, device_batch_size=32, fp8_scaling="auto")
    check_resume_compatible(old, cfg_of(fp8=True, device_batch_size=32))
    assert "continues with dynamic scaling" in capsys.readouterr().err
    check_resume_compatible(old, cfg_of(fp8=True, device_batch_size=32, fp8_scaling="delayed"))  # not refused
    with pytest.raises(UserError, match="--fp8_scaling=auto"):  # another named scaling is still guarded
        check_resume_compatible(meta_of(fp8=True, device_batch_size=4, fp8_scaling="auto"),
                                cfg_of(fp8=True, device_batch_size=4, fp8_scaling="delayed"))
    check_resume_compatible(meta_of(fp8=True, device_batch_size=4, fp8_scaling="auto"), cfg_of(fp8=True,
                                                                                             device_batch_size=4))
    assert "continues with dynamic" not in capsys.readouterr().err  # it was dynamic already


@pytest.mark.parametrize("removed", [{"fp8_warmdown": "bf16"}, {"fp8_bf16_ends": 1}, {"fp8_lm_head": True}])
def test_a_run_started_with_a_removed_fp8_setting_is_refused_on_resume_unless_forced(removed):
    meta = meta_of(fp8=True, device_batch_size=32, fp8_scaling="dynamic", **removed)
    with pytest.raises(UserError, match="removed on 2026-12-06"):
        check_resume_compatible(meta, cfg_of(fp8=True, device_batch_size=32, fp8_scaling="dynamic"))
    check_resume_compatible(meta, cfg_of(fp8=True, device_batch_size=32, fp8_scaling="dynamic", force=True))
    off = meta_of(fp8=True, device_batch_size=32, fp8_scaling="dynamic", fp8_warmdown="fp8", fp8_bf16_ends=0,
                  fp8_lm_head=False)
    check_resume_compatible(off, cfg_of(fp8=True, device_batch_size=32, fp8_scaling="dynamic"))


def test_a_run_started_with_a_removed_fp8_scaling_is_refused_on_resume_unless_forced():
    """`--fp8_scaling delayed_grad` (removed 2026-12-06): the flag no longer takes it, so "pass the same settings"
    would be advice nobody can follow; the refusal names the removal instead."""
    meta = meta_of(fp8=True, device_batch_size=32, fp8_scaling="delayed_grad")
    with pytest.raises(UserError, match=r"--fp8_scaling delayed_grad, a setting removed on 2026-12-06.*--force"):
        check_resume_compatible(meta, cfg_of(fp8=True, device_batch_size=32))
    check_resume_compatible(meta, cfg_of(fp8=True, device_batch_size=32, force=True))
