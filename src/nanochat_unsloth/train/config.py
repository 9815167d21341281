"""TrainConfig: every knob of a training run, with nanochat's names and defaults.

The CLI is generated from the dataclass, so `--device_batch_size=32` (nanochat's spelling) and
`--device-batch-size 32` both work, and a new field is a new flag with no other edits. As nanochat's
configurator, a positional argument names a Python file of assignments (`depth = 12`) that the flags override.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from dataclasses import dataclass, field, fields

from nanochat_unsloth.common import FlagParser, UserError
from nanochat_unsloth.model.build import KERNEL_ALIASES, KERNEL_CHOICES
from nanochat_unsloth.model.compile import COMPILE_CHOICES
from nanochat_unsloth.model.gpt import GPTConfig
from nanochat_unsloth.model.fp8 import RECIPE_CHOICES, SCALING_CHOICES
from nanochat_unsloth.model.lm_head_loss import DEFAULT_CHUNK_MB
from nanochat_unsloth.model.memory import LEAN_CHOICES, MEMORY_CHOICES
from nanochat_unsloth.train.bf16_gemm import CHOICES as CPU_BF16_CHOICES
from nanochat_unsloth.train.config_file import load_config_file
from nanochat_unsloth.train.optim import OPTIMIZER_CHOICES, check_lrs_fit_float32

DEVICE_TYPE_CHOICES = ("", "cuda", "cpu", "mps")  # nanochat's --device_type; "" = autodetect


@dataclass
class TrainConfig:
    """Every knob of a run, flat (nanochat's flag names, the config file's and checkpoints' keys), ordered in
    the sections of `SECTIONS`, which --help follows: the model, its speed and memory (kernels, memory modes,
    FP8, compilation), the optimizer (horizon, batch, step math), evaluation, and the run itself. The fields
    defaulting to "auto" are decided once per run by train/resolve.py."""

    # ---- model ------------------------------------------------------------------------------
    depth: int = field(default=20, metadata={"help": "transformer depth; n_embd = 64*depth, heads = ceil(n_embd/128)"})
    max_seq_len: int = field(default=2048, metadata={"help": "context length T"})
    # ---- speed and memory -------------------------------------------------------------------
    kernels: str = field(default="auto", metadata={"help": "auto|torch|fused: the model's kernel set; fused = our chunked "
                                                          "lm_head loss + per-block compile (CUDA); auto = fused on "
                                                          "CUDA, torch elsewhere; unsloth = fused (its former name)"})
    memory: str = field(default="fast", metadata={"help": "fast|lean|selective: lean checkpoints every block (less memory, "
                                                          "~25% slower); selective recomputes only the MLP"})
    lean_blocks: int = field(default=-1, metadata={"help": "with --memory lean|selective: only the first N blocks (-1 = all)"})
    lean_checkpoint: str = field(default="auto", metadata={"help": "auto|offload|torch: how --memory lean checkpoints a "
                                                                    "block; offload = Unsloth's offloaded checkpointing "
                                                                    "(CUDA + unsloth_zoo), auto = offload where it runs"})
    fp8: bool = field(default=False, metadata={"help": "block GEMMs in FP8 (H100-class GPUs; lm_head, loss and eval "
                                                      "stay bf16): a faster step, at bf16's val bpb with dynamic "
                                                      "scaling (docs/PERF.md)"})
    fp8_scaling: str = field(default="auto", metadata={"help": "auto|delayed|dynamic: FP8 scales of activations and "
                                                                "gradients from the previous micro-step's amax (delayed) "
                                                                "or their own (dynamic); auto = dynamic (delayed is "
                                                                "faster per step, but its loss drifts from bf16's)"})
    fp8_recipe: str = field(default="tensorwise", metadata={"help": "tensorwise|torchao_tensorwise|torchao_rowwise: "
                                                                    "whose FP8 GEMMs, ours (tensorwise) or torchao's "
                                                                    "float8 training"})
    fp8_weight_cache: str = field(default="auto", metadata={"help": "auto|on|off: quantise the block weights to FP8 "
                                                                     "once per optimizer step instead of in every "
                                                                     "micro-step (the same quantisation, done eagerly; 2 bytes per block "
                                                                     "parameter held); auto = on with our FP8 recipe "
                                                                     "and per-block compile, off with --memory lean"})
    loss_chunk_mb: float = field(default=DEFAULT_CHUNK_MB, metadata={"help": "--kernels fused: MiB of bf16 logits + "
                                                                              "their gradient per loss chunk"})
    compile: str = field(default="auto", metadata={"help": "auto|model|blocks|none: torch.compile the whole model, each "
                                                            "block, or nothing (CUDA only); auto = model for torch "
                                                            "kernels, blocks for fused or lean (model for fused "
                                                            "with --fp8 below 16,384 rows per micro-batch)"})
    cuda_graphs: str = field(default="auto", metadata={"help": "auto|on|off: replay the whole-model graph's forward and "
                                                                "backward as CUDA graphs (one process, --compile model; "
                                                                "same math, fewer host launches); auto = on for the "
                                                                "fused set's --fp8 whole-model graph below 16,384 rows "
                                                                "per micro-batch"})
    cpu_bf16: str = field(default="auto", metadata={"help": "auto|native|emulated: how a CPU run computes the bf16 GEMMs of "
                                                            "Muon's Newton-Schulz; emulated = bf16-rounded inputs and result "
                                                            "around an fp32 GEMM, for CPUs without fast bf16; auto times both "
                                                            "once (GPUs are always native)"})
    # ---- optimizer: the horizon (first one set wins, in this order), the batch, the step math ----
    num_iterations: int = field(default=-1, metadata={"help": "explicit number of optimizer steps (-1 or 0 = off)"})
    target_flops: float = field(default=-1.0, metadata={"help": "steps to reach this many FLOPs (-1 or 0 = off)"})
    target_param_data_ratio: float = field(default=20, metadata={"help": "tokens:params ratio (Chinchilla=20; -1 or 0 = off)"})
    device_batch_size: int = field(default=32, metadata={"help": "sequences per micro-batch per process"})
    total_batch_size: int = field(default=524288, metadata={"help": "tokens per optimizer step, all processes"})
    embedding_lr: float = field(default=0.2, metadata={"help": "AdamW LR of the token embedding (wte)"})
    unembedding_lr: float = field(default=0.004, metadata={"help": "AdamW LR of lm_head"})
    matrix_lr: float = field(default=0.02, metadata={"help": "Muon LR of the block matrices"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (wte, lm_head)"})
    grad_clip: float = field(default=1.0, metadata={"help": "max global grad norm (0 or below = off)"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "fraction of the steps of linear LR warm-up"})
    warmdown_ratio: float = field(default=0.2, metadata={"help": "fraction of the steps of linear LR warm-down, at the end"})
    final_lr_frac: float = field(default=0.0, metadata={"help": "LR at the end, as a fraction of the initial"})
    optimizer: str = field(default="muon", metadata={"help": "muon (nanochat's Muon+AdamW) | adamw8bit (bitsandbytes AdamW8bit, "
                                                              "LR 3e-4*(n_embd/768)^-0.5, cosine, 2% warmup)"})
    seed: int = field(default=42, metadata={"help": "initialisation seed (the data order does not depend on it)"})
    # ---- evaluation and sampling ------------------------------------------------------------
    eval_every: int = field(default=250, metadata={"help": "val bpb every N steps (-1 = only at the end; "
                                                              "nanochat's -1 is every step, here --eval_every=1)"})
    eval_tokens: int = field(default=20 * 524288, metadata={"help": "val tokens per evaluation (0 = no val evaluation)"})
    sample_every: int = field(default=2000, metadata={"help": "greedy samples every N steps (-1 = only at "
                                                                 "the end; nanochat's -1 is every step)"})
    core_metric_every: int = field(default=-1, metadata={"help": "nanochat's CORE metric every N steps and at the end, on "
                                                                  "<base>/eval_bundle (-1 or 0 = off; nanochat's default is "
                                                                  "2000, which needs the bundle)"})
    core_metric_max_per_task: int = field(default=500, metadata={"help": "examples per CORE task (-1 or 0 = all of them)"})
    # ---- run: where, on what, under which name, checkpoints and stops -----------------------
    device_type: str = field(default="", metadata={"help": "cuda|cpu|mps: where to train (nanochat's flag); empty = "
                                                           "autodetect, CUDA > MPS > CPU"})
    base_dir: str = field(default="", metadata={"help": "base dir (default $NANOCHAT_BASE_DIR or ~/.cache/nanochat)"})
    shards: str = field(default="", metadata={"help": "token shard dir (default <base>/shards)"})
    model_tag: str = field(default="", metadata={"help": "run name under <base>/runs/ (default d<depth>)"})
    run: str = field(default="dummy", metadata={"help": "tracker run name; 'dummy' disables trackers"})
    tracker: str = field(default="", metadata={"help": "wandb|tensorboard|trackio|all|none, or a comma list, for a --run "
                                                        "other than dummy (default: wandb, as nanochat); logs go "
                                                        "under <base>/runs/<tag>/logs/"})
    no_repeat_data: bool = field(default=False, metadata={"help": "refuse a horizon that needs more tokens than the "
                                                                   "train shards hold, instead of repeating them"})
    save_every: int = field(default=-1, metadata={"help": "checkpoint every N steps (-1 = only the final one)"})
    keep_last: int = field(default=2, metadata={"help": "how many step checkpoints to keep (0 = all)"})
    resume: str = field(default="", metadata={"help": "'auto' = newest complete checkpoint of the run, or a step dir"})
    stop_after: int = field(default=-1, metadata={"help": "save and exit after this step, as an interruption would"})
    profile_step: int = field(default=-1, metadata={"help": "time this step's phases on every rank and trace it with "
                                                             "torch.profiler, into <run>/profile/ (-1 = off)"})
    force: bool = field(default=False, metadata={"help": "allow --resume with changed batch/optim/numerics settings "
                                                          "or other shards (not the model shape or tokenizer), or start "
                                                          "over on a tag with checkpoints (the old run is moved to "
                                                          "previous_N/, not deleted)"})

    @property
    def tag(self) -> str:
        return self.model_tag or f"d{self.depth}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Refuse out-of-range numbers with one line naming the flag, before anything is built."""
        for name, ok, rule in _BOUNDS:
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value) or not ok(value):
                raise UserError(f"--{name} {value}: must be {rule}")
        self.kernels = KERNEL_ALIASES.get(self.kernels, self.kernels)  # --kernels unsloth is fused's former name
        for name, choices in _CHOICES:
            if getattr(self, name) not in choices:
                shown = ", ".join(c or repr(c) for c in choices)  # "" (autodetect) must show
                raise UserError(f"--{name} {getattr(self, name)!r} is not one of: {shown}")
        if self.model_tag and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.model_tag):
            # a path would put the run inside another run's directory, whose pruning then deletes it
            raise UserError(f"--model_tag {self.model_tag!r}: must be a plain name (letters, digits, '.', '_', '-'; "
                            "not starting with '.'), the run's directory under <base>/runs/")
        if self.cuda_graphs == "on" and self.compile not in ("auto", "model"):
            raise UserError(f"--cuda_graphs on replays the whole-model graph, not --compile {self.compile}: "
                            "use --compile model")
        check_lrs_fit_float32(GPTConfig.from_depth(self.depth, self.max_seq_len, vocab_size=0).n_embd,
                              embedding_lr=self.embedding_lr, unembedding_lr=self.unembedding_lr,
                              matrix_lr=self.matrix_lr)
        if self.warmup_ratio + self.warmdown_ratio > 1:
            raise UserError(f"--warmup_ratio {self.warmup_ratio} + --warmdown_ratio {self.warmdown_ratio} = "
                            f"{self.warmup_ratio + self.warmdown_ratio}: the two phases must fit in the run (sum <= 1)")


# --help's sections, in TrainConfig's field order: (title, the section's first field)
SECTIONS = (("model", "depth"), ("speed and memory", "kernels"), ("optimizer", "num_iterations"),
            ("evaluation", "eval_every"), ("run", "device_type"))

# (field, allowed values): every string field with a fixed set of values, checked here only. The modules take
# concrete values; "auto" exists only as a flag value, which train/resolve.py replaces.
_CHOICES = (
    ("kernels", ("auto", *KERNEL_CHOICES)), ("memory", MEMORY_CHOICES), ("lean_checkpoint", ("auto", *LEAN_CHOICES)),
    ("fp8_scaling", ("auto", *SCALING_CHOICES)), ("fp8_recipe", RECIPE_CHOICES),
    ("compile", ("auto", *COMPILE_CHOICES)), ("optimizer", OPTIMIZER_CHOICES),
    ("cpu_bf16", ("auto", *CPU_BF16_CHOICES)), ("cuda_graphs", ("auto", "on", "off")),
    ("fp8_weight_cache", ("auto", "on", "off")),
    ("device_type", DEVICE_TYPE_CHOICES),
)


def _any(value) -> bool:
    """A field where every value has a meaning (its finiteness, for a float, is still checked)."""
    return True


def _off_or(test):
    """A field whose -1 means 'off', any other value must pass `test`."""
    return lambda v: v == -1 or test(v)


# (field, check, what the message says it must be); every numeric field of TrainConfig is here
_BOUNDS = (
    ("depth", lambda v: v >= 1, "at least 1"),
    ("max_seq_len", lambda v: v >= 1, "at least 1"),
    ("lean_blocks", _off_or(lambda v: v >= 0), "-1 (all blocks) or 0 or more"),
    ("loss_chunk_mb", lambda v: v > 0, "positive"),
    # nanochat gates these on `> 0`: 0 or below is off there (the next horizon decides), so here too
    ("num_iterations", _any, "any integer (0 or below: off)"),
    ("target_flops", _any, "any number (0 or below: off)"),
    ("target_param_data_ratio", _any, "any number (0 or below: off)"),
    ("device_batch_size", lambda v: v >= 1, "at least 1"),
    ("total_batch_size", lambda v: v >= 1, "at least 1"),
    ("embedding_lr", lambda v: v >= 0, "0 or more"),
    ("unembedding_lr", lambda v: v >= 0, "0 or more"),
    ("matrix_lr", lambda v: v >= 0, "0 or more"),
    ("weight_decay", lambda v: v >= 0, "0 or more"),
    ("grad_clip", _any, "any number (0 or below: off, as nanochat's `> 0`)"),
    ("warmup_ratio", lambda v: 0 <= v <= 1, "between 0 and 1"),
    ("warmdown_ratio", lambda v: 0 <= v <= 1, "between 0 and 1"),
    ("final_lr_frac", lambda v: 0 <= v <= 1, "between 0 and 1"),
    ("seed", lambda v: 0 <= v < 2**32, "between 0 and 2**32-1"),
    ("eval_every", _off_or(lambda v: v >= 1), "-1 (only at the end) or at least 1"),
    ("eval_tokens", lambda v: v >= 0, "0 (no val evaluation) or more"),
    ("sample_every", _off_or(lambda v: v >= 1), "-1 (only at the end) or at least 1"),
    ("core_metric_every", _any, "any integer (0 or below: off, as nanochat's `> 0`)"),
    ("core_metric_max_per_task", _any, "any integer (0 or below: every example, as nanochat's `> 0`)"),
    ("save_every", _off_or(lambda v: v >= 1), "-1 (only the final checkpoint) or at least 1"),
    ("keep_last", lambda v: v >= 0, "0 (keep all) or more"),
    ("stop_after", _off_or(lambda v: v >= 1), "-1 (off) or at least 1"),
    ("profile_step", _off_or(lambda v: v >= 0), "-1 (off) or a step, 0 or more"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(
        prog="python -m nanochat_unsloth.train",
        description="Pretrain nanochat's GPT with nanochat's step math (Muon + AdamW) under Accelerate.",
        epilog="exit codes: 0 finished; 1 diverged (a non-finite loss, gradient norm or weights: that step not "
               "applied, nothing of it saved); 2 refused (one-line error, a failed write included); 3 stopped early "
               "by SIGINT/SIGTERM or --stop_after after saving a checkpoint (continue with --resume auto); "
               "130 SIGINT or SIGTERM during start-up (nothing saved)",
    )
    parser.add_argument("config_file", nargs="?", metavar="CONFIG.py",
                        help="nanochat's config file: Python assignments to TrainConfig's names (depth = 12); "
                             "the flags override it")
    starts = {first: title for title, first in SECTIONS}
    group = parser
    for f in fields(TrainConfig):
        if f.name in starts:
            group = parser.add_argument_group(starts[f.name])
        flag = "--" + f.name.replace("_", "-")
        # argparse %-formats help strings: a literal % must be doubled
        help_text = (f.metadata.get("help", "") + f" (default: {f.default!r})").replace("%", "%%")
        if f.type in ("bool", bool):
            group.add_argument(flag, action="store_true", help=help_text)
        else:
            py_type = {"int": int, "float": float, "str": str}[f.type] if isinstance(f.type, str) else f.type
            group.add_argument(flag, type=py_type, default=f.default, help=help_text)
    return parser


def parse_train_args(argv: list[str]) -> TrainConfig:
    """argv with dashed flags (the CLI normalises nanochat's `--a_b` spellings before calling this), and at most
    one config file, whose values become the defaults the flags override."""
    if "--" in argv:
        # argparse reads everything after a bare "--" as positional: the flags after it would be taken for
        # config files or named as unknown flags. nanochat's launch line (`-m scripts.base_train -- --depth=20`)
        # has one for torchrun, which drops it, as accelerate launch does; run directly, it reaches us.
        raise UserError("a bare '--' ends the flags, so those after it would not be read as flags: drop the bare "
                        "'--' (torchrun and accelerate launch drop it themselves)")
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.config_file:
        file_values = load_config_file(ns.config_file, {f.name: f.type for f in fields(TrainConfig)})
        # nanochat's configurator applies its arguments in order, so there the file wins over a flag before it
        clash = sorted(_flags_before(argv, ns.config_file) & file_values.keys())
        if clash:
            raise UserError(f"--{clash[0]} comes before {ns.config_file}, which sets {clash[0]} too: nanochat would "
                            "take the file's value, here flags win over the file; put the flag after the file")
        parser.set_defaults(**file_values)
        ns = parser.parse_args(argv)
    return TrainConfig(**{f.name: getattr(ns, f.name) for f in fields(TrainConfig)})


def _flags_before(argv: list[str], config_file: str) -> set[str]:
    """The settings (field names) that flags in `argv` name before the config file."""
    names = set()
    for arg in argv[:argv.index(config_file)]:
        if arg.startswith("--"):
            names.add(arg[2:].partition("=")[0].replace("-", "_"))
    return names
