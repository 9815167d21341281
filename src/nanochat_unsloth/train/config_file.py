"""nanochat's config files: `python -m scripts.base_train config/d26.py --depth=20`.

nanochat's configurator runs such a file as Python and keeps the assignments; flags then override them.
Here the file's public names must be TrainConfig fields (a typo is refused with the closest name, where
nanochat would set an unused global), and each value must have the field's type. Helper variables the
file does not mean as settings start with an underscore.
"""

from __future__ import annotations

import difflib
import types
from pathlib import Path

from nanochat_unsloth.common import UserError

_TYPES = {"int": (int,), "float": (float, int), "str": (str,), "bool": (bool,)}


def load_config_file(path: str, field_types: dict[str, str]) -> dict:
    """The settings a config file assigns, checked against `field_types` ({name: "int"|"float"|"str"|"bool"})."""
    file = Path(path)
    if not file.is_file():
        hint = " (a flag needs its leading --)" if not file.suffix else ""
        raise UserError(f"{path}: config file not found{hint}")
    namespace: dict = {}
    try:
        exec(compile(file.read_text(), str(file), "exec"), namespace)
    except Exception as e:  # the file is the user's code: any error in it is theirs to fix, in one line
        raise UserError(f"{path}: the config file failed to run: {type(e).__name__}: {e}") from None
    values = {}
    for name, value in namespace.items():
        if name.startswith("_") or isinstance(value, (types.ModuleType, types.FunctionType, type)):
            continue
        if name not in field_types:
            close = difflib.get_close_matches(name, list(field_types), n=1)
            hint = f"; did you mean {close[0]}?" if close else "; prefix helper variables with _"
            raise UserError(f"{path}: {name} is not a training setting{hint}")
        kind = field_types[name]
        ok = _TYPES[kind]
        if not isinstance(value, ok) or (kind != "bool" and isinstance(value, bool)):
            article = "an" if kind == "int" else "a"
            raise UserError(f"{path}: {name} = {value!r} is a {type(value).__name__}; --{name} takes {article} {kind}")
        values[name] = float(value) if kind == "float" else value
    return values
