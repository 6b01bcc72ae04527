"""Runner processes for tests: `python -m kubepeer_runner` on a loopback port, tiny real models."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx

from conftest import REPO, free_port
from support import wait_for


@dataclass
class RunnerProcess:
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    statuses: list[str]  # what /health said from the first answer to OK

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)


def start_runner(env: dict[str, str], log: Path, token: str | None = None) -> RunnerProcess:
    port = free_port()
    full_env = {
        **os.environ, "PYTHONPATH": str(REPO / "runner"), "HOST": "127.0.0.1",
        "PORT": str(port), "HF_HUB_OFFLINE": "1", **env,
    }  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "kubepeer_runner"], env=full_env,
        stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    runner = RunnerProcess(f"http://127.0.0.1:{port}", process, log, [])
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    def healthy() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"runner exited:\n{log.read_text()}")
        try:
            status = httpx.get(f"{runner.url}/health", headers=headers, timeout=2).json()["status"]
        except httpx.HTTPError:
            return False
        runner.statuses.append(status)
        return status in ("OK", "ERROR")

    wait_for(healthy, timeout=300, every=0.02, what="the runner to finish loading")
    return runner


def stop(runner: RunnerProcess) -> None:
    runner.process.terminate()
    try:
        runner.process.wait(timeout=20)
    except subprocess.TimeoutExpired:  # uvicorn waits for in-flight inference; don't
        runner.process.kill()
        runner.process.wait()
