"""`python -m nanochat_unsloth.train --help` works and lists every knob of TrainConfig."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

from nanochat_unsloth.train.config import SECTIONS, TrainConfig, build_parser, parse_train_args


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


def test_help_lists_each_flag_under_its_section():
    """TrainConfig stays flat (nanochat's flag names, config files, checkpoints' train_config); its fields are
    ordered by section, and --help prints each section's flags under its title, in TrainConfig's order."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    starts = [names.index(first) for _, first in SECTIONS]
    assert starts[0] == 0 and starts == sorted(starts)
    text = build_parser().format_help()
    headers = [text.index(f"\n{title}:\n") for title, _ in SECTIONS] + [len(text)]
    for i, name in enumerate(names):
        section = sum(start <= i for start in starts) - 1
        at = text.index("  --" + name.replace("_", "-"))
        assert headers[section] < at < headers[section + 1], (name, SECTIONS[section][0])
