"""What the horizon asks of the train shards: said at start, and refused with --no_repeat_data when it repeats.

The loader wraps around when a run needs more windows than the split holds (shards/loader.py), which
is what nanochat's loader does too, silently. Here the log says it, and how many passes it makes.
"""

from __future__ import annotations

from pathlib import Path

from nanochat_unsloth.common import UserError


def data_budget_line(num_iterations: int, total_batch_size: int, windows_per_step: int, num_windows: int,
                     train_tokens: int, shards_dir: Path, no_repeat: bool) -> str:
    """One log line: tokens the horizon needs against tokens the train shards hold, and the passes over them.

    `windows_per_step` is processes x accumulation (one B x T+1 window each); `num_windows` the split's
    windows per pass. A horizon past one pass is refused when `no_repeat`.
    """
    needed = num_iterations * total_batch_size
    passes = num_iterations * windows_per_step / num_windows
    what = f"the horizon needs {needed:,} tokens ({num_iterations:,} steps x {total_batch_size:,})"
    if passes <= 1:
        return f"data: {what}; the train shards hold {train_tokens:,}: {100 * passes:.1f}% of one pass, no token twice"
    if no_repeat:
        raise UserError(f"--no_repeat_data: {what} but the train shards in {shards_dir} hold {train_tokens:,} "
                        f"({passes:.2f} passes); prep more data, or shorten the horizon (--num_iterations, "
                        "--target_param_data_ratio)")
    return (f"data: {what}; the train shards hold {train_tokens:,}: the data will repeat, {passes:.2f} passes over "
            "it (--no_repeat_data refuses this instead)")
