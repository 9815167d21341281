"""bf16 GEMMs on any CPU: the emulated path computes a bf16 GEMM, Newton-Schulz on it stays within bf16
noise of nanochat's; what `--cpu_bf16 auto` decides: tests/test_resolve.py."""

import pytest
import torch

from nanochat_unsloth.common import UserError
from nanochat_unsloth.model import cpu_probe
from nanochat_unsloth.train import bf16_gemm
from nanochat_unsloth.train.bf16_gemm import EMULATED, NATIVE
from nanochat_unsloth.train.optim import zeropower_via_newtonschulz5

NS_SHAPES = [(4, 64, 256), (4, 256, 64), (3, 128, 128)]


def nanochat_newtonschulz5(G, steps=5, dtype=torch.bfloat16):
    """nanochat b399e43's zeropower_via_newtonschulz5, operation for operation, eager, in `dtype` (bf16 as
    nanochat runs it; float64 gives the exact iteration the bf16 ones approximate)."""
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.to(dtype)
    if G.size(-2) > G.size(-1):
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if G.size(-2) > G.size(-1):
        X = X.mT
    return X


def rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.fixture
def fresh_choice(monkeypatch):
    monkeypatch.setattr(bf16_gemm, "_cpu_choice", None)
    monkeypatch.setattr(cpu_probe, "_bf16_timing", None)
    monkeypatch.setattr(cpu_probe, "_bf16_refusal", None)


@pytest.mark.parametrize("math", [EMULATED, NATIVE], ids=lambda m: m.name)
def test_gemm_is_a_correctly_rounded_bf16_gemm(math):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 300, generator=g).bfloat16()
    b = torch.randn(300, 48, generator=g).bfloat16()
    out = math.mm(math.round(a), math.round(b))
    assert out.bfloat16().float().equal(out.float()), "the result holds bf16 values"
    exact = a.double() @ b.double()
    ulp = 2.0 ** (torch.floor(torch.log2(exact.abs())) - 7)  # bf16: 8 significant bits
    # Rounding to nearest is within half an ulp of the fp32-accumulated sum, which is within
    # K * 2^-24 * sum|a*b| of the exact one (measured: at most 0.4998 ulp in all, AVX-512 and AVX2).
    fp32_accumulation = 300 * 2.0**-24 * (a.double().abs() @ b.double().abs())
    assert ((out.double() - exact).abs() <= 0.5 * ulp + fp32_accumulation).all()


@pytest.mark.parametrize("shape", NS_SHAPES)
def test_native_newton_schulz_is_nanochats_bitwise(shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(zeropower_via_newtonschulz5(G, 5, NATIVE), nanochat_newtonschulz5(G))


@pytest.mark.parametrize("shape", NS_SHAPES)
@pytest.mark.parametrize("seed", range(3))
def test_emulated_newton_schulz_is_within_bf16_noise_of_nanochats(shape, seed):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    ours = zeropower_via_newtonschulz5(G, 5, EMULATED)
    assert ours.dtype == torch.bfloat16
    theirs = nanochat_newtonschulz5(G)
    exact = nanochat_newtonschulz5(G, dtype=torch.float64)
    # Two bf16 computations of five amplifying iterations: measured over 10 seeds x these shapes and
    # (2, 256, 1024), the same on AVX-512 and AVX2 (ONEDNN_MAX_CPU_ISA=AVX2): emulated vs nanochat's
    # <= 3.8e-2, emulated vs float64 <= 2.7e-2, nanochat's own vs float64 <= 3.5e-2. So the emulated
    # iteration is as close to the exact one as nanochat's, and the two differ by bf16 noise only.
    assert rel(ours, theirs) < 6e-2
    assert rel(ours, exact) < 4e-2
    assert rel(theirs, exact) < 5e-2


def test_explicit_choices_and_cpu_tensors_use_them(fresh_choice):
    G = torch.randn(2, 32, 64, generator=torch.Generator().manual_seed(3))
    bf16_gemm.configure_cpu_bf16("native")
    assert torch.equal(zeropower_via_newtonschulz5(G), nanochat_newtonschulz5(G))
    bf16_gemm.configure_cpu_bf16("emulated")
    assert torch.equal(zeropower_via_newtonschulz5(G), zeropower_via_newtonschulz5(G, 5, EMULATED))
    with pytest.raises(ValueError, match="--cpu_bf16 'fast' is not one of: native, emulated"):
        bf16_gemm.configure_cpu_bf16("fast")


def test_probe_times_both_dtypes():
    probe = cpu_probe.probe_cpu_bf16(size=64, repeats=2)
    assert probe["fp32_gflops"] > 0 and probe["bf16_gflops"] > 0
    assert probe["bf16_slowdown"] == pytest.approx(probe["fp32_gflops"] / probe["bf16_gflops"])


def test_training_refuses_an_unknown_choice(tmp_path):
    from train_fixtures import TINY_TRAIN_ARGS, make_train_base_dir

    from nanochat_unsloth.cli import normalize_flags
    from nanochat_unsloth.train.config import parse_train_args
    from nanochat_unsloth.train.loop import train

    base = make_train_base_dir(tmp_path / "base", train_tokens=5000, val_tokens=2000)
    cfg = parse_train_args(normalize_flags(TINY_TRAIN_ARGS + ["--base-dir", str(base), "--num-iterations", "1",
                                                              "--cpu_bf16=fast"]))
    with pytest.raises(UserError, match="--cpu_bf16 'fast' is not one of"):
        train(cfg)


def test_native_is_refused_where_onednn_refuses_bf16(fresh_choice, monkeypatch):
    """A CPU whose flags list bf16 instructions but whose oneDNN is held to fewer (ONEDNN_MAX_CPU_ISA) may
    refuse a bf16 matmul outright: the probe runs one on a tiny tensor (`--cpu_bf16 auto` then emulates:
    tests/test_resolve.py)."""
    refusal = "could not create a primitive descriptor for the matmul primitive"

    def refuse():
        raise RuntimeError(refusal)

    real_op_runs = cpu_probe.op_runs
    monkeypatch.setattr(cpu_probe, "op_runs", lambda op: real_op_runs(refuse))
    assert cpu_probe.bf16_refusal() == refusal
    with pytest.raises(UserError, match="--cpu_bf16 native: this CPU's oneDNN refuses bf16 matmuls"):
        bf16_gemm.configure_cpu_bf16("native")
