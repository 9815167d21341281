"""The training loop with the token embedding kept in fp32 on the GPU: a control run only
(`runs.py curve --controls "wte_fp32=@wte_fp32 ..."`), never a training option.

nanochat keeps wte in bf16 on CUDA, and so does our path; under DeepSpeed wte is fp32 (ZeRO's flat fp32
partitions: train/deepspeed_zero.py). A curve of our own path with only that change, against the same-binary
A-B spread, measures what that one precision change does, so the ZeRO curves' gap can be split into it and
the rest (Newton-Schulz's rounding: the --compile controls).

    python benchmarks/real_runs/train_wte_fp32.py <the flags of python -m nanochat_unsloth.train>
"""

from __future__ import annotations

import sys

from nanochat_unsloth.common import run_main
from nanochat_unsloth.model.gpt import GPT
from nanochat_unsloth.train.__main__ import main

_init_weights = GPT.init_weights


def init_weights_wte_fp32(self: GPT) -> None:
    _init_weights(self)
    self.transformer.wte.float()  # undo the CUDA-only bf16 cast; a no-op on CPU, where wte is fp32 already


GPT.init_weights = init_weights_wte_fp32

if __name__ == "__main__":
    # through run_main, as `python -m nanochat_unsloth.train` is: it accepts nanochat's --a_b spellings
    sys.exit(run_main(main, None))
