"""Plot training runs against each other: val bpb (eval.jsonl) and train loss (metrics.jsonl) per step.

    python benchmarks/plot_loss_curves.py --out docs/loss_curve_d12.png \\
        torch=docs/data/curve_d12_eval_torch.jsonl unsloth+fp8=docs/data/curve_d12_eval_unsloth_fp8.jsonl

Each argument is LABEL=EVAL_JSONL; a metrics file found next to it by the naming `*_eval_*` ->
`*_metrics_*` adds the smoothed train loss in a second panel. Prints the final val bpb of each run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="LABEL=path/to/eval.jsonl")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--title", default="")
    args = p.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_val, ax_train) = plt.subplots(1, 2, figsize=(11, 4))
    for i, run in enumerate(args.runs):
        color = f"C{i}"  # one color per run in both panels
        label, _, path = run.partition("=")
        if not path:
            p.error(f"{run!r}: expected LABEL=EVAL_JSONL")
        evals = read_jsonl(Path(path))
        ax_val.plot([e["step"] for e in evals], [e["val_bpb"] for e in evals], marker="o", ms=3, color=color, label=label)
        print(f"{label}: final val bpb {evals[-1]['val_bpb']:.4f} at step {evals[-1]['step']}")
        metrics_path = Path(path.replace("_eval_", "_metrics_"))
        if metrics_path != Path(path) and metrics_path.exists():
            metrics = read_jsonl(metrics_path)
            ax_train.plot([m["step"] for m in metrics], [m["smooth_loss"] for m in metrics], lw=1, color=color,
                          label=label)
    ax_val.set_xlabel("step")
    ax_val.set_ylabel("val bits per byte")
    ax_val.legend()
    ax_train.set_xlabel("step")
    ax_train.set_ylabel("train loss (smoothed)")
    ax_train.legend()
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
