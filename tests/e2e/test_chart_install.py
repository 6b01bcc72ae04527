"""The chart installed the way users install it, into the real control plane, its pods run
by the node agent as the images' entry points: each component under its own
ServiceAccount with nothing forbidden in its logs, least privilege checked with
`kubectl auth can-i`, an upgrade that rolls only what changed, and an uninstall that
leaves only what README says to delete by hand.

The chain is the dev node (loopback), relayed to the agent node's host address so that the
payments pod, in its own network namespace, reaches it as it would reach an RPC provider.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from eth_account import Account

from tests.conftest import Cluster, NodeAgent
from tests.e2e.charts import CHART, helm, sets
from tests.support import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.agent, pytest.mark.chain]

ETH = 10**18
# A refusal as the API server's clients report it (not any "403" in a timestamp).
FORBIDDEN = re.compile(r"Forbidden|\b(?:status|code)\W{0,3}403\b|\(403\)")
PASSWORD = "chart test password"
COMPONENTS = {"operator": "Deployment", "proxy": "Deployment", "payments": "Deployment",
              "redis": "StatefulSet"}  # fmt: skip


@dataclass
class Release:
    namespace: str
    cluster: Cluster
    agent: NodeAgent
    values: dict[str, str]
    install_output: str
    address: str

    def helm(self, *args: str, check: bool = True):
        return helm(*args, "--namespace", self.namespace, check=check,
                    kubeconfig=self.cluster.kubeconfig)  # fmt: skip

    def kubectl(self, *args: str, check: bool = True) -> str:
        return self.cluster.kubectl("-n", self.namespace, *args, check=check).stdout

    def get(self, *args: str) -> dict:
        return json.loads(self.kubectl("get", *args, "-o", "json"))

    def pods(self, component: str) -> list[dict]:
        selector = f"app.kubernetes.io/name=kubepeer-{component}"
        return self.get("pods", "-l", selector)["items"]


def _relay(host: str, upstream_port: int) -> tuple[socket.socket, int]:
    """A TCP relay on `host` (the agent node's host address) to the loopback dev chain."""
    listener = socket.create_server((host, 0))

    def pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass  # the other direction closed both
        finally:
            src.close()
            dst.close()

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(("127.0.0.1", upstream_port))
            threading.Thread(target=pipe, args=(conn, upstream), daemon=True).start()
            threading.Thread(target=pipe, args=(upstream, conn), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return listener, listener.getsockname()[1]


def _redis_volume(cluster: Cluster, namespace: str, path: Path) -> str:
    """The admin's part on a cluster without a provisioner: a hostPath PV for the ledger's
    claim (data-kubepeer-redis-0)."""
    name = f"kubepeer-redis-{namespace}"
    pv = {
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name},
        "spec": {"capacity": {"storage": "2Gi"}, "accessModes": ["ReadWriteOnce"],
                 "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": str(path)},
                 "claimRef": {"namespace": namespace, "name": "data-kubepeer-redis-0"}},
    }  # fmt: skip
    cluster.kubectl("apply", "-f", "-", stdin=json.dumps(pv))
    return name


@pytest.fixture(scope="module")
def release(cluster, node_agent, chain, tmp_path_factory) -> Iterator[Release]:
    work = tmp_path_factory.mktemp("chart")
    namespace = f"kubepeer-{uuid.uuid4().hex[:6]}"
    net = json.loads((node_agent.state_dir / "node-net.json").read_text())
    listener, port = _relay(net["host_ip"], int(chain.url.rsplit(":", 1)[1]))
    account = chain.new_account(10 * ETH)
    chain.set_active(account.address)
    keystore = work / "keystore.json"
    keystore.write_text(json.dumps(Account.encrypt(account.key, PASSWORD)))
    (work / "redis").mkdir()
    volume = _redis_volume(cluster, namespace, work / "redis")
    values = {
        "images.kubepeer.repository": "local.test/kubepeer",
        "images.kubepeer.tag": "dev",
        "images.runner.repository": "local.test/kubepeer-runner",
        "images.redis.repository": "local.test/redis",
        "nodeSelector.kubernetes\\.io/hostname": node_agent.node,
        "tolerations[0].key": node_agent.toleration()["key"],
        "tolerations[0].operator": "Exists",
        "tolerations[0].effect": "NoSchedule",
        "operator.watchNamespaces[0]": namespace,
        "proxy.replicas": "1",
        "proxy.publicUrl": f"https://kubepeer-proxy.{namespace}.svc.cluster.local:8935",
        "proxy.recipient": account.address,
        "payments.replicas": "1",
        "payments.network": "dev",
        "payments.controller": chain.controller.address,
        "secrets.rpcUrl.value": f"http://{net['host_ip']}:{port}/?key=SECRET-RPC-KEY",
        "secrets.keystore.password": PASSWORD,
    }
    keystore_arg = ["--set-file", f"secrets.keystore.keystore={keystore}"]
    installed = helm(
        "install", "kubepeer", str(CHART), "--namespace", namespace, "--create-namespace",
        *sets(values), *keystore_arg, "--wait", "--timeout", "6m",
        kubeconfig=cluster.kubeconfig, check=False,
    )  # fmt: skip
    found = Release(namespace, cluster, node_agent, values, installed.stdout, account.address)
    try:
        assert installed.returncode == 0, installed.stderr + _diagnose(found)
        yield found
    finally:
        found.helm("uninstall", "kubepeer", "--wait", check=False)
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        cluster.kubectl("delete", "pv", volume, "--wait=false", check=False)
        listener.close()


def _diagnose(release: Release) -> str:
    pods = release.kubectl("get", "pods", "-o", "wide", check=False)
    logs = []
    for pod in release.get("pods")["items"]:
        for container in pod["spec"]["containers"]:
            try:
                path = release.agent.log_file(release.namespace, pod["metadata"]["name"],
                                              container["name"])  # fmt: skip
                logs.append(f"--- {pod['metadata']['name']}\n{path.read_text()[-3000:]}")
            except (KeyError, FileNotFoundError):
                pass
    return "\n" + pods + "\n".join(logs)


def _log(release: Release, pod: dict) -> str:
    name = pod["metadata"]["name"]
    container = pod["spec"]["containers"][0]["name"]
    return release.agent.log_file(release.namespace, name, container).read_text()


def test_every_component_runs_under_its_own_account_and_is_never_forbidden(release):
    for component, kind in COMPONENTS.items():
        (pod,) = release.pods(component)
        assert pod["spec"]["nodeName"] == release.agent.node  # a process here, not kwok's
        assert pod["status"]["phase"] == "Running", component
        assert pod["spec"]["serviceAccountName"] == f"kubepeer-{component}"
        owner = pod["metadata"]["ownerReferences"][0]["kind"]
        assert owner == ("StatefulSet" if kind == "StatefulSet" else "ReplicaSet")
    # Each did what needs its grants: the redeemer holds its Lease, the operator made its
    # peering object, the proxy listed its tables and endpoints (it is Ready only then).
    lease = release.get("lease", f"kubepeer-redeemer-{release.address.lower()}")
    (payments,) = release.pods("payments")  # the one replica: the holder (named by its host)
    assert lease["spec"]["holderIdentity"]
    assert lease["spec"]["renewTime"]
    wait_for(lambda: release.kubectl("get", "kopfpeerings", "-o", "name", check=False).strip(),
             timeout=60, what="the operator's peering object")  # fmt: skip
    (proxy,) = release.pods("proxy")
    ready = {c["type"]: c["status"] for c in proxy["status"]["conditions"]}
    assert ready["Ready"] == "True"
    for component in COMPONENTS:
        (pod,) = release.pods(component)
        log = _log(release, pod)
        assert not FORBIDDEN.search(log), f"{component}: {log[-3000:]}"
        assert "SECRET-RPC-KEY" not in log, component  # the RPC URL's credentials, redacted
    assert "redeeming as" in _log(release, payments)  # it reached the chain through the Secret


def test_least_privilege_as_kubectl_auth_can_i_sees_it(release):
    ns = release.namespace

    def can(account: str, verb: str, resource: str) -> bool:
        who = f"--as=system:serviceaccount:{ns}:{account}"
        result = release.kubectl("auth", "can-i", verb, resource, who, check=False)
        return result.strip() == "yes"

    assert not can("kubepeer-proxy", "create", "deployments")
    assert not can("kubepeer-proxy", "patch", "deployments")
    assert not can("kubepeer-proxy", "get", "secrets")
    assert can("kubepeer-proxy", "patch", "aimodels.kubepeer.io")  # waking a model: granted
    # Runner pods run as the namespace's default account, with no token mounted.
    assert not can("default", "get", "secrets")
    assert not can("default", "list", "secrets")
    assert not can("kubepeer-operator", "get", "secrets")  # create only: never reads one
    assert can("kubepeer-operator", "create", "deployments")
    assert not can("kubepeer-payments", "get", "secrets")
    assert not can("kubepeer-payments", "delete", "leases.coordination.k8s.io")
    assert not can("kubepeer-redis", "get", "configmaps")


def test_notes_tell_what_to_do_next_and_print_no_secret(release):
    notes = release.install_output
    assert release.values["proxy.publicUrl"] in notes
    assert "setServiceURI" in notes
    assert "kubectl get aimodels" in notes
    for secret in ("SECRET-RPC-KEY", PASSWORD):
        assert secret not in notes
    manifest = release.helm("get", "notes", "kubepeer").stdout
    assert PASSWORD not in manifest


def _generations(release: Release) -> dict[str, int]:
    return {
        component: release.get(kind.lower(), f"kubepeer-{component}")["metadata"]["generation"]
        for component, kind in COMPONENTS.items()
    }


def _secret(release: Release, name: str) -> dict[str, str]:
    return release.get("secret", name)["data"]


def test_an_upgrade_rolls_only_what_its_values_change(release):
    before = _generations(release)
    secrets_before = (_secret(release, "kubepeer-proxy-secrets"),
                      _secret(release, "kubepeer-runner-auth"))  # fmt: skip
    (old_proxy,) = release.pods("proxy")
    upgraded = release.helm("upgrade", "kubepeer", str(CHART), "--reuse-values",
                            "--set", "proxy.maxQueue=16", "--wait", "--timeout", "5m",
                            check=False)  # fmt: skip
    assert upgraded.returncode == 0, upgraded.stderr + _diagnose(release)
    after = _generations(release)
    assert after["proxy"] == before["proxy"] + 1
    assert {k: v for k, v in after.items() if k != "proxy"} == {
        k: v for k, v in before.items() if k != "proxy"
    }

    def replaced() -> dict | None:  # the old pod gone (it drains for up to its grace period)
        pods = release.pods("proxy")
        names = [p["metadata"]["name"] for p in pods]
        return pods[0] if len(pods) == 1 and names != [old_proxy["metadata"]["name"]] else None

    new_proxy = wait_for(replaced, timeout=180, what="the proxy pod replaced")
    assert "--max-queue=16" in new_proxy["spec"]["containers"][0]["args"]
    # Generated secrets are kept: the recipientRand secret and the runners' token survive.
    assert (_secret(release, "kubepeer-proxy-secrets"),
            _secret(release, "kubepeer-runner-auth")) == secrets_before  # fmt: skip
    token = base64.b64decode(secrets_before[0]["recipient-secret"])
    assert len(bytes.fromhex(token.decode())) == 32


def test_uninstall_leaves_only_the_ledgers_claim_and_the_crds(release):
    ns = release.namespace
    model = {
        "apiVersion": "kubepeer.io/v1alpha1", "kind": "AIModel",
        "metadata": {"name": "leftover", "namespace": ns},
        "spec": {"pipeline": "text-to-image", "modelId": "kubepeer-tiny/stable-diffusion",
                 "warm": {"policy": "OnDemand"}, "pricing": {"price": {"pricePerUnit": "1"}}},
    }  # fmt: skip
    release.cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(model))
    wait_for(lambda: release.kubectl("get", "configmaps", "-l", "kubepeer.io/table=model",
                                     "-o", "name").strip(),
             timeout=120, what="the chart's operator to write the model's table row")  # fmt: skip
    removed = release.helm("uninstall", "kubepeer", "--wait", "--timeout", "3m", check=False)
    assert removed.returncode == 0, removed.stderr
    wait_for(lambda: not release.get("pods")["items"], timeout=120, what="every pod gone")
    for kind in ("deployments", "statefulsets", "services", "roles", "rolebindings",
                 "serviceaccounts", "networkpolicies", "poddisruptionbudgets"):  # fmt: skip
        names = release.kubectl("get", kind, "-l", "app.kubernetes.io/part-of=kubepeer",
                                "-o", "name").split()  # fmt: skip
        assert [n for n in names if "runner-" not in n] == [], kind
    charted = release.kubectl("get", "secrets", "-o", "name").split()
    assert not {f"secret/kubepeer-{n}" for n in ("proxy-secrets", "rpc", "keystore")} & set(charted)
    gone = release.cluster.kubectl("get", "clusterrole", f"kubepeer-operator-{ns}", check=False)
    assert gone.returncode != 0
    # What README says stays: the ledger's claim (data) and the CRDs with their objects.
    assert release.get("pvc", "data-kubepeer-redis-0")["status"]["phase"] == "Bound"
    release.cluster.kubectl("get", "crd", "aimodels.kubepeer.io")
    # No finalizer holds an AIModel once the operator is gone: it deletes at once.
    release.kubectl("delete", "aimodel", "leftover", "--timeout=30s")
    assert release.kubectl("get", "aimodels", "-o", "name").strip() == ""
