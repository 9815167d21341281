"""Run checkpoints, on a floor below train, eval.cli and convert: what a checkpoint's meta.json holds
(meta.py), writing, verifying, pruning and branching step dirs (store.py), the metrics logs a branch
rewrites (logs.py), what a resume must agree with (resume.py), and reading a checkpoint of either our
layout or nanochat's (layouts.py)."""
