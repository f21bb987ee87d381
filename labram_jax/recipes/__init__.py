"""The paper's recipes, one module each with a `config()` returning an Experiment.

`labram train NAME` runs one by name, `labram train path/to/recipe.py` a recipe file of your own; the launchers in
experiments/ (what pods run) call the same functions. They live in the package so that an installed labram-jax
has them.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable

from labram_jax.errors import UserError
from labram_jax.train.config import Experiment


def available() -> dict[str, str]:
    """Recipe name -> its one-line summary (the docstring's first clause)."""
    summaries = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
        doc = " ".join((importlib.import_module(f"{__name__}.{info.name}").__doc__ or "").split("\n\n")[0].split())
        summaries[info.name] = min((doc.split(sep)[0] for sep in (": ", ". ")), key=len).rstrip(".")
    return summaries


def load(recipe: str) -> Callable[[], Experiment]:
    """The config function of a recipe: a name from `available()`, or the path of a recipe file."""
    if recipe.endswith(".py") or "/" in recipe:
        module = _from_file(Path(recipe))
    elif recipe in available():
        module = importlib.import_module(f"{__name__}.{recipe}")
    else:
        near = difflib.get_close_matches(recipe, available(), n=1)
        raise UserError(f"no recipe {recipe!r}" + (f"; did you mean {near[0]}?" if near else "")
                        + " (labram train --list shows them)")
    config = getattr(module, "config", None)
    if not callable(config):
        raise UserError(f"{recipe}: no config() returning an Experiment")
    return config


def _from_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    # Its folder goes first on the path: recipes import the recipes beside them, as experiments/*.py do.
    sys.path.insert(0, str(path.resolve().parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module
