"""nanochat's CORE metric: DCLM's centered in-context-learning accuracy (arXiv 2406.11794), as nanochat b399e43
computes it (`scripts/base_eval.py` with `nanochat/core_eval.py`), so the same weights give the same numbers.

The bundle is nanochat's, in nanochat's place:

    <base>/eval_bundle/core.yaml           icl_tasks: [{label, icl_task_type, dataset_uri, num_fewshot: [k],
                                           continuation_delimiter (default " ")}, ...]
    <base>/eval_bundle/eval_data/<uri>     one JSON example per line
    <base>/eval_bundle/eval_meta_data.csv  columns "Eval Task" and "Random baseline" (percent)

Per task: the examples are shuffled with random.Random(1337) and the first `max_per_task` kept; example i
gets `k` few-shot examples drawn from the others with random.Random(1234 + i). Every prompt starts with
<|bos|>. Scoring by task type:
- multiple_choice: a prompt per choice after the same context; the lowest mean loss over the choice's tokens wins;
- schema: a prompt per context option before the same continuation; the lowest mean loss over it wins;
- language_modeling: right when the greedy prediction reproduces every token of the continuation.
A task's accuracy a becomes (a - b) / (1 - b), b its random baseline as a fraction; CORE is their mean.
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanochat_unsloth.common import UserError
from nanochat_unsloth.tokenizer import bos_id

BUNDLE_DIR = "eval_bundle"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
FIELDS = {"multiple_choice": ("query", "choices", "gold"), "schema": ("context_options", "continuation", "gold"),
          "language_modeling": ("context", "continuation")}  # what rendering and scoring read of an example
SHUFFLE_SEED = 1337  # nanochat's: which examples a max_per_task cut keeps
FEWSHOT_SEED = 1234  # + the example's index: its few-shot examples


@dataclass(frozen=True)
class CoreTask:
    label: str
    task_type: str
    data_path: Path
    num_fewshot: int
    delimiter: str
    random_baseline: float  # percent, as the csv gives it


@dataclass
class CoreBundle:
    root: Path
    tasks: list[CoreTask]
    _cache: dict = field(default_factory=dict, repr=False)

    def examples(self, task: CoreTask, max_per_task: int) -> list[dict]:
        """The task's examples in nanochat's shuffled order, cut to max_per_task (-1: all); read once."""
        key = (task.label, max_per_task)
        if key not in self._cache:
            data = []
            # lines end at "\n" only, as a file's iteration does: str.splitlines would also split at
            # characters such as U+2028 that JSON strings may hold unescaped
            for n, line in enumerate(task.data_path.read_text(encoding="utf-8").split("\n"), 1):
                if not line.strip():
                    continue
                try:
                    data.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{task.data_path}: line {n} is not JSON ({e}); the eval bundle is damaged, "
                                    "unpack it again") from None
            random.Random(SHUFFLE_SEED).shuffle(data)
            self._cache[key] = data[:max_per_task] if max_per_task > 0 else data
        return self._cache[key]

    def check(self, max_per_task: int) -> None:
        """Read every task's examples now and refuse, in one line, what would stop the first evaluation: a
        damaged line, an example without a field its task type reads, fewer examples than its few-shot
        count needs (each example's shots are drawn from the others)."""
        for task in self.tasks:
            data = self.examples(task, max_per_task)
            if len(data) <= task.num_fewshot:
                raise UserError(f"task {task.label!r} is {task.num_fewshot}-shot: it needs at least "
                                f"{task.num_fewshot + 1} examples, and {task.data_path} with "
                                f"--core_metric_max_per_task {max_per_task} gives {len(data)}")
            for item in data:
                missing = [name for name in FIELDS[task.task_type] if not isinstance(item, dict) or name not in item]
                if missing:
                    raise UserError(f"{task.data_path}: an example of task {task.label!r} has no "
                                    f"{', '.join(map(repr, missing))} ({str(item)[:80]}); the eval bundle is "
                                    "damaged, unpack it again")


def load_bundle(base_dir: Path, why: str = "--core_metric_every") -> CoreBundle:
    """Read `<base>/eval_bundle`'s task list and baselines, or refuse in one line naming what is missing."""
    root = Path(base_dir) / BUNDLE_DIR
    fix = (f"unzip nanochat's eval_bundle.zip into {base_dir} (its `python -m scripts.base_eval` downloads it), "
           f"or pass --core_metric_every -1")
    config_path, meta_path = root / "core.yaml", root / "eval_meta_data.csv"
    for path in (config_path, root / "eval_data", meta_path):
        if not path.exists():
            raise UserError(f"{path}: not found; {why} needs nanochat's CORE eval bundle in {root}: {fix}")
    import yaml

    try:
        entries = (yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}).get("icl_tasks")
    except (yaml.YAMLError, AttributeError) as e:
        raise UserError(f"{config_path}: not nanochat's core.yaml ({str(e).splitlines()[0]}); {fix}") from None
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{config_path}: no icl_tasks list; {fix}")
    with open(meta_path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"Eval Task", "Random baseline"} <= set(rows[0]):
        raise UserError(f"{meta_path}: needs the columns 'Eval Task' and 'Random baseline'; {fix}")
    baselines = {row["Eval Task"]: row["Random baseline"] for row in rows}
    tasks = []
    for entry in entries:
        label = entry.get("label")
        kind = entry.get("icl_task_type")
        if kind not in TASK_TYPES:
            raise UserError(f"{config_path}: task {label!r} has icl_task_type {kind!r}, not one of "
                            f"{', '.join(TASK_TYPES)}")
        shots = entry.get("num_fewshot", [0])
        data_path = root / "eval_data" / str(entry.get("dataset_uri"))
        if not data_path.is_file():
            raise UserError(f"{data_path}: task {label!r}'s data is missing; {fix}")
        if label not in baselines:
            raise UserError(f"{meta_path}: no 'Random baseline' for task {label!r}; {fix}")
        tasks.append(CoreTask(label=label, task_type=kind, data_path=data_path,
                              num_fewshot=int(shots[0] if isinstance(shots, list) else shots),
                              delimiter=entry.get("continuation_delimiter", " "),
                              random_baseline=float(baselines[label])))
    return CoreBundle(root=root, tasks=tasks)


# -----------------------------------------------------------------------------
# Prompts: few-shot examples, each followed by a blank line, then the example itself


def render_multiple_choice(item: dict, delimiter: str, fewshot: list[dict]) -> list[str]:
    shots = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
    return [f"{shots}{item['query']}{delimiter}{choice}" for choice in item["choices"]]


def render_schema(item: dict, delimiter: str, fewshot: list[dict]) -> list[str]:
    shots = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    return [f"{shots}{option}{delimiter}{item['continuation']}" for option in item["context_options"]]


def render_language_modeling(item: dict, delimiter: str, fewshot: list[dict]) -> list[str]:
    """[prompt without the continuation, prompt with it]; contexts are stripped (some carry trailing spaces),
    and so is the first prompt, so that its tokens are a clean prefix of the second's."""
    shots = "".join(f"{str(ex['context']).strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    without = f"{shots}{str(item['context']).strip()}{delimiter}"
    return [without.strip(), f"{without}{item['continuation']}"]


RENDER = {"multiple_choice": render_multiple_choice, "schema": render_schema,
          "language_modeling": render_language_modeling}


# -----------------------------------------------------------------------------
# Which tokens are scored


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    return next((i for i in range(n) if any(s[i] != seqs[0][i] for s in seqs)), n)


def _common_suffix(seqs: list[list[int]]) -> int:
    return _common_prefix([s[::-1] for s in seqs])


def scored_spans(task_type: str, tokens: list[list[int]], where: str) -> tuple[list[list[int]], list[int], list[int]]:
    """-> (sequences to run, start and end of each scored span): the choices after their shared context
    (multiple_choice), the shared continuation (schema), the continuation (language_modeling: only the
    prompt with it runs)."""
    ends = [len(t) for t in tokens]
    if task_type == "multiple_choice":
        return tokens, [_common_prefix(tokens)] * len(tokens), ends
    if task_type == "schema":
        suffix = _common_suffix(tokens)
        return tokens, [e - suffix for e in ends], ends
    without, with_ = tokens
    if not (len(without) < len(with_) and with_[:len(without)] == without):
        raise UserError(f"{where}: the prompt without its continuation does not tokenize to a prefix of the prompt "
                        "with it (nanochat's core_eval asserts the same); this tokenizer cannot score this task")
    return [with_], [len(without)], [len(with_)]


# -----------------------------------------------------------------------------
# Scoring


def fewshot_for(data: list[dict], idx: int, k: int) -> list[dict]:
    if k <= 0:
        return []
    others = [i for i in range(len(data)) if i != idx]
    return [data[i] for i in random.Random(FEWSHOT_SEED + idx).sample(others, k)]


@torch.inference_mode()
def score_example(model, encoding, data: list[dict], idx: int, task: CoreTask, device, max_len: int | None) -> bool:
    """Is example `idx` of `data` right? `model(ids)` returns (B, T, vocab) logits."""
    item = data[idx]
    prompts = RENDER[task.task_type](item, task.delimiter, fewshot_for(data, idx, task.num_fewshot))
    bos = bos_id(encoding)
    tokens = [[bos] + encoding.encode_ordinary(p) for p in prompts]
    seqs, starts, ends = scored_spans(task.task_type, tokens, f"{task.data_path} (task {task.label})")
    if max_len is not None:  # longer than the model can run: keep the last max_len tokens
        crop = [max(0, len(s) - max_len) for s in seqs]
        seqs = [s[c:] for s, c in zip(seqs, crop)]
        starts = [s - c for s, c in zip(starts, crop)]
        ends = [e - c for e, c in zip(ends, crop)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), bos, dtype=torch.long)  # right-padded with <|bos|>, never scored
    for row, s in enumerate(seqs):
        ids[row, :len(s)] = torch.tensor(s, dtype=torch.long)
    ids = ids.to(device)

    logits = model(ids)
    targets = torch.roll(ids, shifts=-1, dims=1)  # position t predicts token t+1; the last has no target
    losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                             reduction="none").view(ids.shape)
    losses[:, -1] = float("nan")
    if task.task_type == "language_modeling":
        s, e = starts[0], ends[0]
        return bool(torch.equal(logits[0, s - 1:e - 1].argmax(dim=-1), ids[0, s:e]))
    mean_losses = [losses[row, s - 1:e - 1].mean().item() for row, (s, e) in enumerate(zip(starts, ends))]
    return mean_losses.index(min(mean_losses)) == item["gold"]


def evaluate_task(model, encoding, data: list[dict], task: CoreTask, device, max_len: int | None = None,
                  shard_examples: bool = True) -> float:
    """Accuracy on `data`. Under torch.distributed with `shard_examples`, rank r scores examples r, r+W, ...
    and the counts are summed (every rank must call this); without it every rank scores all of them (FSDP,
    where every forward is collective)."""
    distributed = shard_examples and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    correct = torch.zeros(len(data), dtype=torch.float32, device=device)
    for idx in range(rank, len(data), world):
        correct[idx] = float(score_example(model, encoding, data, idx, task, device, max_len))
    if distributed:
        dist.all_reduce(correct, op=dist.ReduceOp.SUM)
    return correct.mean().item()


def centered(accuracy: float, random_baseline_percent: float) -> float:
    b = 0.01 * random_baseline_percent
    return (accuracy - b) / (1.0 - b)


def evaluate_core(model, encoding, bundle: CoreBundle, device, max_per_task: int = -1, max_len: int | None = None,
                  shard_examples: bool = True, log=None) -> dict:
    """{"results": {label: accuracy}, "centered_results": {label: centered}, "core_metric": mean centered},
    tasks in core.yaml's order."""
    results, centered_results = {}, {}
    for task in bundle.tasks:
        data = bundle.examples(task, max_per_task)
        results[task.label] = evaluate_task(model, encoding, data, task, device, max_len, shard_examples)
        centered_results[task.label] = centered(results[task.label], task.random_baseline)
        if log is not None:
            log(f"  CORE {task.label} ({task.num_fewshot}-shot {task.task_type}, {len(data)} examples): "
                f"accuracy {results[task.label]:.4f} | centered {centered_results[task.label]:.4f}")
    core = sum(centered_results.values()) / len(centered_results) if centered_results else math.nan
    return {"results": results, "centered_results": centered_results, "core_metric": core}
