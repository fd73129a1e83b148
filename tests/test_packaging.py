"""Install layout and the import direction core -> never console."""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_core_never_imports_console_or_textual() -> None:
    for path in (ROOT / "core").rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
                if node.level and node.module and node.module.startswith("console"):
                    names.append("llmconsole.console")
                if node.level >= 2 and (node.module or "").startswith("console"):
                    names.append("llmconsole.console")
            for name in names:
                assert not name.startswith(("llmconsole.console", "textual")), f"{path}: {name}"
    code = (
        "import sys, llmconsole.core, llmconsole.kernels; "
        "bad=[m for m in sys.modules if m.startswith(('llmconsole.console','textual'))]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_package_imports_from_outside_the_repo(tmp_path: Path) -> None:
    code = (
        "import llmconsole.core as c, llmconsole.console as k; print(c.__file__); print(c.Engine)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert "Engine" in out.stdout
    # No top-level `core` or `console` package leaks into site-packages.
    leak = subprocess.run(
        [sys.executable, "-c", "import core"], cwd=tmp_path, capture_output=True, text=True
    )
    assert leak.returncode != 0


def test_run_from_the_checkout_its_folders_shadow_no_installed_package() -> None:
    """`python -m llmconsole.console` from the checkout puts it on sys.path, where our kernels/
    folder used to hide the `kernels` package that transformers 5.25 imports with every model
    config (the default model's start failed with "cannot import name 'CUDAProperties'")."""
    code = (
        "import importlib.util, llmconsole.core\n"
        "from transformers import LlamaConfig\n"
        "LlamaConfig(hidden_size=64)\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(spec.origin if spec else None)\n"
        "import llmconsole.kernels.norm\n"  # our own kernels still import by their full name
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    origin = Path(out.stdout.strip().splitlines()[-1])
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return  # nothing to shadow here (transformers < 5.25): the config import above is it
    assert not origin.is_relative_to(ROOT), origin  # the installed package, not our folder
