"""What a --resume may change: the settings that change the step math are refused in one line naming the
flag (or --force); the speed and memory settings, and the `auto`s another machine resolves differently, go
on with a one-line notice naming what changed."""

from __future__ import annotations

import pytest

from nanochat_unsloth.checkpoint.meta import RunMeta
from nanochat_unsloth.checkpoint.resume import check_resume_compatible
from nanochat_unsloth.common import UserError
from nanochat_unsloth.train.config import TrainConfig

pytestmark = pytest.mark.usefixtures("fresh_notices")


def meta_of(resolved=None, **config) -> RunMeta:
    return RunMeta(train_config=TrainConfig(**config).to_dict(), resolved=resolved)


@pytest.mark.parametrize("was, now", [(False, True), (True, False)])
def test_turning_fp8_on_or_off_is_refused_unless_forced(was, now):
    """FP8 GEMMs round to 3 mantissa bits, not bf16's 7: the step math changes beyond bf16 rounding."""
    meta = meta_of(fp8=was)
    with pytest.raises(UserError, match=rf"--fp8={was} \(now {now}\).*--force"):
        check_resume_compatible(meta, TrainConfig(fp8=now))
    check_resume_compatible(meta, TrainConfig(fp8=now, force=True))
    check_resume_compatible(meta, TrainConfig(fp8=was))
