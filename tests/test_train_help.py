"""`python -m nanochat_unsloth.train --help` works and lists every knob of TrainConfig."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import torch

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


def test_zero_or_below_turns_off_what_nanochat_gates_on_a_positive_value():
    """nanochat's base_train tests `num_iterations > 0`, `target_flops > 0`, `target_param_data_ratio > 0`,
    `core_metric_every > 0` and `grad_clip > 0`, and its CORE cut `max_per_task > 0`: 0 (or any value below) is off
    there, the next horizon in line deciding, as -1 is; the same flags are accepted here with that meaning."""
    from nanochat_unsloth.common import normalize_flags
    from nanochat_unsloth.train.core_metric import core_due
    from nanochat_unsloth.train.optim import resolve_num_iterations

    for flags in (["--num_iterations=0"], ["--target_flops=0"], ["--core_metric_every=0"], ["--core_metric_every=-5"],
                  ["--core_metric_max_per_task=0"], ["--num_iterations=0", "--target_flops=0.0"], ["--grad_clip=-1"]):
        parse_train_args(normalize_flags(flags)).validate()
    cfg = parse_train_args(normalize_flags(["--num_iterations=0", "--target_flops=0.0", "--target_param_data_ratio=2"]))
    cfg.validate()
    assert resolve_num_iterations(cfg.num_iterations, cfg.target_flops, cfg.target_param_data_ratio, num_params=1000,
                                  flops_per_token=1, total_batch_size=100) == 20  # the ratio's horizon, as nanochat
    assert not core_due(0, 2000, last_step=True)
    # a negative clip leaves the gradients as they are (the norm is still reported), as 0 does
    from nanochat_unsloth.train.optim import clip_grad_norm
    w = torch.nn.Parameter(torch.ones(4))
    w.grad = torch.full((4,), 3.0)
    assert clip_grad_norm([w], -1.0).item() == 6.0 and torch.equal(w.grad, torch.full((4,), 3.0))
