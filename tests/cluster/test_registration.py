"""Kubepeer under an existing orchestrator (issue 27): the operator registers every Ready
replica of a LiveRunner with the orchestrator its `registerWith` names, by heartbeat.

The orchestrator is Kubepeer's own Live Runner registry (the proxy, with an orchestrator
secret): both sides follow live-runner-wire.md 2.3, and what is checked is what the
registry's discovery lists (`/apps/<runner id>/...` entries) and the LiveRunner's status.
kwok's pod IPs are registered as runner URLs and never dialled.
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from kubepeer.api import GROUP, VERSION
from tests.proxies import ProxyServer, models_json, start_proxy, stop_proxy
from tests.support import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.redis]

SECRET = "the-orchestrators-secret"
ALLOWED = "kubepeer-orchestrator"  # the Secret name the operator may read (its default)
REGISTRY_NS = "external-orchestrator"  # the registry's own keys in Redis


@pytest.fixture(scope="module")
def registry(redis_server, tmp_path_factory) -> Iterator[ProxyServer]:
    workdir = tmp_path_factory.mktemp("orchestrator")
    (workdir / "secret").write_text(SECRET)
    (workdir / "bearer").write_text("t")
    proxy = start_proxy(
        workdir, redis_server, models=models_json(extra=[], base=False), endpoints={},
        apps={"version": 1, "apps": []}, recipient=None, namespace=REGISTRY_NS, plaintext=True,
        args=["--no-payments", "--bearer-token-file", str(workdir / "bearer"),
              "--offchain-gateways", "--orch-secret-file", str(workdir / "secret")],
    )  # fmt: skip
    yield proxy
    stop_proxy(proxy)


def orchestrator_secret(api, namespace: str, value: str, name: str = ALLOWED) -> None:
    client.CoreV1Api(api).create_namespaced_secret(namespace, client.V1Secret(
        metadata=client.V1ObjectMeta(name=name),
        data={"orchSecret": base64.b64encode(value.encode()).decode()}))  # fmt: skip


def apply(crds, namespace: str, name: str, registry: ProxyServer, replicas: int,
          secret: str = ALLOWED) -> None:  # fmt: skip
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LiveRunner", "metadata": {"name": name},
            "spec": {"app": f"examples/{name}", "image": "example.invalid/app:v1",
                     "gpu": {"count": 0}, "replicas": replicas, "capacity": 2,
                     "warm": {"policy": "Always", "maxReplicas": 64},
                     "pricing": {"price": {"amount": "3.5", "currency": "USD", "unit": "hour"}},
                     "registerWith": [{"url": registry.url,
                                       "secretRef": {"name": secret}}]}}  # fmt: skip
    crds.kubectl("-n", namespace, "apply", "-f", "-", stdin=yaml.safe_dump(body))


def listed(registry: ProxyServer, namespace: str) -> dict[str, dict]:
    """The registry's runners of `namespace` (ids `<namespace>.<pod>`), by id."""
    with registry.http() as http:
        runners = http.get("/discovery").json()[0].get("runners", [])
    by_id = {r["url"].split("/apps/")[1].split("/")[0]: r for r in runners}
    return {rid: r for rid, r in by_id.items() if rid.startswith(f"{namespace}.")}


def registrations(api, namespace: str, name: str) -> list[dict]:
    body = client.CustomObjectsApi(api).get_namespaced_custom_object(
        GROUP, VERSION, namespace, "liverunners", name)  # fmt: skip
    return (body.get("status") or {}).get("registrations") or []


def test_ready_replicas_register_and_leave_when_scaled_away_or_deleted(
    operator, crds, api, namespace, registry
):
    orchestrator_secret(api, namespace, SECRET)
    apply(crds, namespace, "echo", registry, replicas=2)
    runners = wait_for(lambda: len(found := listed(registry, namespace)) == 2 and found,
                       timeout=90, what="two replicas registered")  # fmt: skip
    pods = client.CoreV1Api(api).list_namespaced_pod(namespace).items
    assert set(runners) == {f"{namespace}.{p.metadata.name}" for p in pods}
    for entry in runners.values():
        assert (entry["app"], entry["mode"], entry["capacity"]) == ("examples/echo",
                                                                     "persistent", 2)  # fmt: skip
    [status] = wait_for(lambda: (r := registrations(api, namespace, "echo"))
                        and r[0].get("registered") == 2 and r, timeout=30,
                        what="the status to count them")  # fmt: skip
    assert status["orchestrator"] == registry.url
    assert status["lastHeartbeat"]
    assert "lastError" not in status
    # Scaled away and deleted: unregistered at once, well inside the registry's 20 s TTL.
    crds.kubectl("-n", namespace, "scale", "liverunner", "echo", "--replicas", "1")
    start = time.monotonic()
    wait_for(lambda: len(listed(registry, namespace)) == 1, timeout=15, what="one unregistered")
    crds.kubectl("-n", namespace, "delete", "liverunner", "echo")
    wait_for(lambda: not listed(registry, namespace), timeout=15, what="the last unregistered")
    assert time.monotonic() - start < 20  # not by expiry


def test_a_lost_registration_is_registered_again(
    operator, crds, api, namespace, registry, redis_server
):
    orchestrator_secret(api, namespace, SECRET)
    apply(crds, namespace, "echo", registry, replicas=1)
    [runner_id] = wait_for(lambda: list(listed(registry, namespace)), timeout=90,
                           what="the replica registered")  # fmt: skip
    redis = redis_server.client()  # the orchestrator restarts: its registry is gone
    redis.delete(f"kubepeer:lr:{REGISTRY_NS}:runner:{runner_id}")
    redis.srem(f"kubepeer:lr:{REGISTRY_NS}:runners", runner_id)
    wait_for(lambda: runner_id not in listed(registry, namespace), timeout=10,
             what="the registry to forget it")  # fmt: skip
    wait_for(lambda: runner_id in listed(registry, namespace), timeout=30,
             what="the operator to register it again")  # fmt: skip


def test_a_wrong_or_unreadable_secret_is_reported_in_status(
    operator, crds, api, namespace, registry
):
    orchestrator_secret(api, namespace, "not-the-secret")
    orchestrator_secret(api, namespace, SECRET, name="some-other-secret")
    apply(crds, namespace, "wrong", registry, replicas=1)
    apply(crds, namespace, "unreadable", registry, replicas=1, secret="some-other-secret")
    [wrong] = wait_for(lambda: (r := registrations(api, namespace, "wrong"))
                       and r[0].get("lastError") and r, timeout=90,
                       what="the refusal in status")  # fmt: skip
    assert wrong["lastError"] == "401 invalid registration authorization"
    assert wrong["registered"] == 0
    [unreadable] = wait_for(lambda: (r := registrations(api, namespace, "unreadable"))
                            and r[0].get("lastError") and r, timeout=60,
                            what="the unreadable Secret in status")  # fmt: skip
    assert unreadable["lastError"] == "Secret some-other-secret key orchSecret cannot be read"
    assert not listed(registry, namespace)


def test_fifty_replicas_are_registered_and_kept_alive(operator, crds, api, namespace, registry):
    orchestrator_secret(api, namespace, SECRET)
    apply(crds, namespace, "fleet", registry, replicas=50)
    wait_for(lambda: len(listed(registry, namespace)) == 50, timeout=240, every=2,
             what="fifty replicas registered")  # fmt: skip
    cpu_before, started = cpu_seconds(operator.process.pid), time.monotonic()
    time.sleep(25)  # past the registry's 20 s TTL: only heartbeats keep them listed
    cpu = cpu_seconds(operator.process.pid) - cpu_before
    elapsed = time.monotonic() - started
    assert len(listed(registry, namespace)) == 50
    # Measured, not asserted (a benchmark's number): the operator's CPU while it keeps 50
    # replicas alive, one heartbeat each every 5 s.
    print(f"\noperator CPU keeping 50 replicas registered: {cpu / elapsed * 100:.1f}% of a "
          f"core ({cpu * 1e6 / (elapsed / 5 * 50):.0f} us per heartbeat)")  # fmt: skip
    crds.kubectl("-n", namespace, "delete", "liverunner", "fleet")
    wait_for(lambda: not listed(registry, namespace), timeout=60, what="all unregistered")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
