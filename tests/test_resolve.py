"""train/resolve.py: every `auto` rule on a CPU and on a GPU described by the test (no GPU needed), each machine
probe asked only where its answer matters, the refusals, and the resolved line in the log and the checkpoint."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from nanochat_unsloth.cli import normalize_flags
from nanochat_unsloth.common import UserError
from nanochat_unsloth.model import cpu_probe, memory
from nanochat_unsloth.train import bf16_gemm
from nanochat_unsloth.train.config import parse_train_args
from nanochat_unsloth.train.resolve import ResolvedOptions, model_options, resolve

pytestmark = pytest.mark.usefixtures("fresh_notices")

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
SMALL = ["--device_batch_size=4", "--max_seq_len=2048"]  # 8,192 rows per micro-batch
LARGE = ["--device_batch_size=8", "--max_seq_len=2048"]  # 16,384
REFUSAL = "could not create a primitive descriptor for the matmul primitive"


@pytest.fixture
def machine(monkeypatch):
    """`machine(capability=, unsloth=, cpu_bf16=)` answers the resolver's probes as such a machine would: the
    GPU's compute capability, whether unsloth_zoo imports, the CPU's bf16 ("none": no bf16 instructions,
    "refused" by oneDNN, "fast", "slow"). None: the probe must not be asked."""
    monkeypatch.setattr(bf16_gemm, "_cpu_choice", None)
    for name in ("_bf16_timing", "_bf16_refusal"):
        monkeypatch.setattr(cpu_probe, name, None)

    def describe(capability=None, unsloth=None, cpu_bf16=None):
        def ask(what, answer):
            if answer is None:
                pytest.fail(f"the resolver asked about {what}, which this case does not need")
            return answer

        def import_unsloth(name):
            if not ask("unsloth_zoo", unsloth):
                raise ImportError("No module named 'unsloth_zoo'")

        def probe():
            slowdown = {"fast": 0.5, "slow": 3.0}.get(ask("bf16 speed", cpu_bf16))
            if slowdown is None:
                pytest.fail(f"timed bf16 on a CPU whose bf16 is {cpu_bf16!r}")
            return {"fp32_gflops": 100.0, "bf16_gflops": 100.0 / slowdown, "bf16_slowdown": slowdown}

        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: ask("the GPU", capability))
        monkeypatch.setattr(memory, "import_unsloth_module", import_unsloth)
        monkeypatch.setattr(cpu_probe, "cpu_has_bf16_instructions",
                            lambda: ask("bf16 instructions", cpu_bf16) != "none")
        monkeypatch.setattr(cpu_probe, "bf16_matmul_runs",
                            lambda: (False, REFUSAL) if ask("a bf16 matmul", cpu_bf16) == "refused" else (True, ""))
        monkeypatch.setattr(cpu_probe, "probe_cpu_bf16", probe)

    return describe


def config(flags):
    cfg = parse_train_args(normalize_flags(flags))
    cfg.validate()
    return cfg


H100 = {"capability": (9, 0)}  # no unsloth_zoo answer: a case that asks must say
A100 = {"capability": (8, 0)}  # no FP8 GEMMs
NO_BF16 = {"cpu_bf16": "none"}

# (flags, device, processes, DeepSpeed ZeRO stage, the machine, the settings expected: those not named are
# checked by other rows)
TABLE = {
    # --kernels: the fused set is the CUDA one
    "kernels cpu": ([], CPU, 1, None, NO_BF16, {"kernels": "torch", "compile": "none", "cuda_graphs": "off"}),
    "kernels cuda": ([], CUDA, 1, None, {}, {"kernels": "fused", "compile": "blocks", "cuda_graphs": "off"}),
    "kernels torch on cuda": (["--kernels=torch"], CUDA, 1, None, {}, {"kernels": "torch"}),
    "kernels fused on cpu": (["--kernels=fused"], CPU, 1, None, NO_BF16, {"kernels": "fused"}),  # build falls back
    "kernels unsloth": (["--kernels=unsloth"], CPU, 1, None, NO_BF16, {"kernels": "fused"}),
    # --fp8_scaling: dynamic at every size, FP8 or not (delayed only when asked for)
    "scaling default": ([], CUDA, 1, None, {}, {"fp8_scaling": "dynamic"}),  # 32 x 2048
    "scaling fp8 small": (["--fp8", *SMALL], CUDA, 1, None, H100, {"fp8_scaling": "dynamic"}),
    "scaling fp8 large": (["--fp8", *LARGE], CUDA, 1, None, H100, {"fp8_scaling": "dynamic"}),
    "scaling delayed": (["--fp8_scaling=delayed", *SMALL], CPU, 1, None, NO_BF16, {"fp8_scaling": "delayed"}),
    "scaling dynamic": (["--fp8_scaling=dynamic", *LARGE], CPU, 1, None, NO_BF16, {"fp8_scaling": "dynamic"}),
    # --compile (CUDA only): whole for torch, by blocks for fused or lean, whole for the fused small FP8 step
    "compile torch fast": (["--kernels=torch"], CUDA, 1, None, {}, {"compile": "model", "cuda_graphs": "off"}),
    "compile torch selective": (["--kernels=torch", "--memory=selective"], CUDA, 1, None, {}, {"compile": "model"}),
    "compile torch lean": (["--kernels=torch", "--memory=lean", "--lean_checkpoint=torch"], CUDA, 1, None, {},
                           {"compile": "blocks"}),
    "compile fused lean": (["--memory=lean", "--lean_checkpoint=torch"], CUDA, 1, None, {}, {"compile": "blocks"}),
    "compile fused fp8 small": (["--fp8", *SMALL], CUDA, 1, None, H100, {"compile": "model", "cuda_graphs": "on"}),
    "compile fused fp8 large": (["--fp8", *LARGE], CUDA, 1, None, H100, {"compile": "blocks", "cuda_graphs": "off"}),
    "compile fused small no fp8": (SMALL, CUDA, 1, None, {}, {"compile": "blocks", "cuda_graphs": "off"}),
    "compile fused fp8 small A100": (["--fp8", *SMALL], CUDA, 1, None, A100, {"compile": "blocks",
                                                                            "cuda_graphs": "off"}),
    "compile fused fp8 small selective": (["--fp8", "--memory=selective", *SMALL], CUDA, 1, None, H100,
                                          {"compile": "blocks", "cuda_graphs": "off"}),
    "compile torch fp8 small": (["--kernels=torch", "--fp8", *SMALL], CUDA, 1, None, H100,
                                {"compile": "model", "cuda_graphs": "off"}),
    "compile model on cpu": (["--compile=model"], CPU, 1, None, NO_BF16, {"compile": "none"}),
    "compile none": (["--compile=none"], CUDA, 1, None, {}, {"compile": "none"}),
    "compile blocks": (["--kernels=torch", "--compile=blocks"], CUDA, 1, None, {}, {"compile": "blocks"}),
    "compile zero2": (["--kernels=torch"], CUDA, 2, 2, {}, {"compile": "blocks"}),  # DeepSpeed: never whole
    "compile zero3": (["--kernels=torch"], CUDA, 2, 3, {}, {"compile": "none"}),
    # --cuda_graphs (CUDA, one process, whole-model graph): auto only for the fused small FP8 step
    "graphs two processes": (["--fp8", *SMALL], CUDA, 2, None, H100, {"compile": "model", "cuda_graphs": "off"}),
    "graphs off": (["--fp8", "--cuda_graphs=off", *SMALL], CUDA, 1, None, H100,
                   {"compile": "model", "cuda_graphs": "off"}),
    "graphs on": (["--kernels=torch", "--cuda_graphs=on"], CUDA, 1, None, {},
                  {"compile": "model", "cuda_graphs": "on"}),
    "graphs on cpu": (["--cuda_graphs=on"], CPU, 1, None, NO_BF16, {"cuda_graphs": "off"}),
    # --fp8_weight_cache: on for our FP8 recipe compiled block by block (where it was measured), not with lean
    "cache fp8 large": (["--fp8", *LARGE], CUDA, 1, None, H100, {"fp8_weight_cache": "on", "compile": "blocks"}),
    "cache fp8 selective": (["--fp8", "--memory=selective", *LARGE], CUDA, 1, None, H100, {"fp8_weight_cache": "on"}),
    "cache fp8 lean": (["--fp8", "--memory=lean", "--lean_checkpoint=torch", *LARGE], CUDA, 1, None, H100,
                       {"fp8_weight_cache": "off", "compile": "blocks"}),
    "cache fp8 small graphs": (["--fp8", *SMALL], CUDA, 1, None, H100, {"fp8_weight_cache": "off",
                                                                       "cuda_graphs": "on"}),
    "cache fp8 torch kernels": (["--kernels=torch", "--fp8", *LARGE], CUDA, 1, None, H100,
                                {"fp8_weight_cache": "off", "compile": "model"}),
    "cache torchao recipe": (["--fp8", "--fp8_recipe=torchao_tensorwise", *LARGE], CUDA, 1, None, H100,
                             {"fp8_weight_cache": "off"}),
    "cache fp8 A100": (["--fp8", *LARGE], CUDA, 1, None, A100, {"fp8_weight_cache": "off"}),
    "cache no fp8": ([], CUDA, 1, None, {}, {"fp8_weight_cache": "off"}),
    "cache fp8 cpu": (["--fp8"], CPU, 1, None, NO_BF16, {"fp8_weight_cache": "off"}),
    "cache on": (["--fp8_weight_cache=on"], CPU, 1, None, NO_BF16, {"fp8_weight_cache": "on"}),
    # --lean_checkpoint: offload where CUDA and unsloth_zoo are, asked only when a block is checkpointed
    "lean cuda unsloth": (["--memory=lean"], CUDA, 1, None, {"unsloth": True}, {"lean_checkpoint": "offload"}),
    "lean cuda no unsloth": (["--memory=lean"], CUDA, 1, None, {"unsloth": False}, {"lean_checkpoint": "torch"}),
    "lean cpu": (["--memory=lean"], CPU, 1, None, NO_BF16, {"lean_checkpoint": "torch"}),
    "lean offload no unsloth": (["--memory=lean", "--lean_checkpoint=offload"], CUDA, 1, None, {"unsloth": False},
                                {"lean_checkpoint": "torch"}),
    "lean torch": (["--memory=lean", "--lean_checkpoint=torch"], CUDA, 1, None, {}, {"lean_checkpoint": "torch"}),
    "lean no blocks": (["--memory=lean", "--lean_blocks=0"], CUDA, 1, None, {}, {"lean_checkpoint": "torch"}),
    "lean fast": ([], CUDA, 1, None, {}, {"lean_checkpoint": "torch"}),
    "lean selective": (["--memory=selective"], CUDA, 1, None, {}, {"lean_checkpoint": "torch"}),
    # --cpu_bf16: native off the CPU; on it native only with bf16 instructions that oneDNN runs fast
    "bf16 gpu": ([], CUDA, 1, None, {}, {"cpu_bf16": "native"}),
    "bf16 no instructions": ([], CPU, 1, None, NO_BF16, {"cpu_bf16": "emulated"}),
    "bf16 refused": ([], CPU, 1, None, {"cpu_bf16": "refused"}, {"cpu_bf16": "emulated"}),
    "bf16 fast": ([], CPU, 1, None, {"cpu_bf16": "fast"}, {"cpu_bf16": "native"}),
    "bf16 slow": ([], CPU, 1, None, {"cpu_bf16": "slow"}, {"cpu_bf16": "emulated"}),
    "bf16 native": (["--cpu_bf16=native"], CPU, 1, None, {}, {"cpu_bf16": "native"}),
    "bf16 emulated": (["--cpu_bf16=emulated"], CPU, 1, None, {}, {"cpu_bf16": "emulated"}),
}


@pytest.mark.parametrize("case", list(TABLE))
def test_every_auto_rule(machine, case):
    flags, device, processes, zero_stage, described, expected = TABLE[case]
    machine(**described)
    cfg = config(flags)
    got = resolve(cfg, device, processes, zero_stage)
    assert {name: getattr(got, name) for name in expected} == expected
    # every resolved value is one its flag accepts, and resolves to itself
    again = dataclasses.replace(cfg, **got.to_dict())
    again.validate()
    assert resolve(again, device, processes, zero_stage) == got


def test_what_the_builders_receive_is_concrete(machine):
    machine(**H100)
    cfg = config(["--fp8", *SMALL, "--fp8_recipe=torchao_rowwise", "--lean_blocks=0", "--memory=lean"])
    options = model_options(cfg, resolve(cfg, CUDA))
    assert (options.kernels, options.fp8_scaling, options.compile, options.cuda_graphs, options.lean_checkpoint) == \
        ("fused", "dynamic", "blocks", False, "torch")
    assert (options.fp8, options.fp8_recipe, options.memory, options.lean_blocks) == (True, "torchao_rowwise", "lean", 0)


def test_refusals_name_the_flag(machine):
    machine(**H100)
    with pytest.raises(UserError, match=r"^--cuda_graphs on .* compiles as 'blocks': add --compile model"):
        resolve(config(["--cuda_graphs=on"]), CUDA)
    with pytest.raises(UserError, match=r"^--cuda_graphs on runs in one process only \(2 here\)"):
        resolve(config(["--cuda_graphs=on", "--compile=model"]), CUDA, 2)
    rows = ["--device_batch_size=1", "--max_seq_len=24"]
    with pytest.raises(UserError, match=r"^--fp8 needs --device_batch_size x --max_seq_len .* not 1 x 24"):
        resolve(config(["--fp8", *rows]), CUDA)
    machine(**A100, cpu_bf16="none")  # where FP8 does not run (bf16 with a notice), any rows do
    assert resolve(config(["--fp8", *rows]), CUDA).compile == "blocks"
    assert resolve(config(["--fp8", *rows]), CPU).compile == "none"


@pytest.mark.parametrize("cpu, line", [
    ("none", "cpu bf16 GEMMs: emulated (no AVX-512-BF16/AMX on this CPU)"),
    ("refused", f"cpu bf16 GEMMs: emulated (oneDNN refuses bf16 matmuls here: {REFUSAL})"),
    ("fast", "cpu bf16 GEMMs: native (probe: bf16 200.0 vs fp32 100.0 GFLOP/s)"),
    ("slow", "cpu bf16 GEMMs: emulated (probe: bf16 33.3 vs fp32 100.0 GFLOP/s)"),
])
def test_cpu_bf16_probes_set_the_choice_and_its_summary(machine, cpu, line):
    """The loop configures bf16_gemm with the resolved choice and logs the probes' findings. Without bf16
    instructions nothing is timed (a timing alone flipped between processes under load: bf16_gemm.py)."""
    machine(cpu_bf16=cpu)
    choice = resolve(config([]), CPU).cpu_bf16
    assert bf16_gemm.configure_cpu_bf16(choice).name == choice == line.split()[3]
    assert bf16_gemm.cpu_math().name == choice and cpu_probe.bf16_summary(choice) == line
    if cpu == "refused":  # asked for outright, native is refused in one line
        with pytest.raises(UserError, match="^--cpu_bf16 native: this CPU's oneDNN refuses bf16 matmuls"):
            bf16_gemm.configure_cpu_bf16("native")


@pytest.mark.parametrize("cpu, choice", [("none", "emulated"), ("fast", "native")])
def test_a_process_without_a_run_takes_the_auto_rule(machine, cpu, choice):
    """Library code running Muon on CPU tensors outside a run (tests, benchmarks) computes as a run on this
    CPU would, so that it agrees with the processes it is compared with. `auto` itself is a flag value only."""
    machine(cpu_bf16=cpu)
    assert bf16_gemm.cpu_math().name == choice
    with pytest.raises(ValueError, match="--cpu_bf16 'auto' is not one of: native, emulated"):
        bf16_gemm.configure_cpu_bf16("auto")


def test_lean_offload_unavailable_is_one_notice(machine, capsys):
    machine(unsloth=False, cpu_bf16="none")
    for device in (CPU, CUDA):
        assert resolve(config(["--memory=lean"]), device).lean_checkpoint == "torch"
    notices = capsys.readouterr().err.splitlines()
    assert len(notices) == 2 and all(n.startswith("notice: --memory lean: Unsloth's offloaded checkpointing is "
                                                  "unavailable") for n in notices)
    assert "needs a CUDA GPU" in notices[0] and "unsloth_zoo" in notices[1]


def test_the_run_logs_the_resolved_line_once_and_saves_it_in_meta(tmp_path, capsys):
    from train_fixtures import TINY_TRAIN_ARGS, make_train_base_dir

    from nanochat_unsloth.checkpoint.meta import load_meta
    from nanochat_unsloth.checkpoint.store import list_checkpoints
    from nanochat_unsloth.train.loop import train

    base = make_train_base_dir(tmp_path / "base", train_tokens=5000, val_tokens=2000)
    train(parse_train_args(normalize_flags(TINY_TRAIN_ARGS + ["--base-dir", str(base), "--num-iterations", "1",
                                                              "--eval-tokens", "0"])))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("resolved: ")]
    (step, step_dir), = list_checkpoints(base / "runs" / "d2")
    meta = load_meta(step_dir)
    saved = ResolvedOptions(**meta.resolved)
    assert lines == [saved.line()]
    assert (saved.kernels, saved.compile, saved.cuda_graphs, saved.lean_checkpoint) == ("torch", "none", "off", "torch")
    assert meta.cpu_bf16 == saved.cpu_bf16 == bf16_gemm.cpu_math().name
    assert json.loads((step_dir / "meta.json").read_text())["resolved"] == saved.to_dict()
