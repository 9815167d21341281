"""The package layering of docs/ARCHITECTURE.md, read off the source with `ast` (nothing is imported).

Every `import` in src/ (module level or inside a function) may name a module of a lower floor, or of its own
unit; never one of a higher floor or of another unit on the same floor. And no module imports itself back
through a chain of others (no cycle), inside a unit or across units.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "nanochat_unsloth"

# Floors, lowest first; each holds units (a package, or a module) that do not import one another.
# A module belongs to the unit with the longest matching name.
LAYERS = (
    ("common",),                          # base dir, errors, atomic writes, notices, running a sub-command
    ("tokenizer", "shards", "model"),     # the tokenizer; token shards + loader; the GPT and its kernels
    ("prep", "eval.metrics", "eval.core", "checkpoint"),  # corpus -> shards; bits per byte and greedy samples;
                                          # CORE; run checkpoints: meta, save/verify/branch, resume checks, reading
                                          # ours or nanochat's
    ("convert",),                         # the rules of nanochat's checkpoint layout; the export to it, the
                                          # tokenizer that travels with the weights, the command's flags
    ("train", "eval.cli"),                # the run: loop, step, optimizers, schedules, config, the import from
                                          # nanochat (it builds a run's state); `nanochat-unsloth eval`
    ("cli",),                             # `nanochat-unsloth <command>`; `convert` meets its export and import here
    ("demo",),                            # the whole pipeline
)
FLOOR = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def module_names() -> dict[str, Path]:
    names = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


MODULES = module_names()


def unit_of(module: str) -> str | None:
    rel = module.removeprefix(PACKAGE).lstrip(".")
    for unit in sorted(FLOOR, key=len, reverse=True):
        if rel == unit or rel.startswith(unit + "."):
            return unit
    return None  # the package itself


def imports_of(module: str) -> set[str]:
    """Our modules that `module` imports (`from a.b import c` names a.b.c when that is a module)."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    is_package = MODULES[module].name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # `import a.b.c` also names a.b.c's packages
                target = target.rpartition(".")[0]
            if target.startswith(PACKAGE) and target != module:
                found.add(target)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_has_a_floor():
    # only empty package markers (nanochat_unsloth; eval/, split over two floors) have none
    floorless = [m for m in MODULES if unit_of(m) is None]
    assert all(MODULES[m].name == "__init__.py" and not GRAPH[m] for m in floorless), floorless


def test_imports_only_go_down_the_floors():
    wrong = []
    for module, targets in GRAPH.items():
        unit = unit_of(module)
        for target in targets:
            other = unit_of(target)
            if other is None or other == unit:
                continue
            if FLOOR[other] >= FLOOR[unit]:
                where = "the same floor" if FLOOR[other] == FLOOR[unit] else "a higher floor"
                wrong.append(f"{module} imports {target} ({other!r}, {where} than {unit!r})")
    assert wrong == [], "\n".join(wrong)


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert cycles == [], "\n".join(cycles)


def test_the_checker_sees_lazy_and_package_relative_imports():
    """The checks above are only as good as the import reader: it must see function-level imports."""
    assert "nanochat_unsloth.checkpoint.layouts" in GRAPH["nanochat_unsloth.eval.cli"]  # inside a function
    assert "nanochat_unsloth.model.fp8" in GRAPH["nanochat_unsloth.model.build"]  # `from pkg import module`
    assert unit_of("nanochat_unsloth.eval.cli") == "eval.cli" and unit_of("nanochat_unsloth.eval") is None


def test_checkpoints_are_read_and_written_below_their_users():
    """eval and convert read checkpoints from the checkpoint package, which sits below train: eval.cli
    shares train's floor (neither may import the other), convert sits below both (train's import from nanochat
    reads nanochat's layout through it), and none reaches into train/checkpoint.py."""
    assert FLOOR["checkpoint"] < FLOOR["convert"] < FLOOR["train"] == FLOOR["eval.cli"]
    for module in ("nanochat_unsloth.eval.cli", "nanochat_unsloth.convert.cli", "nanochat_unsloth.convert.nanochat_layout"):
        assert not {t for t in GRAPH[module] if t.startswith("nanochat_unsloth.train.checkpoint")}, module


def test_the_model_is_assembled_only_in_build_model():
    """`GPT(...)` is called in one place, model/build.py; everything else (loop, eval, convert, demo, the
    layout's expected shapes) goes through `build_model`."""
    callers = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "GPT":
                callers.append(module)
    assert callers == ["nanochat_unsloth.model.build"], callers


def _in_package(module: str, names: tuple[str, ...]) -> bool:
    rel = module.removeprefix(PACKAGE).lstrip(".")
    return any(rel == name or rel.startswith(name + ".") for name in names)


def test_nothing_below_the_run_imports_it():
    """train/ is the top of the library: checkpoints, conversion, evaluation, the model, the shards and their
    preparation each work without the training stack, so none of them imports a module of train/ (not even
    inside a function). The import from nanochat builds the state a run would hold at the imported step (the
    run's optimizers, TrainConfig's defaults), so it is train/'s, and `nanochat-unsloth convert` reaches it
    through the top-level CLI."""
    below = ("common", "tokenizer", "shards", "model", "prep", "checkpoint", "eval", "convert")
    climbing = {module: {target for target in targets if _in_package(target, ("train",))}
                for module, targets in GRAPH.items() if _in_package(module, below)}
    climbing = {module: targets for module, targets in climbing.items() if targets}
    assert climbing == {}, climbing
