"""The layers are a contract: api/ is HTTP and never touches torch, ml/ never touches the web stack, ml/'s shared
core never imports its subpackages, serving never imports training, cluster/ (Ray) sits over ml/ with only predict
above it, and no module imports another that (directly or not) imports it back."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

APP = REPO / "app"
WEB = {"fastapi", "starlette", "uvicorn", "multipart"}
SUBPACKAGES = ("data", "scoring", "serving", "training")
# What each subpackage of app.ml may import besides the core: nothing runs back up towards training.
ALLOWED = {
    "data": set(),
    "serving": set(),
    "scoring": {"data", "serving"},
    "training": {"data", "scoring", "serving"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in the file, as absolute dotted names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


MODULES = {module_name(p): imports(p) for p in APP.rglob("*.py")}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("app.api")))
def test_the_api_layer_never_imports_torch(module):
    assert not {i for i in MODULES[module] if i.split(".")[0] == "torch"}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("app.ml")))
def test_the_ml_layer_never_imports_the_web_stack_or_the_api(module):
    roots = {i.split(".")[0] for i in MODULES[module]}
    assert not roots & WEB and not {i for i in MODULES[module] if i.startswith("app.api")}


def test_no_import_cycles_between_the_apps_modules():
    graph = {m: {i for i in found if i in MODULES and i != m} for m, found in MODULES.items()}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            assert state.get(target) != "open", "import cycle: " + " -> ".join([*path, module, target])
            if target not in state:
                visit(target, [*path, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def ml_part(name: str) -> str | None:
    """'core' for modules directly in app.ml, the subpackage's name for those below it, None outside app.ml."""
    parts = name.split(".")
    if parts[:2] != ["app", "ml"] or len(parts) < 3:
        return None
    return parts[2] if parts[2] in SUBPACKAGES else "core"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if ml_part(m)))
def test_ml_subpackages_import_only_down(module):
    part = ml_part(module)
    allowed = {"core", part} | ALLOWED.get(part, set())
    reached = {ml_part(i) for i in MODULES[module] if ml_part(i)}
    assert reached <= allowed, f"{module} ({part}) imports {sorted(reached - allowed)}"


def test_the_cluster_layer_sits_over_ml_and_only_predict_imports_it():
    """Ray is an optional extra: nothing but predict (when --cluster is given) may need app.cluster."""
    for module, found in MODULES.items():
        ours = {i for i in found if i.startswith("app.")}
        if module.startswith("app.cluster"):
            assert all(i.startswith(("app.ml", "app.cluster")) for i in ours), f"{module} imports {sorted(ours)}"
        else:
            assert module == "app.predict" or not {i for i in ours if i.startswith("app.cluster")}, module
    assert not {m for m, found in MODULES.items() if "ray" in {i.split(".")[0] for i in found}} - {
        m for m in MODULES if m.startswith("app.cluster")
    }, "only app.cluster imports ray"


def test_importing_the_settings_does_not_load_torch():
    code = "import sys, app.config; assert 'torch' not in sys.modules, 'app.config loaded torch'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_the_layout_names_every_module_of_the_app():
    """docs/layout.md is the map of app/: each module's name is in it."""
    text = (REPO / "docs" / "layout.md").read_text()
    layout = text[: text.index("```", text.index("```") + 3)]
    names = {p.stem for p in APP.rglob("*.py") if p.stem not in ("__init__", "__main__")}
    assert not {n for n in names if not re.search(rf"\b{n}\b", layout)}
