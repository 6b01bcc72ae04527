"""The project installs as a package: `kubepeer` works from a clean environment with only
the base dependencies, and the control extra gives every control-plane command. Built and
installed with uv from uv.lock, offline (the uv cache `make setup` filled), outside the
checkout: nothing on PYTHONPATH.

And the guard for every offline step's inputs: a warm package cache on a CI machine once hid
that `make setup` never fetched the build backend, and a fresh machine could not build the
node agent's images (so neither `make demo` nor the agent's tests ran there)."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from kubepeer_dev.node_agent.images import build_image, build_wheel
from tests.conftest import CACHE, REPO, free_port
from tests.support import wait_for

# The interpreter the checkout's .venv was built on: uv.lock's markers resolve as for it.
PYTHON = str((REPO / ".venv" / "bin" / "python").resolve())


def _uv() -> Path:
    found = sorted(CACHE.glob("tools/uv-*/bin/uv"))
    if not found:
        pytest.skip(f"no uv under {CACHE}/tools: run `make setup`")
    return found[-1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built offline as the node agent's images build it."""
    return build_wheel(REPO, tmp_path_factory.mktemp("dist"), _uv(), CACHE / "uv-cache")


def _install(venv: Path, wheel: Path, *extras: str) -> Path:
    """What the Dockerfiles do: uv.lock's dependencies, then the project's wheel."""
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(Path.home()),
        "UV_CACHE_DIR": str(CACHE / "uv-cache"),
        "UV_PYTHON_DOWNLOADS": "never",
        "UV_PROJECT_ENVIRONMENT": str(venv),
    }
    extra_args = [arg for extra in extras for arg in ("--extra", extra)]
    uv = str(_uv())
    for argv in (
        [uv, "sync", "--offline", "--frozen", "--no-install-project", "-q",
         "--python", PYTHON, "--project", str(REPO), *extra_args],
        [uv, "pip", "install", "--offline", "--no-deps", "-q",
         "--python", str(venv / "bin" / "python"), str(wheel)],
    ):  # fmt: skip
        result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
    return venv / "bin"


def _run(bin_dir: Path, *argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(cwd)}  # no PYTHONPATH
    assert "PYTHONPATH" not in env
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_kubepeer_runs_with_only_the_base_dependencies(tmp_path, wheel):
    bin_dir = _install(tmp_path / "venv", wheel)
    python = bin_dir / "python"
    for heavy in ("redis", "kubernetes", "kopf", "web3", "fastapi", "torch"):
        found = _run(bin_dir, str(python), "-c", f"import {heavy}", cwd=tmp_path)
        assert found.returncode != 0, f"{heavy} is installed: not a base-only environment"
    helped = _run(bin_dir, "kubepeer", "--help", cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    for command in ("operator", "proxy", "payments", "crds", "rbac", "version"):
        assert command in helped.stdout
    version = _run(bin_dir, "kubepeer", "version", cwd=tmp_path)
    assert version.returncode == 0, version.stderr
    assert version.stdout.split() == ["kubepeer", _project_version()]
    crds = _run(bin_dir, "kubepeer", "crds", cwd=tmp_path)  # outside the checkout: crds/ only
    assert crds.returncode == 0, crds.stderr
    for path in (REPO / "crds").glob("*.yaml"):
        assert (tmp_path / "crds" / path.name).read_bytes() == path.read_bytes(), path.name
    assert not (tmp_path / "helm").exists()
    # A control-plane command says what is missing rather than pretending.
    proxy = _run(bin_dir, "kubepeer", "proxy", "--public-url", "https://x:1", "--namespace",
                 "n", "--redis-url", "redis://r", cwd=tmp_path)  # fmt: skip
    assert proxy.returncode != 0
    assert "ModuleNotFoundError" in proxy.stderr


def _project_version() -> str:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def test_the_control_extra_gives_every_control_plane_command(tmp_path, wheel):
    bin_dir = _install(tmp_path / "venv", wheel, "control")
    for command in ("operator", "proxy", "payments"):
        helped = _run(bin_dir, "kubepeer", command, "--help", cwd=tmp_path)
        assert helped.returncode == 0, helped.stderr
    code = (
        "import kubepeer.controller.main, kubepeer.proxy.main, kubepeer.payments.main;"
        "import kubepeer, sys; print(kubepeer.__file__)"
    )
    imported = _run(bin_dir, str(bin_dir / "python"), "-c", code, cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip().startswith(str(tmp_path / "venv"))  # the installed copy
    # The payments process refuses a bad configuration with its own message (it ran).
    refused = _run(bin_dir, "kubepeer", "payments", "--redis-url", "redis://127.0.0.1:1",
                   "--keystore", "k", "--password-file", "p", cwd=tmp_path)  # fmt: skip
    assert refused.returncode == 2
    assert "KUBEPEER_RPC_URL" in refused.stderr or "rpc" in refused.stderr.lower()
    assert os.path.exists(bin_dir / "kubepeer-runner")  # the runner's entry point is declared


def _serves(command: list[str], env: dict[str, str], cwd: Path, log: Path, url: str,
            answer: Callable[[dict], bool], timeout: float, what: str) -> None:  # fmt: skip
    """Start `command`, wait until GET `url` answers JSON that `answer` accepts, stop it."""
    with log.open("ab") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out,
                                   stderr=subprocess.STDOUT)  # fmt: skip
    try:

        def answered() -> bool:
            assert process.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    return answer(json.loads(r.read()))
            except OSError:
                return False

        wait_for(answered, timeout=timeout, what=what)
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_runner_extra_gives_a_serving_kubepeer_runner(tmp_path, wheel, tiny_models):
    bin_dir = _install(tmp_path / "venv", wheel, "runner")
    port = free_port()
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path),
           "PIPELINE": "text-to-image", "MODEL_ID": "kubepeer-tiny/stable-diffusion",
           "MODEL_DIR": str(tiny_models), "HOST": "127.0.0.1", "PORT": str(port)}  # fmt: skip
    log = tmp_path / "runner.log"
    _serves([str(bin_dir / "kubepeer-runner")], env, tmp_path, log,
            f"http://127.0.0.1:{port}/health", lambda body: body.get("status") == "OK",
            timeout=240, what="kubepeer-runner from a clean install to load")  # fmt: skip
    # The example Live Runner apps come with it (the LiveRunner samples run them).
    app_port = free_port()
    _serves([str(bin_dir / "kubepeer-app"), "hello-world", "--host", "127.0.0.1",
             "--port", str(app_port)], env, tmp_path, log, f"http://127.0.0.1:{app_port}/hi",
            lambda body: body.get("message") == "hello, world",
            timeout=60, what="kubepeer-app hello-world from a clean install")  # fmt: skip


def test_the_offline_builds_need_nothing_from_a_package_cache(tmp_path):
    """The node agent's local image (and the wheel above) built offline with an EMPTY uv
    cache: what they need must come from what `make setup` installed (the build backend is
    locked into .venv), never from whatever an earlier run left in a shared cache. uv's
    error names any package that is missing."""
    (tmp_path / "uv-cache").mkdir()
    try:
        bin_dir = build_image(REPO, tmp_path, _uv())
    except subprocess.CalledProcessError as failed:
        pytest.fail(f"an offline build needs a package make setup did not install:\n"
                    f"{failed.stderr.decode()}")  # fmt: skip
    version = _run(bin_dir, "kubepeer", "version", cwd=tmp_path)
    assert version.stdout.split() == ["kubepeer", _project_version()], version.stderr
