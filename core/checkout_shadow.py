"""Keep a development checkout's top-level folders from shadowing installed packages.

In an editable install our sources sit in the checkout as core/, console/, kernels/ and themes/
and are imported as llmconsole.*. Run from the checkout (`python -m llmconsole.console`,
`python -m pytest`), Python puts the checkout itself on sys.path, and then the bare name
`kernels` finds our folder before the PyPI package `kernels` (Hugging Face's hub kernels), which
transformers >= 5.25 imports with every model config: "cannot import name 'CUDAProperties' from
'kernels'". The finder below resolves the bare top-level names of our folders from the rest of
sys.path first; where nothing else provides one, the usual lookup goes on as before (none of
our code imports them bare).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

CHECKOUT = Path(__file__).resolve().parent.parent
SHADOWING = frozenset({"core", "console", "kernels", "themes"})


def _resolved(entry: str) -> Path | None:
    try:
        return Path(entry or ".").resolve()
    except (OSError, RuntimeError):
        return None


class SkipCheckout(importlib.abc.MetaPathFinder):
    """Finds the bare names in SHADOWING on sys.path without the checkout."""

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if path is not None or name not in SHADOWING:
            return None  # submodules and every other name: the usual finders
        elsewhere = [p for p in sys.path if _resolved(p) != CHECKOUT]
        # None where nothing else provides the name: the usual finders then behave as before
        # (find_spec must not raise: transformers probes optional packages with it).
        return importlib.machinery.PathFinder.find_spec(name, elsewhere)


def install() -> None:
    """Once per process, and only where this file lies in a checkout beside kernels/."""
    if not (CHECKOUT / "kernels" / "__init__.py").is_file():
        return  # a wheel install: nothing here shadows anything
    if not any(isinstance(f, SkipCheckout) for f in sys.meta_path):
        sys.meta_path.insert(0, SkipCheckout())


install()
