"""A tiny CORE eval bundle in nanochat's layout, written by the tests (the real one cannot be downloaded here).

    <base>/eval_bundle/core.yaml, eval_data/tiny/*.jsonl, eval_meta_data.csv

Three tasks, one per nanochat task type, with few-shot prompts and a non-default continuation delimiter,
so every rendering and scoring path runs.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

WORDS = ["apple", "river", "stone", "cloud", "green", "table", "music", "light", "paper", "horse", "dream", "sugar"]

CORE_YAML = """\
icl_tasks:
-
  label: tiny_mc
  dataset_uri: tiny/mc.jsonl
  num_fewshot: [2]
  icl_task_type: multiple_choice
  continuation_delimiter: "\\nAnswer: "
-
  label: tiny_schema
  dataset_uri: tiny/schema.jsonl
  num_fewshot: [1]
  icl_task_type: schema
-
  label: tiny_lm
  dataset_uri: tiny/lm.jsonl
  num_fewshot: [0]
  icl_task_type: language_modeling
"""

BASELINES = {"tiny_mc": 25.0, "tiny_schema": 50.0, "tiny_lm": 0.0}


def write_bundle(base: Path, tasks_yaml: str, data: dict[str, list[dict]], baselines: dict[str, float]) -> Path:
    """<base>/eval_bundle with `tasks_yaml` as core.yaml, data[uri] as eval_data/<uri>, and the baselines."""
    root = base / "eval_bundle"
    (root / "eval_data").mkdir(parents=True, exist_ok=True)
    (root / "core.yaml").write_text(tasks_yaml)
    for uri, rows in data.items():
        path = root / "eval_data" / uri
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open(root / "eval_meta_data.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Eval Task", "Task Category", "Task Type", "#shots", "#datapoints", "Random baseline",
                         "Description"])
        for label, b in baselines.items():
            writer.writerow([label, "tiny", "tiny", 0, 0, b, "written by tests/core_bundle.py"])
    return root


def write_tiny_bundle(base: Path, n: int = 10, seed: int = 0) -> Path:
    """The three-task bundle above, n examples per task."""
    rng = random.Random(seed)
    mc, schema, lm = [], [], []
    for i in range(n):
        a, b, c, d = rng.sample(WORDS, 4)
        mc.append({"query": f"Question {i}: which word follows {a}?", "choices": [b, c, d, a],
                   "gold": rng.randrange(4)})
        schema.append({"context_options": [f"The {a} was near the {b}.", f"The {c} was near the {d}."],
                       "continuation": f"it stayed by the {b}", "gold": rng.randrange(2)})
        # a trailing space in the context, as some of nanochat's data has: the renderer strips it
        lm.append({"context": f"{a} {b} {c} {a} {b} ", "continuation": c})
    return write_bundle(base, CORE_YAML, {"tiny/mc.jsonl": mc, "tiny/schema.jsonl": schema, "tiny/lm.jsonl": lm},
                        BASELINES)
