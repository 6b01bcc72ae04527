"""Helpers for the chart's tests: helm as the user runs it, on the chart in the checkout."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.conftest import REPO

CHART = REPO / "helm" / "kubepeer"
RECIPIENT = "0x1111111111111111111111111111111111111111"
# The least a payments-on install needs.
REQUIRED_VALUES = {
    "proxy.publicUrl": "https://orchestrator.example.com:8935",
    "proxy.recipient": RECIPIENT,
    "secrets.rpcUrl.value": "https://arb1.example/rpc/SECRET-API-KEY",
    "secrets.keystore.keystore": "SECRET-KEYSTORE",
    "secrets.keystore.password": "SECRET-PASSWORD",
}


def sets(values: dict[str, str]) -> list[str]:
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


REQUIRED = sets(REQUIRED_VALUES)


def helm_binary() -> Path:
    bin_dir = subprocess.run(
        [str(REPO / "hack" / "cluster"), "bin"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return Path(bin_dir) / "helm"


def helm(
    *args: str, check: bool = True, kubeconfig: Path | None = None
) -> subprocess.CompletedProcess[str]:
    config = ["--kubeconfig", str(kubeconfig)] if kubeconfig else []
    return subprocess.run(
        [str(helm_binary()), *config, *args], capture_output=True, text=True, check=check,
        timeout=900,
    )  # fmt: skip


def render(*args: str, namespace: str = "kubepeer-system") -> list[dict]:
    """`helm template` of the chart: its objects (CRDs not included)."""
    out = helm("template", "kubepeer", str(CHART), "--namespace", namespace, *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def find(objects: list[dict], kind: str, name: str, namespace: str | None = None) -> dict:
    matches = [
        o for o in objects
        if o["kind"] == kind and o["metadata"]["name"] == name
        and (namespace is None or o["metadata"].get("namespace") == namespace)
    ]  # fmt: skip
    assert len(matches) == 1, f"{kind}/{name} in {namespace}: {len(matches)} found"
    return matches[0]
