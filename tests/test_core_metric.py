"""nanochat's CORE metric: prompts, scoring rules, the bundle refusal, the metric in the loop, nanochat's own CPU
example command, and (opt-in, NANOCHAT_SRC) the same numbers from nanochat's own core_eval."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from nanochat_unsloth.common import run_main
from nanochat_unsloth.eval.core import (evaluate_core, evaluate_task, load_bundle, render_language_modeling,
                                        render_multiple_choice, render_schema)
from nanochat_unsloth.model.build import build_model
from nanochat_unsloth.train import __main__ as train_main

from core_bundle import write_bundle, write_tiny_bundle
from core_dist_e2e import CONFIG as DIST_CONFIG
from cpu_launch import launch_cpu_processes
from train_fixtures import TINY_TRAIN_ARGS, byte_level_encoding, make_train_base_dir

NANOCHAT_SRC = os.environ.get("NANOCHAT_SRC")

# dev/runcpu.sh's base_train command at nanochat b399e43 (the example its README points CPU users to)
RUNCPU_BASE_TRAIN = ["--depth=4", "--max_seq_len=1024", "--device_batch_size=1", "--total_batch_size=1024",
                     "--eval_every=50", "--eval_tokens=4096", "--core_metric_every=50", "--core_metric_max_per_task=12",
                     "--sample_every=50", "--num_iterations=50"]
RUNCPU_STEPS = 2  # appended as --num_iterations=2 (the last flag wins): 50 steps of d4 cost minutes on CI's CPU


def test_prompts_render_as_nanochats_templates_do():
    """Few-shot examples, each followed by a blank line, then the example; language-modeling contexts are
    stripped, and so is the prompt without the continuation (nanochat's core_eval, rendered by hand)."""
    shot = {"query": "Q0", "choices": ["x", "y"], "gold": 0}
    item = {"query": "Q1", "choices": ["a", "b"], "gold": 1}
    assert render_multiple_choice(item, "\nAnswer: ", [shot]) == ["Q0\nAnswer: x\n\nQ1\nAnswer: a",
                                                                  "Q0\nAnswer: x\n\nQ1\nAnswer: b"]
    shot = {"context_options": ["e1", "e2"], "continuation": "m", "gold": 1}
    item = {"context_options": ["c1", "c2"], "continuation": "k", "gold": 0}
    assert render_schema(item, " ", [shot]) == ["e2 m\n\nc1 k", "e2 m\n\nc2 k"]
    shot = {"context": "a dog ", "continuation": "ran"}
    item = {"context": "  the cat ", "continuation": "sat"}
    assert render_language_modeling(item, " ", [shot]) == ["a dog ran\n\nthe cat", "a dog ran\n\nthe cat sat"]
    assert render_language_modeling(item, " ", []) == ["the cat", "the cat sat"]


class PrefersA(torch.nn.Module):
    """Logits that ignore the input and favour the byte 'a': the loss of a continuation falls with its share of
    a's, and greedy decoding writes a's; so every task's right answers follow from how it is written."""

    def forward(self, ids):
        logits = torch.zeros(*ids.shape, 265)
        logits[..., ord("a")] = 3.0
        return logits


KNOWN_BASELINES = {"mc": 25.0, "sch": 50.0, "lm": 0.0}
KNOWN_ACCURACY = {"mc": 3 / 4, "sch": 2 / 4, "lm": 2 / 3}  # what PrefersA must score on the bundle below


def write_known_answers_bundle(base: Path) -> Path:
    mc = [{"query": "q0", "choices": ["aaaa", "bbbb", "cccc", "dddd"], "gold": 0},  # right
          {"query": "q1", "choices": ["bbbb", "aaaa", "cccc", "dddd"], "gold": 1},  # right
          {"query": "q2", "choices": ["bbbb", "cccc", "aaaa", "dddd"], "gold": 0},  # wrong: 'aaaa' wins
          {"query": "q3", "choices": ["dddd", "cccc", "bbbb", "aaba"], "gold": 3}]  # right: most a's
    # one continuation after every option: equal losses, and nanochat takes the first of equal ones
    schema = [{"context_options": ["x1", "x22"], "continuation": "zz", "gold": g} for g in (0, 1, 0, 1)]
    lm = [{"context": "c0 ", "continuation": "aaa"},  # right: greedy writes a's
          {"context": "c1", "continuation": "aab"},  # wrong
          {"context": "c2", "continuation": "a"}]  # right
    tasks = ("icl_tasks:\n"
             "- {label: mc, dataset_uri: mc.jsonl, num_fewshot: [1], icl_task_type: multiple_choice,"
             " continuation_delimiter: ' => '}\n"
             "- {label: sch, dataset_uri: sch.jsonl, num_fewshot: [2], icl_task_type: schema}\n"
             # no delimiter: with the default " " the space would be the continuation's first token
             "- {label: lm, dataset_uri: lm.jsonl, num_fewshot: [0], icl_task_type: language_modeling,"
             " continuation_delimiter: ''}\n")
    return write_bundle(base, tasks, {"mc.jsonl": mc, "sch.jsonl": schema, "lm.jsonl": lm}, KNOWN_BASELINES)


def test_scoring_rules_and_centering_on_a_model_whose_answers_are_known(tmp_path):
    write_known_answers_bundle(tmp_path)
    out = evaluate_core(PrefersA(), byte_level_encoding(), load_bundle(tmp_path), "cpu")
    accuracy, baselines = KNOWN_ACCURACY, KNOWN_BASELINES
    # accuracies are float32 means of 0/1 flags, as nanochat's (2/3 is 0.6666667 in float32)
    assert out["results"] == pytest.approx(accuracy, abs=1e-7)
    centered = {k: (a - baselines[k] / 100) / (1 - baselines[k] / 100) for k, a in accuracy.items()}
    assert out["centered_results"] == pytest.approx(centered, abs=1e-6)
    assert out["core_metric"] == pytest.approx(sum(centered.values()) / 3, abs=1e-6)
    assert list(out["results"]) == ["mc", "sch", "lm"], "core.yaml's order"

    # --core_metric_max_per_task: a cut of the shuffled examples, the same cut every time
    bundle = load_bundle(tmp_path)
    two = bundle.examples(bundle.tasks[0], 2)
    assert len(two) == 2 and bundle.examples(bundle.tasks[0], -1)[:2] == two

    # a JSON string may hold U+2028 unescaped: it does not end the example's line
    item = {"query": "line\u2028separator", "choices": ["a", "b"], "gold": 0}
    (bundle.root / "eval_data" / "mc.jsonl").write_text(json.dumps(item, ensure_ascii=False) + "\n", encoding="utf-8")
    assert load_bundle(tmp_path).examples(bundle.tasks[0], -1) == [item]


def test_a_missing_bundle_is_refused_in_one_line_before_the_model_is_built(tmp_path, capsys):
    base = make_train_base_dir(tmp_path, train_tokens=4_000, val_tokens=2_000)
    args = TINY_TRAIN_ARGS + ["--base-dir", str(base), "--num-iterations", "2", "--core-metric-every", "2"]
    code = run_main(train_main.main, args)
    out, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1, err
    assert str(base / "eval_bundle") in err and "--core_metric_every -1" in err
    assert "model:" not in out


@pytest.mark.parametrize("damage, flags, says", [
    ("torn_line", [], "line 3 is not JSON"),  # an unzip cut short
    ("no_gold", [], "'gold'"),  # a field the scoring reads
    ("", ["--core-metric-max-per-task", "2"], "2-shot"),  # tiny_mc's 2 few-shot examples need 3 to draw from
])
def test_a_damaged_bundle_or_a_cap_below_the_shots_is_refused_before_the_model_is_built(tmp_path, capsys, damage,
                                                                                      flags, says):
    """Every example is read when the run starts, not at the first CORE step hours later."""
    base = make_train_base_dir(tmp_path, train_tokens=4_000, val_tokens=2_000)
    root = write_tiny_bundle(base)
    if damage:
        mc = root / "eval_data" / "tiny" / "mc.jsonl"
        lines = mc.read_text().splitlines()
        lines[2] = lines[2][:20] if damage == "torn_line" else json.dumps(
            {k: v for k, v in json.loads(lines[2]).items() if k != "gold"})
        mc.write_text("\n".join(lines) + "\n")
    code = run_main(train_main.main, TINY_TRAIN_ARGS + ["--base-dir", str(base), "--num-iterations", "2",
                                                        "--core-metric-every", "2", *flags])
    out, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and says in err, err
    assert "model:" not in out


@pytest.mark.slow
def test_two_processes_score_the_same_core_as_one(tmp_path):
    """Examples split over two gloo ranks and summed (DDP), or all scored on every rank (FSDP): the same
    numbers as one process, bit for bit (each example's forward is the same batch wherever it runs)."""
    write_tiny_bundle(tmp_path)
    two = launch_cpu_processes(2, str(Path(__file__).parent / "core_dist_e2e.py"), str(tmp_path),
                               str(tmp_path / "two.json"))
    assert two.returncode == 0, two.stderr[-3000:]
    result = json.loads((tmp_path / "two.json").read_text())
    assert result["world_size"] == 2, "the launch must really run two processes"
    model = build_model(DIST_CONFIG, device="cpu", seed=7).eval()
    one = evaluate_core(model, byte_level_encoding(), load_bundle(tmp_path), "cpu")
    assert result["sharded"] == one and result["whole"] == one


# -----------------------------------------------------------------------------
# nanochat's CPU example command, and the CORE it reports


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """runcpu.sh's base_train flags, nanochat's spelling, base dir from $NANOCHAT_BASE_DIR as nanochat's."""
    base = make_train_base_dir(tmp_path_factory.mktemp("runcpu"), train_tokens=8_000, val_tokens=5_000)
    write_tiny_bundle(base, n=6)  # 18 examples: every task type, and cheap on a CPU
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setenv("NANOCHAT_BASE_DIR", str(base))
        code = run_main(train_main.main, RUNCPU_BASE_TRAIN + [f"--num_iterations={RUNCPU_STEPS}"])
    evals = [json.loads(line) for line in (base / "runs" / "d4" / "eval.jsonl").read_text().splitlines()]
    return {"base": base, "code": code, "log": out.getvalue(), "evals": evals}


def test_nanochats_cpu_example_command_runs_with_core(cpu_run):
    assert cpu_run["code"] == 0, cpu_run["log"][-2000:]
    log = cpu_run["log"]
    assert "batch: 1 x 1024 x 1 procs x 1 accum" in log and f"{RUNCPU_STEPS} steps" in log
    assert f"step {RUNCPU_STEPS:05d} | val bpb:" in log and "  sample: " in log
    # core_metric_every=50 > the horizon: as nanochat, only the last step reports CORE
    core = [e for e in cpu_run["evals"] if "core_metric" in e]
    assert [e["step"] for e in core] == [RUNCPU_STEPS]
    assert f"step {RUNCPU_STEPS:05d} | CORE metric: {core[0]['core_metric']:.4f}" in log
    assert list(core[0]["results"]) == ["tiny_mc", "tiny_schema", "tiny_lm"]
    assert core[0]["core_metric"] == pytest.approx(sum(core[0]["centered_results"].values()) / 3, abs=1e-12)


def test_core_in_the_loop_is_core_of_the_saved_checkpoint(cpu_run):
    """What the loop logs is CORE of the weights it saves, over --core_metric_max_per_task examples."""
    from nanochat_unsloth.checkpoint.layouts import load_any_checkpoint
    from nanochat_unsloth.eval.cli import build_model as build_from_checkpoint
    from nanochat_unsloth.tokenizer import load_checked_tokenizer

    base = cpu_run["base"]
    loaded = load_any_checkpoint(base / "runs" / "d4")
    assert loaded.step == RUNCPU_STEPS
    encoding, _ = load_checked_tokenizer(base / "tokenizer", "test")
    model = build_from_checkpoint(loaded, torch.device("cpu"))
    ours = evaluate_core(model, encoding, load_bundle(base), "cpu", max_per_task=12, max_len=model.rotary_seq_len)
    logged = next(e for e in cpu_run["evals"] if "core_metric" in e)
    assert {k: logged[k] for k in ours} == ours  # same weights, same CPU math: bit for bit


# -----------------------------------------------------------------------------
# Opt-in: nanochat's own core_eval on the same checkpoint


def _import_nanochat(src: str):
    """nanochat's core_eval, tokenizer, checkpoint_manager and scripts.base_eval from a b399e43 checkout.
    nanochat.tokenizer imports HuggingFace `tokenizers` for a class CORE never uses; where it is not
    installed it is stood in for by an empty package."""
    if importlib.util.find_spec("tokenizers") is None:
        for name in ("tokenizers", "tokenizers.models", "tokenizers.trainers"):
            stub = types.ModuleType(name)
            stub.__path__ = []
            stub.__getattr__ = lambda attr: type(attr, (), {})
            sys.modules.setdefault(name, stub)
    sys.path.insert(0, src)
    try:
        import nanochat.checkpoint_manager as checkpoint_manager
        import nanochat.core_eval as core_eval
        import nanochat.tokenizer as tokenizer
        import scripts.base_eval as base_eval
    finally:
        sys.path.remove(src)
    return core_eval, tokenizer, checkpoint_manager, base_eval


@pytest.mark.skipif(not NANOCHAT_SRC, reason="set NANOCHAT_SRC to a nanochat checkout (b399e43) to run")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_nanochats_core_eval_gives_the_same_numbers(cpu_run, monkeypatch, tmp_path):
    from nanochat_unsloth.convert.cli import export_to_nanochat
    from nanochat_unsloth.eval.core import fewshot_for, scored_spans
    from nanochat_unsloth.tokenizer import bos_id, load_checked_tokenizer

    base = cpu_run["base"]
    export_to_nanochat(base / "runs" / "d4", log=lambda *a: None)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    core_eval, nano_tok, checkpoint_manager, base_eval = _import_nanochat(NANOCHAT_SRC)

    # the same prompts and scored spans, example by example
    encoding, _ = load_checked_tokenizer(base / "tokenizer", "test")
    tok = nano_tok.RustBPETokenizer(encoding, "<|bos|>")
    render = {"multiple_choice": (core_eval.render_prompts_mc, core_eval.batch_sequences_mc),
              "schema": (core_eval.render_prompts_schema, core_eval.batch_sequences_schema),
              "language_modeling": (core_eval.render_prompts_lm, core_eval.batch_sequences_lm)}
    from nanochat_unsloth.eval.core import RENDER
    bundle = load_bundle(base)
    for task in bundle.tasks:
        data = bundle.examples(task, 12)
        for idx in range(len(data)):
            shots = fewshot_for(data, idx, task.num_fewshot)
            theirs_render, theirs_batch = render[task.task_type]
            prompts = RENDER[task.task_type](data[idx], task.delimiter, shots)
            assert prompts == theirs_render(data[idx], task.delimiter, shots), (task.label, idx)
            tokens = [[bos_id(encoding)] + encoding.encode_ordinary(p) for p in prompts]
            assert tuple(scored_spans(task.task_type, tokens, task.label)) == tuple(theirs_batch(tok, prompts))

    # the scoring rules: nanochat's evaluate_task with the model whose answers are known
    known = load_bundle(write_known_answers_bundle(tmp_path).parent)
    byte_tok = nano_tok.RustBPETokenizer(byte_level_encoding(), "<|bos|>")
    for task in known.tasks:
        meta = {"task_type": task.task_type, "num_fewshot": task.num_fewshot, "continuation_delimiter": task.delimiter}
        data = known.examples(task, -1)
        assert core_eval.evaluate_task(PrefersA(), byte_tok, data, "cpu", meta) == evaluate_task(
            PrefersA(), byte_level_encoding(), data, task, "cpu") == pytest.approx(KNOWN_ACCURACY[task.label], abs=1e-7)

    # nanochat's model from the converted checkpoint, nanochat's CORE over the same bundle
    model, tokenizer, meta = checkpoint_manager.load_model("base", torch.device("cpu"), phase="eval")
    assert meta["step"] == RUNCPU_STEPS
    theirs = base_eval.evaluate_model(model, tokenizer, "cpu", max_per_task=12)
    logged = next(e for e in cpu_run["evals"] if "core_metric" in e)
    assert theirs["results"] == logged["results"]
    assert theirs["centered_results"] == logged["centered_results"]
    assert theirs["core_metric"] == logged["core_metric"]
