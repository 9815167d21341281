"""The built-in demo corpus: text that ships with every Python, written as parquet in nanochat's layout.

Documents are the `pydoc_data.topics` help pages plus the docstrings of the standard library, read
with `ast` from the stdlib's own source files (nothing is imported, so nothing runs and installed
third-party packages play no part). Modules are visited in sorted order and the documents are
shuffled with a fixed seed, so a given Python build always yields the same bytes. The files look
like FineWeb-Edu's: `shard_00000.parquet` ... with a `text` column and several row groups each,
the last file being the val split, so the demo runs the real data path.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import random
import sys
import sysconfig
from pathlib import Path

from nanochat_unsloth.common import FlagParser, UserError, atomic_path, atomic_write_json

NUM_FILES = 8  # 7 train + 1 val
ROW_GROUPS_PER_FILE = 4
SHUFFLE_SEED = 20240520
MARKER = "demo_corpus.json"  # says "this directory's parquet files are ours", so a re-run may replace them

# Test suites and the IDLE/turtle demos are code samples rather than prose.
SKIP_MODULES = {"test", "idlelib", "turtledemo", "lib2to3", "ensurepip", "this", "antigravity", "__hello__", "__phello__"}
SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__"}


def _stdlib_files() -> list[tuple[str, Path]]:
    """(dotted module name, source file) of the pure-Python stdlib, sorted by module name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in SKIP_MODULES:
            continue
        if (root / f"{name}.py").is_file():
            out.append((name, root / f"{name}.py"))
        elif (root / name / "__init__.py").is_file():
            for path in sorted((root / name).rglob("*.py")):
                rel = path.relative_to(root).with_suffix("")
                if SKIP_DIRS & set(rel.parts):
                    continue
                parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
                out.append((".".join(parts), path))
    return out


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    try:
        return f"({ast.unparse(node.args)})"
    except Exception:
        return "(...)"


def _functions_text(body: list[ast.stmt], prefix: str) -> list[str]:
    parts = []
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                parts.append(f"{prefix}{node.name}{_signature(node)}\n\n{doc}")
    return parts


def _module_documents(module: str, path: Path) -> list[str]:
    """One document for the module (its docstring and its functions'), one per top-level class."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    docs = []
    head = [ast.get_docstring(tree) or ""] + _functions_text(tree.body, f"{module}.")
    if any(head):
        docs.append(f"Module {module}\n\n" + "\n\n".join(p for p in head if p))
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            parts = [ast.get_docstring(node) or ""] + _functions_text(node.body, f"{node.name}.")
            if any(parts):
                docs.append(f"class {module}.{node.name}\n\n" + "\n\n".join(p for p in parts if p))
    return docs


@functools.lru_cache(maxsize=1)
def demo_documents() -> tuple[str, ...]:
    """All demo documents, in their final (shuffled) order (parsing the stdlib takes a second: cached)."""
    from pydoc_data.topics import topics

    docs = [topics[key].strip() for key in sorted(topics)]
    for module, path in _stdlib_files():
        docs.extend(_module_documents(module, path))
    docs = [d for d in docs if d.strip()]
    random.Random(SHUFFLE_SEED).shuffle(docs)  # mix help pages and modules across train and val
    return tuple(docs)


def write_demo_corpus(out_dir: str | Path, force: bool = False) -> list[Path]:
    """Write shard_00000.parquet ... shard_0000{NUM_FILES-1}.parquet (last = val) into out_dir."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir = Path(out_dir).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(out_dir.glob("*.parquet"))
    if existing and not (out_dir / MARKER).exists() and not force:
        raise UserError(
            f"--out {out_dir}: already holds {len(existing)} parquet file(s) that are not a demo corpus; "
            "choose an empty directory, or pass --force to replace them"
        )
    for path in existing:  # an older demo corpus (or --force): ours replace them all
        path.unlink()

    docs = demo_documents()
    per_file = -(-len(docs) // NUM_FILES)
    rows_per_group = -(-per_file // ROW_GROUPS_PER_FILE)
    paths = []
    for i in range(NUM_FILES):
        chunk = list(docs[i * per_file:(i + 1) * per_file])
        path = out_dir / f"shard_{i:05d}.parquet"
        with atomic_path(path) as tmp:
            pq.write_table(pa.table({"text": chunk}), tmp, row_group_size=rows_per_group, compression="zstd")
        paths.append(path)
    text_sha = hashlib.sha256("\x00".join(docs).encode()).hexdigest()
    atomic_write_json(out_dir / MARKER, {
        "what": "nanochat-unsloth demo corpus: pydoc_data.topics + standard-library docstrings",
        "python": sys.version.split()[0],
        "documents": len(docs),
        "characters": sum(len(d) for d in docs),
        "files": [p.name for p in paths],
        "text_sha256": text_sha,
    })
    return paths


def main(argv: list[str]) -> int:
    parser = FlagParser(prog="nanochat-unsloth demo-data", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for the parquet files, e.g. <base>/base_data")
    parser.add_argument("--force", action="store_true", help="replace parquet files that are not a demo corpus")
    args = parser.parse_args(argv)
    paths = write_demo_corpus(args.out, force=args.force)
    meta = json.loads((paths[0].parent / MARKER).read_text())
    size = sum(p.stat().st_size for p in paths)
    print(
        f"demo-data: {meta['documents']:,} documents, {meta['characters'] / 1e6:.2f}M characters -> {len(paths)} parquet "
        f"files ({size / 1e6:.2f} MB, last one is val) in {paths[0].parent}"
    )
    return 0


if __name__ == "__main__":
    from nanochat_unsloth.common import run_main

    sys.exit(run_main(main, None))
