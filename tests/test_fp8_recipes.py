"""--fp8_recipe, --fp8_bf16_ends and --fp8_warmdown: which GEMMs of a block Linear read FP8 operands.

Each recipe is checked GEMM by GEMM against the reference it claims: an FP8 GEMM equals the GEMM of its
quantized operands (test_fp8.py's bound), a bf16 one equals the exact path's bf16 GEMM bit for bit.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nanochat_unsloth.model import fp8 as F8
from nanochat_unsloth.model.build import ModelOptions, build_model
from nanochat_unsloth.train import optim
from nanochat_unsloth.train.config import TrainConfig, parse_train_args
from nanochat_unsloth.common import UserError
from tiny_gpt import TINY

pytestmark = pytest.mark.usefixtures("fresh_notices")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def recorded_gemms(monkeypatch):
    """Record each FP8 GEMM's (a dtype, b dtype, out dtype, fast_accum) and run the real one."""
    real, calls = F8._scaled_mm, []

    def record(a, a_inv, b, b_inv, out_dtype, fast_accum):
        calls.append((a.dtype, b.dtype, out_dtype, fast_accum))
        return real(a, a_inv, b, b_inv, out_dtype, fast_accum)

    monkeypatch.setattr(F8, "_scaled_mm", record)
    return calls


def linear_grads(recipe: F8.Fp8Recipe | None):
    """y, dx, dW of one Linear under bf16 autocast: `recipe`'s GEMMs, or F.linear's (None)."""
    x = torch.randn(32, 64, generator=gen(1)).requires_grad_()
    w = (torch.randn(48, 64, generator=gen(2)) * 0.1).requires_grad_()
    g = torch.randn(32, 48, generator=gen(3)).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.nn.functional.linear(x, w) if recipe is None else F8.fp8_matmul(x, w, recipe=recipe)
    y.backward(g)
    return y.detach(), x.grad, w.grad


E4, E5, BF, F32 = F8.E4M3, F8.E5M2, torch.bfloat16, torch.float32
EXPECTED_GEMMS = {  # recipe -> the FP8 GEMMs it runs, in order (forward, dx, dW)
    "tensorwise": [(E4, E4, BF, True), (E5, E4, BF, False), (E5, E4, F32, False)],
    "bf16_wgrad": [(E4, E4, BF, True), (E5, E4, BF, False)],
    "full_accum": [(E4, E4, BF, False), (E5, E4, BF, False), (E5, E4, F32, False)],
    "forward_only": [(E4, E4, BF, True)],
    "backward_only": [(E5, E4, BF, False), (E5, E4, F32, False)],
}


@pytest.mark.parametrize("name", list(F8.RECIPES))
def test_each_recipe_runs_its_fp8_gemms_and_leaves_the_others_exact(name, monkeypatch):
    assert set(EXPECTED_GEMMS) == set(F8.RECIPES)
    y_ref, dx_ref, dw_ref = linear_grads(None)
    calls = recorded_gemms(monkeypatch)
    recipe = F8.RECIPES[name]
    y, dx, dw = linear_grads(recipe)
    assert calls == EXPECTED_GEMMS[name]
    # a bf16 GEMM is the exact path's bit for bit; an FP8 one differs (e4m3/e5m2 rounding of its operands)
    for fp8_gemm, got, ref in ((recipe.forward, y, y_ref), (recipe.wgrad, dw, dw_ref)):
        assert torch.equal(got, ref) != fp8_gemm, (name, (got - ref).abs().max())
    if not (recipe.forward or recipe.dgrad):
        assert torch.equal(dx, dx_ref)


def test_the_bf16_recipe_is_f_linear_itself(monkeypatch):
    monkeypatch.setattr(F8, "_scaled_mm", lambda *a, **k: pytest.fail("no FP8 GEMM in the bf16 recipe"))
    for got, ref in zip(linear_grads(F8.BF16), linear_grads(None)):
        assert torch.equal(got, ref)


def fp8_model(monkeypatch, config=TINY, **options):
    monkeypatch.setattr(F8, "fp8_supported", lambda device: (True, ""))
    options = {"fp8_scaling": "delayed", **options}  # what `auto` resolves for micro-batches of 32K rows
    return build_model(config, ModelOptions(fp8=True, **options), "cpu", seed=0)


def test_bf16_ends_keep_the_first_and_last_blocks_bf16_without_scaling_state(monkeypatch):
    model = fp8_model(monkeypatch, dataclasses.replace(TINY, n_layer=3), fp8_bf16_ends=1, fp8_scaling="delayed")
    n = len(model.transformer.h)
    assert n == 3
    for i, block in enumerate(model.transformer.h):
        linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
        end = i in (0, n - 1)
        assert all(layer.fp8_recipe == (F8.BF16 if end else F8.RECIPES["tensorwise"]) for layer in linears)
        # a bf16 layer records no amax: a scaling state there would keep delayed scaling from ever starting
        assert all(hasattr(layer, "fp8_scaling") != end for layer in linears)
    assert model.lm_head.__dict__.get("fp8_recipe") is None


@pytest.mark.parametrize("mode, expect", [("bf16", F8.BF16), ("bf16_forward", F8.RECIPES["backward_only"])])
def test_enter_warmdown_switches_every_block_linear_once(mode, expect, monkeypatch):
    model = fp8_model(monkeypatch)
    assert not F8.enter_warmdown(model, "fp8")
    assert F8.enter_warmdown(model, mode)
    recipes = {m.fp8_recipe for m in model.modules() if hasattr(m, "fp8_recipe")}
    assert recipes == {expect}
    assert not F8.enter_warmdown(model, mode)  # a second call changes nothing (the loop calls it every step)


def test_warmdown_starts_where_the_lr_starts_to_decay():
    for n, ratio in ((288, 0.2), (10, 0.5), (7, 0.0)):
        start = optim.warmdown_start(n, ratio)
        assert optim.lr_multiplier(start, n, 0.0, ratio) == 1.0
        if start + 1 <= n and ratio > 0:
            assert optim.lr_multiplier(start + 1, n, 0.0, ratio) < 1.0


def test_recipe_flags_parse_validate_and_are_guarded_on_resume():
    from nanochat_unsloth.checkpoint.resume import RESUME_GUARDED_FIELDS

    cfg = parse_train_args(["--fp8", "--fp8-recipe", "bf16_wgrad", "--fp8-warmdown", "bf16", "--fp8-bf16-ends", "1"])
    assert (cfg.fp8_recipe, cfg.fp8_warmdown, cfg.fp8_bf16_ends) == ("bf16_wgrad", "bf16", 1)
    cfg.validate()
    assert {"fp8_recipe", "fp8_warmdown", "fp8_bf16_ends"} <= set(RESUME_GUARDED_FIELDS)
    for bad, flag in (({"fp8_recipe": "rowwise"}, "--fp8_recipe"), ({"fp8_warmdown": "off"}, "--fp8_warmdown"),
                      ({"fp8_bf16_ends": -1}, "--fp8_bf16_ends"),
                      ({"fp8_recipe": "torchao_rowwise", "fp8_warmdown": "bf16"}, "--fp8_recipe")):
        with pytest.raises(UserError, match=flag):
            dataclasses.replace(TrainConfig(), **bad).validate()


# -----------------------------------------------------------------------------
# --fp8_warmdown in the real loop: the switch happens at the warm-down's first step, and resumes across it


def test_fp8_warmdown_switch_resumes_bit_exactly_across_it(tmp_path, monkeypatch, capsys):
    from nanochat_unsloth.cli import normalize_flags
    from nanochat_unsloth.checkpoint import store as ckpt
    from nanochat_unsloth.train.loop import train
    from train_fixtures import TINY_TRAIN_ARGS, make_train_base_dir

    monkeypatch.setattr(F8, "fp8_supported", lambda device: (True, ""))  # the FP8 math runs on the CPU too
    base = make_train_base_dir(tmp_path / "base")

    def run(tag, *extra):
        args = TINY_TRAIN_ARGS + ["--base-dir", str(base), "--fp8", "--num-iterations", "6", "--warmdown-ratio", "0.5",
                                  "--model-tag", tag, *extra]
        return train(parse_train_args(normalize_flags(args)))

    def losses(tag):
        import json
        lines = (base / "runs" / tag / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines]

    run("kept")  # FP8 throughout
    run("straight", "--fp8-warmdown", "bf16")
    assert "step 3: the LR warm-down starts; --fp8_warmdown bf16" in capsys.readouterr().out
    run("resumed", "--fp8-warmdown", "bf16", "--stop-after", "4")
    run("resumed", "--fp8-warmdown", "bf16", "--resume", "auto")
    assert "step 4: the LR warm-down starts" in capsys.readouterr().out  # the resumed run switches at once
    kept, straight, resumed = losses("kept"), losses("straight"), losses("resumed")
    assert straight == resumed
    # the switch changes the step math from the warm-down's first step (3) on, not before
    assert straight[:3] == kept[:3] and all(s != k for s, k in zip(straight[3:], kept[3:]))
    a = ckpt.load_model_state_dict(base / "runs" / "straight" / ckpt.step_dir_name(6))
    b = ckpt.load_model_state_dict(base / "runs" / "resumed" / ckpt.step_dir_name(6))
    assert all(torch.equal(a[k], b[k]) for k in a)
