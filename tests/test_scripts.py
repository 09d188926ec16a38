"""The scripts behind docs/ (scripts/): each named in the README or a doc, each still importing what exists, the
shell ones parsed by bash, and those with a cheap entry (`--help`) run. Running them for real measures the machine
or needs the lent GPU, so that stays with the person who quotes their figures."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO

SCRIPTS = REPO / "scripts"
PYTHON = sorted(SCRIPTS.glob("*.py"))
SHELL = sorted(SCRIPTS.glob("*.sh"))
# The Python scripts with an argparse `--help`, which stops before anything is measured.
WITH_HELP = {
    "cluster_bench.py",
    "compare_services.py",
    "ensemble_check.py",
    "finetune_overlays.py",
    "gpu_compile_check.py",
}
HAS_RAY = importlib.util.find_spec("ray") is not None  # the cluster extra, which app.cluster needs


def test_scripts_holds_the_scripts():
    assert PYTHON and SHELL
    assert {p.name for p in PYTHON} >= WITH_HELP


@pytest.mark.parametrize("script", PYTHON + SHELL, ids=lambda p: p.name)
def test_each_script_is_named_in_the_readme_or_a_doc(script):
    texts = [(REPO / "README.md").read_text(), *(p.read_text() for p in (REPO / "docs").glob("*.md"))]
    assert any(f"scripts/{script.name}" in text for text in texts)


@pytest.mark.parametrize("script", PYTHON, ids=lambda p: p.name)
def test_each_python_script_imports_what_exists(script):
    """Every `from app... import name` of the script resolves, without running the script (some run at import)."""
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "app":
            if node.module.startswith("app.cluster") and not HAS_RAY:
                continue
            module = importlib.import_module(node.module)
            missing = [alias.name for alias in node.names if not hasattr(module, alias.name)]
            assert not missing, f"{script.name}: {node.module} has no {missing}"


@pytest.mark.parametrize("script", sorted(WITH_HELP))
def test_a_script_with_options_explains_them(script):
    command = [sys.executable, str(SCRIPTS / script), "--help"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


@pytest.mark.parametrize("script", SHELL, ids=lambda p: p.name)
def test_each_shell_script_parses(script):
    """Only parsed: both run on the lent GPU machine (nvidia-smi, the wheels device-prep readies, minutes of GPU)."""
    bash = shutil.which("bash")
    assert bash
    done = subprocess.run([bash, "-n", str(script)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
