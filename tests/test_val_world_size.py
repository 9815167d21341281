"""Val evaluation reads the same val windows whatever the number of processes (2026-12-06)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from nanochat_unsloth.train.loop import eval_steps_for
from nanochat_unsloth.shards.loader import TokenShardLoader
from test_loader import B, T, make_shards, window_of


def evaluated_windows(d, stream, world_size, eval_tokens):
    """The val windows whose targets count, over all ranks, for one evaluation of `eval_tokens`."""
    seen = []
    for r in range(world_size):
        ld = TokenShardLoader(d, "val", B, T, r, world_size)
        steps = eval_steps_for(SimpleNamespace(eval_tokens=eval_tokens, device_batch_size=B, max_seq_len=T),
                               world_size, ld)
        it = iter(ld)
        for _ in range(steps):
            x, y = next(it)
            if (y < 0).all():  # a padding batch: counts neither nats nor bytes
                continue
            assert (y >= 0).all()
            g = next(g for g in range(ld.num_windows) if window_of(stream, g)[1:].tolist() == y.flatten().tolist())
            seen.append(g)
    return sorted(seen)


@pytest.mark.parametrize("eval_tokens", [B * T * 4, B * T * 7, 10**6])
def test_same_val_windows_on_any_world_size(tmp_path, eval_tokens):
    d, streams = make_shards(tmp_path, val_sizes=(11 * 7 + 3,))  # 7 val windows of 11 tokens
    expected = list(range(min(eval_tokens // (B * T), 7)))
    for world_size in (1, 2, 3, 4):
        assert evaluated_windows(d, streams["val"], world_size, eval_tokens) == expected, world_size
