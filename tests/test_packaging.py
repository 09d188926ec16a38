"""What the Docker image and docker-compose.yml run must exist in the installed package.

The Dockerfile is linted by hadolint and the compose file validated by docker-compose in .ci/run; this test checks,
without a Docker engine, that every command they name is a real entrypoint that starts. tests/test_image.py builds
and runs the image itself (`.ci/docker`).
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


# The image's own two scripts (deploy/): the entrypoint runs the command it is given, the healthcheck asks /ready.
CONTAINER_SCRIPTS = {"cellseg-entrypoint": "deploy/entrypoint.sh", "cellseg-healthcheck": "deploy/healthcheck.py"}


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
    if command[0] in CONTAINER_SCRIPTS:
        source = CONTAINER_SCRIPTS[command[0]]
        assert f"COPY {source} /usr/local/bin/{command[0]}" in (REPO / "Dockerfile").read_text()
        if command[0] == "cellseg-healthcheck":
            assert "/ready" in (REPO / source).read_text(), "healthy means ready"
            assert "/ready" in create_app().openapi()["paths"], "the healthcheck polls a real route"
        command = command[1:]
        if not command:
            return
    program = command[0]
    assert program in SCRIPTS, f"{program} is not a console script of the package"
    executable = shutil.which(program, path=sysconfig.get_path("scripts"))
    assert executable, f"{program} is declared but not installed beside this Python"
    done = subprocess.run([executable, "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


def test_the_dockerfile_serves_by_default_as_a_non_root_user():
    text = (REPO / "Dockerfile").read_text()
    assert dockerfile_commands()[-2:] == [["cellseg-entrypoint"], ["serve"]]
    assert re.search(r"^USER (?!root|0\b)\S+", text, re.M)
    assert re.search(r"^COPY (--chown=10001:10001 )?model_store ", text, re.M)
