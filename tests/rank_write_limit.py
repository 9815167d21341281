"""One rank of a training run whose writes fail for real (run by tests/test_rank_save_failure.py under torchrun,
not collected by pytest):

    ACCELERATE_USE_CPU=true python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        tests/rank_write_limit.py RANK BYTES OUT -- TRAIN_ARGS...

On rank RANK only, RLIMIT_FSIZE is set to BYTES before anything runs: a write past it fails with EFBIG (Python
ignores SIGXFSZ), as a full disk, a quota or a node-local path fails one rank's files and not the others'.
Then the training CLI runs as `python -m nanochat_unsloth.train` does, and OUT/exit_<rank> records the exit
code it returns (the launcher reports only the first rank that failed).
"""

import os
import resource
import sys
from pathlib import Path

from nanochat_unsloth.common import run_main
from nanochat_unsloth.train.__main__ import main

if __name__ == "__main__":
    limited_rank, limit, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    assert sys.argv[4] == "--", sys.argv
    rank = int(os.environ["RANK"])
    if rank == limited_rank:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    code = run_main(main, sys.argv[5:])
    (out / f"exit_{rank}").write_text(str(code))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as cpu_launch.exit_without_finalization, with this code: no gloo teardown at exit
