"""Real training runs, launched and compared: one entry point, one subcommand per question.

    python benchmarks/runs.py --help                   # the subcommands, one line each
    python benchmarks/runs.py SUBCOMMAND --help        # what it runs, what it reports, its options

Every subcommand launches `python -m nanochat_unsloth.train` (through `accelerate launch` for several GPUs) and
reads back the run's own logs (<base-dir>/runs/<tag>/metrics.jsonl, eval.jsonl). Each lives in its own module
under real_runs/; the helpers they share (the corpus, starting a run, reading its logs) are in common.py.
"""

from __future__ import annotations

import argparse
import sys

from real_runs import ab, capacity, curve, deepspeed, quality, resume, scaling

SUBCOMMANDS = {"scaling": scaling, "curve": curve, "resume": resume, "quality": quality, "ab": ab,
               "deepspeed": deepspeed, "capacity": capacity}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="runs.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    for name, module in SUBCOMMANDS.items():
        summary = " ".join(module.__doc__.split("\n\n")[0].split())  # the docstring's first paragraph
        sp = sub.add_parser(name, help=summary, description=module.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sp)
        sp.set_defaults(_module=module, _parser=sp)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module, parser = args._module, args._parser
    for key in ("subcommand", "_module", "_parser"):  # the subcommand's own options alone, as its JSON records them
        delattr(args, key)
    return module.run(args, parser)


if __name__ == "__main__":
    sys.exit(main())
