"""Images -> local commands: the one explicit table of what this node can run.

There are no image pulls: an image runs only if this table maps it to a command from
the checkout. An image it does not know leaves the container waiting with reason
ErrImagePull and a message naming the image, as a kubelet does when a pull fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LocalImage:
    entrypoint: tuple[str, ...]  # what the image's ENTRYPOINT would run
    env: tuple[tuple[str, str], ...] = ()  # what the image's ENV would set


def image_repository(image: str) -> str:
    """'registry.example/kubepeer-runner:v1' -> 'kubepeer-runner' (last path part, no tag)."""
    name = image.split("@", 1)[0].rsplit("/", 1)[-1]
    return name.split(":", 1)[0]


def image_table(repo: Path) -> dict[str, LocalImage]:
    """By repository name (the last path part of the image, any registry, any tag)."""
    venv_bin = repo / ".venv" / "bin"
    python = str(venv_bin / "python")
    path = f"{venv_bin}:/usr/local/bin:/usr/bin:/bin"
    return {
        # runner/Dockerfile: ENTRYPOINT python -m kubepeer_runner, code under runner/.
        "kubepeer-runner": LocalImage(
            (python, "-m", "kubepeer_runner"),
            (("PYTHONPATH", str(repo / "runner")), ("PATH", path)),
        ),
        # The control plane image: the `kubepeer` CLI.
        "kubepeer": LocalImage(
            (str(venv_bin / "kubepeer"),), (("PYTHONPATH", str(repo / "operator")), ("PATH", path))
        ),
        "redis": LocalImage(("redis-server",), (("PATH", path),)),
        # A plain Python image for tests that run their own `command`.
        "python": LocalImage((python,), (("PATH", path),)),
    }


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
