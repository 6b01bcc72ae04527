"""Images -> local commands: the one explicit table of what this node can run.

There are no image pulls: an image runs only if this table maps it to a command. An image
it does not know leaves the container waiting with reason ErrImagePull and a message naming
the image, as a kubelet does when a pull fails.

The kubepeer images run what their Dockerfiles install: the package built as a wheel
(`build_wheel`, then what `uv pip install` of it puts in the image) and its console
scripts `kubepeer` and `kubepeer-runner`, never the source tree on PYTHONPATH. The locked
dependencies come from the checkout's .venv (uv.lock, all extras) through a .pth file
naming the environment's real directory (hack/setup links .venv to a shared one in the
cache), never a path through the checkout: checkouts come and go, the image stays.
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

# What a wheel of the checkout is built from: a change here builds a new local image.
IMAGE_SOURCES = ("pyproject.toml", "operator/kubepeer", "runner/kubepeer_runner")
DEPS_PTH = "kubepeer-locked-deps.pth"  # in an image's site-packages: where its dependencies are


@dataclass(frozen=True)
class LocalImage:
    entrypoint: tuple[str, ...]  # what the image's ENTRYPOINT would run
    env: tuple[tuple[str, str], ...] = ()  # what the image's ENV would set


def image_repository(image: str) -> str:
    """'registry.example/kubepeer-runner:v1' -> 'kubepeer-runner' (last path part, no tag)."""
    name = image.split("@", 1)[0].rsplit("/", 1)[-1]
    return name.split(":", 1)[0]


def image_table(image_bin: Path) -> dict[str, LocalImage]:
    """By repository name (the last path part of the image, any registry, any tag);
    `image_bin` is the bin/ of the environment `build_image` made."""
    python = str(image_bin / "python")
    path = f"{image_bin}:/usr/local/bin:/usr/bin:/bin"
    return {
        # runner/Dockerfile: ENTRYPOINT kubepeer-runner.
        "kubepeer-runner": LocalImage((str(image_bin / "kubepeer-runner"),), (("PATH", path),)),
        # operator/Dockerfile (the control plane): ENTRYPOINT kubepeer.
        "kubepeer": LocalImage((str(image_bin / "kubepeer"),), (("PATH", path),)),
        # The redis image's entrypoint takes redis-server's own options.
        "redis": LocalImage(("redis-server",), (("PATH", path),)),
        # A plain Python image for tests that run their own `command`.
        "python": LocalImage((python,), (("PATH", path),)),
    }


def source_key(repo: Path) -> str:
    """A hash of every file the wheel is built from, and of the .venv it layers on."""
    digest = hashlib.sha256(str((repo / ".venv").resolve()).encode())
    for source in IMAGE_SOURCES:
        root = repo / source
        files = sorted(root.rglob("*")) if root.is_dir() else [root]
        for file in files:
            if file.is_file() and "__pycache__" not in file.parts:
                digest.update(str(file.relative_to(repo)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:16]


def build_image(repo: Path, cache: Path, uv: Path) -> Path:
    """The checkout installed as the images install it, in cache/images/<source key>;
    returns its bin/. Built once per source (under a lock: agents may start together)."""
    root = cache / "images" / source_key(repo)
    root.parent.mkdir(parents=True, exist_ok=True)
    with (root.parent / f"{root.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / ".complete").is_file() and _deps_present(root):
            return root / "bin"
        # A build that died half way, or one whose dependencies have since gone.
        shutil.rmtree(root, ignore_errors=True)
        venv_python = repo / ".venv" / "bin" / "python"
        offline = {"UV_CACHE_DIR": str(cache / "uv-cache"), "UV_PYTHON_DOWNLOADS": "never"}
        run = {"check": True, "capture_output": True, "env": {"PATH": "/usr/bin:/bin", **offline}}
        subprocess.run([str(uv), "venv", "-q", "--python", str(venv_python), str(root)], **run)
        deps = Path(_site_packages(venv_python)).resolve()
        (_purelib(root) / DEPS_PTH).write_text(f"{deps}\n")
        with tempfile.TemporaryDirectory(dir=root.parent) as dist:
            wheel = build_wheel(repo, Path(dist), uv, cache / "uv-cache")
            subprocess.run(
                [str(uv), "pip", "install", "-q", "--offline", "--no-deps",
                 "--python", str(root / "bin" / "python"), str(wheel)],
                **run,
            )  # fmt: skip
        (root / ".complete").touch()
    return root / "bin"


def build_wheel(repo: Path, out_dir: Path, uv: Path, uv_cache: Path) -> Path:
    """The checkout's wheel, built offline by the build backend in its .venv (hatchling is
    locked in uv.lock, so `make setup` installs it): no build isolation, so nothing is
    resolved from a package cache that a fresh machine's would lack."""
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {"PATH": "/usr/bin:/bin", "UV_CACHE_DIR": str(uv_cache), "UV_PYTHON_DOWNLOADS": "never"}
    subprocess.run(
        [str(uv), "build", "-q", "--wheel", "--offline", "--no-build-isolation",
         "--python", str(repo / ".venv" / "bin" / "python"), "--out-dir", str(out_dir),
         str(repo)],
        check=True, capture_output=True, env=env,
    )  # fmt: skip
    (wheel,) = out_dir.glob("kubepeer-*.whl")
    return wheel


def _purelib(root: Path) -> Path:
    return Path(_site_packages(root / "bin" / "python"))


def _deps_present(root: Path) -> bool:
    """Whether the dependencies a built image layers on are still where its .pth says."""
    pths = list(root.glob(f"lib/python*/site-packages/{DEPS_PTH}"))
    return len(pths) == 1 and Path(pths[0].read_text().strip()).is_dir()


def _site_packages(python: Path) -> str:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    out = subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def command_for(
    table: dict[str, LocalImage], image: str, command: list[str] | None, args: list[str] | None
) -> tuple[list[str], dict[str, str]] | None:
    """argv and image env, with Kubernetes' command/args override rules; None: unmapped."""
    local = table.get(image_repository(image))
    if local is None:
        return None
    argv = list(command) if command else list(local.entrypoint)
    if args is not None:
        argv += list(args)
    return argv, dict(local.env)
