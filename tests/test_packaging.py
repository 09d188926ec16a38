"""What the Docker image and docker-compose.yml run must exist in the installed package.

There is no Docker engine on CI machines: the Dockerfile is linted by hadolint and the compose file validated by
docker-compose in .ci/run; this test checks that every command they name is a real entrypoint that starts.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sysconfig
from importlib.metadata import entry_points

import pytest
import yaml

from app.main import create_app
from tests.conftest import REPO

SCRIPTS = {e.name for e in entry_points(group="console_scripts") if e.value.startswith("app.")}


def dockerfile_commands() -> list[list[str]]:
    """The exec-form CMD/ENTRYPOINT/HEALTHCHECK CMD arrays of the Dockerfile."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    return [json.loads(m) for m in re.findall(r"^(?:CMD|ENTRYPOINT|HEALTHCHECK .*?CMD)\s+(\[.*\])\s*$", text, re.M)]


def compose_commands() -> list[list[str]]:
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    commands = []
    for service in services.values():
        entry = service.get("entrypoint") or []
        commands.append([*entry, *service.get("command", [])])
        commands.append(service["healthcheck"]["test"][1:] if "healthcheck" in service else [])
    return [c for c in commands if c]


def test_the_package_declares_every_entrypoint():
    assert {"serve", "train", "evaluate", "predict", "synth", "bench"} <= SCRIPTS


@pytest.mark.parametrize("command", dockerfile_commands() + compose_commands(), ids=lambda c: " ".join(c)[:40])
def test_every_command_of_the_image_and_compose_file_exists(command):
    program = command[0]
    if program == "python":
        assert "http://127.0.0.1:8000/health" in command[-1]
        assert "/health" in create_app().openapi()["paths"], "the healthcheck polls a real route"
        return
    assert program in SCRIPTS, f"{program} is not a console script of the package"
    executable = shutil.which(program, path=sysconfig.get_path("scripts"))
    assert executable, f"{program} is declared but not installed beside this Python"
    done = subprocess.run([executable, "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


def test_the_dockerfile_serves_by_default_as_a_non_root_user():
    text = (REPO / "Dockerfile").read_text()
    assert dockerfile_commands()[-1] == ["serve"]
    assert re.search(r"^USER (?!root|0\b)\S+", text, re.M)
    assert "COPY model_store" in text
