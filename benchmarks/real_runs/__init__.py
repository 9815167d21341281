"""The subcommands of benchmarks/runs.py, one module each. Every module has a docstring (its `--help`),
`add_arguments(parser)` and `run(args, parser) -> exit code`; runs.py is their only entry point."""
