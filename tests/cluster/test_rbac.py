"""The operator works under its own least-privilege ClusterRole, and nothing more."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from kubepeer.controller.rbac import operator_rbac
from kubepeer.controller.settings import OperatorSettings
from tests.conftest import REPO
from tests.support import wait_for

pytestmark = pytest.mark.cluster


@pytest.fixture
def operator_kubeconfig(crds, api, namespace, tmp_path) -> Path:
    """A kubeconfig that authenticates as the operator's ServiceAccount."""
    for manifest in operator_rbac(OperatorSettings(namespaces=[namespace]), namespace):
        crds.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(manifest))
    return crds.kubeconfig_for(
        api, namespace, "kubepeer-operator", tmp_path / "operator.kubeconfig"
    )


@pytest.fixture
def restricted_operator(operator_kubeconfig, namespace, tmp_path) -> Iterator[Path]:
    log = tmp_path / "operator.log"
    env = {
        **os.environ,
        "KUBECONFIG": str(operator_kubeconfig),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "kubepeer.cli", "operator", "--namespace", namespace,
         "--status-interval", "0.5"],
        env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    yield log
    process.terminate()
    process.wait(timeout=20)


def test_operator_runs_a_model_with_only_its_own_rbac(crds, namespace, restricted_operator):
    crds.kubectl("-n", namespace, "apply", "-f", str(REPO / "manifests" / "pricing.yaml"))
    crds.kubectl("-n", namespace, "apply", "-f", "-", stdin=yaml.safe_dump({
        "apiVersion": "kubepeer.io/v1alpha1", "kind": "AIModel", "metadata": {"name": "m"},
        "spec": {"pipeline": "text-to-image", "modelId": "org/m", "pricing": {"ref": "default"}},
    }))  # fmt: skip

    def phase() -> str | None:
        out = crds.kubectl("-n", namespace, "get", "aimodel", "m", "-o", "jsonpath={.status.phase}")
        return out.stdout == "Ready" and out.stdout

    try:
        wait_for(phase, timeout=60, what="the model to be Ready under the operator's own RBAC")
    except AssertionError as exc:
        state = "\n".join(
            crds.kubectl(*args, check=False).stdout
            for args in (
                ("-n", namespace, "get", "aimodel", "m", "-o", "yaml"),
                ("get", "pods", "-A", "-o", "wide"),
                ("-n", namespace, "get", "events", "--sort-by=.lastTimestamp"),
            )
        )
        log = restricted_operator.read_text()
        raise AssertionError(f"{exc}\noperator log:\n{log}\ncluster:\n{state}") from None
    tables = crds.kubectl("-n", namespace, "get", "configmap", "-l", "kubepeer.io/table=model")
    assert "kubepeer-model-m" in tables.stdout
    log = restricted_operator.read_text()
    assert "forbidden" not in log.lower(), log
    # It made the runner itself: no other operator is watching this namespace.
    assert f"created runner {namespace}/runner-m for m" in log, log


def test_operator_role_cannot_read_other_secrets(crds, api, namespace, operator_kubeconfig):
    client.CoreV1Api(api).create_namespaced_secret(
        namespace, {"metadata": {"name": "wallet"}, "stringData": {"key": "s3cret"}}
    )
    as_operator = ["--kubeconfig", str(operator_kubeconfig), "-n", namespace]
    denied = subprocess.run(
        [str(crds.bin_dir / "kubectl"), *as_operator, "get", "secret", "wallet"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert denied.returncode != 0
    assert "forbidden" in denied.stderr


def test_namespaced_operator_is_granted_only_its_namespace(
    crds, api, namespace, operator_kubeconfig
):
    other = f"{namespace}-other"[:63]
    client.CoreV1Api(api).create_namespace({"metadata": {"name": other}})

    def can(*args: str) -> bool:
        result = subprocess.run(
            [str(crds.bin_dir / "kubectl"), "--kubeconfig", str(operator_kubeconfig),
             "auth", "can-i", *args],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        return result.stdout.strip() == "yes"

    try:
        assert can("create", "deployments", "-n", namespace)
        assert can("update", "aimodels.kubepeer.io", "--subresource=finalizers", "-n", namespace)
        assert can("watch", "pods", "-n", namespace)
        assert can("create", "secrets", "-n", namespace)
        # Nothing in a namespace it does not watch, nor cluster-wide.
        assert not can("create", "deployments", "-n", other)
        assert not can("create", "secrets", "-n", other)
        assert not can("create", "secrets", "-n", "kube-system")
        assert not can("list", "pods", "--all-namespaces")
        # It never reads a Secret, not even the runners' auth Secret.
        assert not can("get", "secrets/kubepeer-runner-auth", "-n", namespace)
        assert not can("get", "secrets", "-n", namespace)
        assert can("create", "priorityclasses.scheduling.k8s.io")
    finally:
        client.CoreV1Api(api).delete_namespace(other)
