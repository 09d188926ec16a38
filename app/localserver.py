"""Start the real service (`python -m app.serve`) on 127.0.0.1 in a child process: for `bench` and the tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx


@dataclass(frozen=True)
class LocalServer:
    url: str
    pid: int

    def memory_kib(self) -> dict[str, int]:
        """Resident memory now (VmRSS) and at its peak (VmHWM), from /proc (Linux)."""
        fields = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0])
        return fields


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(log_path: Path | None = None, timeout: float = 120.0, **settings: str) -> Iterator[LocalServer]:
    """Run the service with CELLSEG_<NAME>=value for each setting; yield it once /ready answers 200."""
    port = free_port()
    env = {**os.environ, **{f"CELLSEG_{k.upper()}": str(v) for k, v in settings.items()}}
    log = log_path.open("w") if log_path else subprocess.DEVNULL
    command = [sys.executable, "-m", "app.serve", "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = LocalServer(f"http://127.0.0.1:{port}", process.pid)
    headers = {"X-API-Key": settings["api_key"].encode()} if "api_key" in settings else {}
    try:
        _wait_until_ready(server.url, process, headers, timeout)
        yield server
    finally:
        process.terminate()
        process.wait(timeout=30)
        if log_path:
            log.close()


def _wait_until_ready(url: str, process: subprocess.Popen, headers: dict[str, str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode} before it was ready")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/ready", headers=headers, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"the server did not become ready in {timeout:.0f} s")
