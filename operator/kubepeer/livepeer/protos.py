"""Generating net_pb2.py from net.proto, and checking the committed one is current."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

PROTO = Path(__file__).with_name("net.proto")
GENERATED = Path(__file__).with_name("net_pb2.py")


def generate() -> str:
    """The net_pb2.py that grpc_tools' protoc makes of net.proto now."""
    with tempfile.TemporaryDirectory() as out:
        subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO.parent}",
             f"--python_out={out}", PROTO.name],
            check=True,
        )  # fmt: skip
        return (Path(out) / "net_pb2.py").read_text()


def write() -> Path:
    GENERATED.write_text(generate())
    return GENERATED


def is_current() -> bool:
    return GENERATED.is_file() and GENERATED.read_text() == generate()
