"""Runner processes for the tests (uvicorn on loopback, tiny real models), the media they
send, and ai-runner's published OpenAPI document, the oracle every contract is checked on."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import struct
import subprocess
import sys
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import REPO, free_port
from tests.support import wait_for

TOKEN = "runner-test-token"
SPEC_NAME = "ai-runner-openapi-v0.14.1.yaml"


@dataclass
class RunnerProcess:
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    statuses: list[str]  # what /health said from the first answer to OK

    def client(self, token: str | None = None, timeout: float = 120) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)


def start_runner(env: dict[str, str], log: Path, wait: bool = True) -> RunnerProcess:
    """`python -m kubepeer_runner` with env; by default waits until /health leaves LOADING."""
    port = free_port()
    full_env = {
        **os.environ, "HOST": "127.0.0.1",
        "PORT": str(port), "HF_HUB_OFFLINE": "1", **env,
    }  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "kubepeer_runner"], env=full_env,
        stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    runner = RunnerProcess(f"http://127.0.0.1:{port}", process, log, [])

    def health(done: tuple[str, ...]) -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"runner exited:\n{log.read_text()}")
        try:
            status = httpx.get(f"{runner.url}/health", timeout=2).json()["status"]
        except httpx.HTTPError:
            return False
        runner.statuses.append(status)
        return status in done

    finished = ("OK", "IDLE", "ERROR") if wait else ("LOADING", "OK", "IDLE", "ERROR")
    wait_for(lambda: health(finished), timeout=180, every=0.02, what="the runner's /health")
    return runner


def stop(runner: RunnerProcess) -> None:
    runner.process.terminate()
    try:
        runner.process.wait(timeout=20)
    except subprocess.TimeoutExpired:  # uvicorn waits for in-flight inference; don't
        runner.process.kill()
        runner.process.wait()


def png(width: int, height: int, noisy: bool = False) -> bytes:
    if noisy:
        image = Image.effect_noise((width, height), 80).convert("RGB")
    else:
        image = Image.new("RGB", (width, height), (30, 120, 200))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode(data_url: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert data_url.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(data_url[len(prefix) :])))


def wav(seconds: float, rate: int = 22050) -> bytes:
    samples = (int(8000 * math.sin(i / 10)) for i in range(int(seconds * rate)))
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"".join(struct.pack("<h", s) for s in samples))
    return buffer.getvalue()


def error(response: httpx.Response) -> str:
    return response.json()["detail"]["msg"]


def shared_dir() -> Path | None:
    """The `shared` folder beside the checkout (KUBEPEER_SHARED overrides; a worktree
    elsewhere falls back to /work/shared)."""
    candidates = [os.environ.get("KUBEPEER_SHARED"), REPO.parent / "shared", "/work/shared"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "reference" / SPEC_NAME).is_file():
            return Path(candidate)
    return None


@cache
def _load_spec(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text())


def ai_runner_spec() -> dict[str, Any]:
    """ai-runner v0.14.1's OpenAPI document, or a skip saying where it was looked for."""
    shared = shared_dir()
    if shared is None:
        pytest.skip(
            f"ai-runner's OpenAPI document ({SPEC_NAME}) is not in ../shared/reference, "
            "/work/shared/reference or $KUBEPEER_SHARED/reference"
        )
    return _load_spec(shared / "reference" / SPEC_NAME)


def schema_errors(spec: dict[str, Any], schema: dict[str, Any], instance: Any) -> list[str]:
    """Where instance breaks a schema of the spec (JSON Schema 2020-12, refs into spec)."""
    from jsonschema import Draft202012Validator

    root = {**schema, "components": spec["components"]}
    validator = Draft202012Validator(root)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(instance)]


def response_schema(spec: dict[str, Any], path: str, status: int, method: str = "post") -> Any:
    responses = spec["paths"][path][method]["responses"]
    assert str(status) in responses, f"ai-runner does not document {status} for {path}"
    return responses[str(status)]["content"]["application/json"]["schema"]


def assert_valid(spec: dict[str, Any], path: str, response: httpx.Response, method: str = "post"):
    """The response's status is one ai-runner documents for the route, and its body
    validates against the schema ai-runner gives for that status."""
    schema = response_schema(spec, path, response.status_code, method)
    problems = schema_errors(spec, schema, response.json())
    assert not problems, f"{path} {response.status_code}: {problems[:5]}"


def serve_app(app: str, log: Path) -> Iterator[str]:
    """An example Live Runner app (`kubepeer-app NAME`) on loopback, until the generator ends:
    yields its URL once its health path answers."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "kubepeer_runner.apps", app, "--host", "127.0.0.1",
         "--port", str(port)],
        stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert process.poll() is None, log.read_text()
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(healthy, timeout=60, what=f"kubepeer-app {app}")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


SDK_PYTHON = REPO / ".gateway-sdk" / "bin" / "python"  # the official SDK's venv (hack/setup)
SDK_APPS = REPO / "hack" / "live_runner_client.py"


def sdk_apps(*args: str) -> dict:
    """One run of the Live Runner client made with the official gateway SDK
    (hack/live_runner_client.py, in the SDK's own venv): its JSON report."""
    if not SDK_PYTHON.exists():
        pytest.fail("the gateway SDK's venv is missing: run `make setup`")
    done = subprocess.run([str(SDK_PYTHON), str(SDK_APPS), *args], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout)
    assert "error" not in report, report  # what the SDK raised
    return report
