"""`python -m nanochat_unsloth.train --help` works and lists every knob of TrainConfig."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

from nanochat_unsloth.train.config import TrainConfig, parse_train_args


def test_help_exits_0_and_names_every_field():
    proc = subprocess.run([sys.executable, "-m", "nanochat_unsloth.train", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in proc.stdout, f.name
    assert "~25% slower" in proc.stdout  # a literal % in a help string survives argparse's formatting


def test_kernels_unsloth_is_accepted_as_the_fused_sets_former_name():
    cfg = parse_train_args(["--kernels", "unsloth"])
    cfg.validate()
    assert cfg.kernels == "fused"
    assert parse_train_args([]).kernels == "auto"
