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
        """Resident memory now (VmRSS) and at its peak (VmHWM), from /proc (Linux): of the server and, where it
        runs several workers, of every process under it together."""
        fields = {"VmRSS": 0, "VmHWM": 0}
        for pid in process_tree(self.pid):
            for line in _status_lines(pid):
                key, _, value = line.partition(":")
                if key in fields:
                    fields[key] += int(value.split()[0])
        return fields

    def cpu_seconds(self) -> float:
        """CPU time the server process has used so far (user and system), from /proc (Linux)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def process_tree(pid: int) -> list[int]:
    """`pid` and every process under it (Linux /proc)."""
    with contextlib.suppress(FileNotFoundError):  # it ended while being read
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
        children = [int(child) for task in tasks for child in (task / "children").read_text().split()]
        return [pid, *(descendant for child in children for descendant in process_tree(child))]
    return []


def _status_lines(pid: int) -> list[str]:
    with contextlib.suppress(FileNotFoundError):
        return Path(f"/proc/{pid}/status").read_text().splitlines()
    return []


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
