"""The layering of the package (pyproject.toml's import-linter contracts) holds, and the check
really fails on a cycle or on the reference model importing the CPU package."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def lint_imports(package_parent: Path) -> subprocess.CompletedProcess:
    """lint-imports over the qwenkit found under package_parent, with this repository's contracts."""
    env = {"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(package_parent), "HOME": str(package_parent)}
    lint = Path(sys.executable).parent / "lint-imports"
    command = [str(lint), "--config", str(ROOT / "pyproject.toml"), "--no-cache"]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=package_parent, timeout=300)


def test_the_contracts_hold():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "0 broken" in result.stdout


@pytest.fixture
def package_copy(tmp_path):
    shutil.copytree(ROOT / "qwenkit", tmp_path / "qwenkit", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


@pytest.mark.parametrize(
    "module, line, broken",
    [
        ("checkpoint.py", "from qwenkit import model", "qwenkit.checkpoint is not allowed to import qwenkit.model"),
        ("model.py", "from qwenkit.cpu import ops", "qwenkit.model is not allowed to import qwenkit.cpu"),
        ("cpu/ops.py", "from qwenkit.cpu import stack", "qwenkit.cpu.ops is not allowed to import qwenkit.cpu.stack"),
        ("server/engine.py", "from qwenkit.server import app", "no import cycle"),
    ],
)
def test_the_check_fails_on_a_broken_layer_or_a_cycle(package_copy, module, line, broken):
    path = package_copy / "qwenkit" / module
    path.write_text(path.read_text() + f"\n\ndef _late():\n    {line}  # an import inside a function counts too\n")
    result = lint_imports(package_copy)
    assert result.returncode != 0
    assert broken in result.stdout
