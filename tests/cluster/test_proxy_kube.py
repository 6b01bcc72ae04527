"""The proxy against the real control plane: the EndpointSlice watch and waking OnDemand models.

Safety: kwok pod IPs are read, never dialled. Traffic goes only to runner processes on
loopback, which the proxy is given through its static endpoint file (the API server refuses
loopback addresses in EndpointSlices).
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import yaml
from kubernetes import client

from kubepeer.api import GROUP, VERSION
from kubepeer.contracts.demand import read_demand
from kubepeer.contracts.earnings import read_hours
from kubepeer.contracts.labels import WOKEN_AT
from kubepeer.proxy.endpoints import endpoint_slice_watch
from kubepeer_dev.gateway_sim import Gateway
from tests.conftest import free_port
from tests.proxies import (
    SD,
    FreshChainView,
    RunnerProcess,
    models_json,
    start_proxy,
    start_runner,
    stop,
    stop_proxy,
)
from tests.support import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.redis]
T2I = {"prompt": "a cat", "height": 32, "width": 32, "num_inference_steps": 1, "model_id": SD}


class Watched:
    """EndpointSliceWatch's callbacks as a queue of tables."""

    def __init__(self, api, namespace: str) -> None:
        self.tables: queue.Queue[dict[str, tuple[str, ...]]] = queue.Queue()
        self.watch = endpoint_slice_watch(api, namespace, self.tables.put)

    def next_where(self, check, timeout: float = 30) -> dict[str, tuple[str, ...]]:
        deadline = time.monotonic() + timeout
        while True:
            table = self.tables.get(timeout=max(0.01, deadline - time.monotonic()))
            if check(table):
                return table


@pytest.fixture
def watched(api, namespace) -> Iterator[Watched]:
    watched = Watched(api, namespace)
    watched.watch.start()
    yield watched
    watched.watch.stop()


def runner_slice(name: str, ready: bool | None) -> dict:
    conditions = {} if ready is None else {"ready": ready}
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": {
            "kubernetes.io/service-name": "runner-manual", "kubepeer.io/runner": "runner-manual",
            "endpointslice.kubernetes.io/managed-by": "test.kubepeer.io"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.250.0.7"], "conditions": conditions}],
    }  # fmt: skip


def test_the_watch_follows_a_slice_turning_ready_unready_and_gone(api, namespace, watched):
    discovery = client.DiscoveryV1Api(api)
    watched.next_where(lambda t: t == {})  # the first list: nothing yet
    discovery.create_namespaced_endpoint_slice(namespace, runner_slice("manual-a", True))
    started = time.monotonic()
    table = watched.next_where(lambda t: t.get("runner-manual"))
    assert table["runner-manual"] == ("http://10.250.0.7:8000",)
    print(f"ready endpoint seen {time.monotonic() - started:.3f} s after the create call")
    discovery.replace_namespaced_endpoint_slice(
        "manual-a", namespace, runner_slice("manual-a", False)
    )
    assert watched.next_where(lambda t: t.get("runner-manual") == ())["runner-manual"] == ()
    discovery.replace_namespaced_endpoint_slice(
        "manual-a", namespace, runner_slice("manual-a", None)
    )
    watched.next_where(lambda t: t.get("runner-manual"))
    discovery.delete_namespaced_endpoint_slice("manual-a", namespace)
    watched.next_where(lambda t: "runner-manual" not in t)


def test_the_watch_sees_an_operator_runner_pod_become_an_endpoint(
    operator, crds, api, namespace, watched
):
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "AIModel", "metadata": {"name": "sd"},
            "spec": {"pipeline": "text-to-image", "modelId": "org/tiny",
                     "gpu": {"count": 1}, "warm": {"policy": "Always"}}}  # fmt: skip
    crds.kubectl("-n", namespace, "apply", "-f", "-", stdin=yaml.safe_dump(body))
    table = watched.next_where(lambda t: t.get("runner-sd"), timeout=90)
    [pod] = (
        client.CoreV1Api(api)
        .list_namespaced_pod(namespace, label_selector="kubepeer.io/runner=runner-sd")
        .items
    )
    assert table["runner-sd"] == (f"http://{pod.status.pod_ip}:8000",)  # read, never dialled
    crds.kubectl("-n", namespace, "delete", "aimodel", "sd")
    watched.next_where(lambda t: not t.get("runner-sd"), timeout=90)


def test_the_proxy_offers_what_the_operators_table_configmaps_say(
    operator, crds, namespace, redis_server, tmp_path
):
    """The contract with the operator: its per-AIModel ConfigMaps, watched, priced as it says."""
    view = FreshChainView(redis_server.client())
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "AIModel", "metadata": {"name": "sd"},
            "spec": {"pipeline": "text-to-image", "modelId": SD, "gpu": {"count": 1},
                     "warm": {"policy": "Always"},
                     "pricing": {"price": {"pricePerUnit": "3", "currency": "wei"}}}}  # fmt: skip
    crds.kubectl("-n", namespace, "apply", "-f", "-", stdin=yaml.safe_dump(body))
    # Quoted exactly as configured: AutoAdjustPrice is off (tests/proxy check it on).
    proxy = start_proxy(tmp_path, redis_server, models=None, endpoints={}, namespace=namespace,
                        kubeconfig=crds.kubeconfig, args=["--no-auto-adjust-price"])  # fmt: skip
    try:
        info = wait_for(
            lambda: (i := Gateway().discover(proxy, 27, SD)).price_info.price_per_unit and i,
            timeout=60, what="the model in discovery",
        )  # fmt: skip
        assert (info.price_info.price_per_unit, info.price_info.pixels_per_unit) == (3, 1)
        assert SD in info.capabilities.constraints.per_capability[27].models
        crds.kubectl("-n", namespace, "delete", "aimodel", "sd")
        wait_for(lambda: SD not in Gateway().discover(proxy, 27, SD).capabilities.constraints
                 .per_capability[27].models, timeout=60, what="the model to go")  # fmt: skip
    finally:
        stop_proxy(proxy)
        view.stop.set()


# -- waking an OnDemand model ------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd_runner(tiny_models, tmp_path_factory) -> Iterator[RunnerProcess]:
    env = {"PIPELINE": "text-to-image", "MODEL_ID": SD, "MODEL_DIR": str(tiny_models)}
    runner = start_runner(env, tmp_path_factory.mktemp("sd") / "runner.log")
    yield runner
    stop(runner)


def on_demand(crds, namespace: str, name: str) -> dict:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "AIModel", "metadata": {"name": name},
            "spec": {"pipeline": "text-to-image", "modelId": SD, "gpu": {"count": 1},
                     "warm": {"policy": "OnDemand", "maxReplicas": 1},
                     "pricing": {"price": {"pricePerUnit": "1", "currency": "wei"}}}}  # fmt: skip
    crds.kubectl("-n", namespace, "apply", "-f", "-", stdin=yaml.safe_dump(body))
    return body


def cold_models(name: str) -> dict:
    return models_json(extra=[{"aimodel": name, "pipeline": "text-to-image", "model_id": SD,
                               "runner": f"runner-{name}", "warm": "OnDemand"}],
                       base=False)  # fmt: skip


def private(tmp_path) -> list[str]:
    (tmp_path / "bearer").write_text("t")
    return ["--no-payments", "--bearer-token-file", str(tmp_path / "bearer"), "--demand-ttl", "3"]


def test_jobs_for_a_cold_model_wake_it_once_and_are_served_in_arrival_order(
    crds, api, namespace, redis_server, sd_runner, tmp_path
):
    on_demand(crds, namespace, "cold")
    custom = client.CustomObjectsApi(api)

    def aimodel():
        return custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "aimodels", "cold")

    generation = aimodel()["metadata"]["generation"]
    metrics_port = free_port()
    proxy = start_proxy(tmp_path, redis_server, models=cold_models("cold"), endpoints={},
                        namespace=namespace, kubeconfig=crds.kubeconfig,
                        args=[*private(tmp_path), "--metrics-port", str(metrics_port)])  # fmt: skip
    finished: list[tuple[int, int]] = []
    try:

        def job(i: int) -> None:
            with proxy.http(headers={"Authorization": "Bearer t"}) as http:
                response = http.post("/text-to-image", json={**T2I, "seed": i})
            finished.append((i, response.status_code))

        threads = []
        redis = redis_server.client()
        for i in range(8):  # each sent once the one before has arrived (is counted as demand)
            threads.append(threading.Thread(target=job, args=(i,)))
            threads[-1].start()
            wait_for(lambda n=i + 1: read_demand(redis, namespace, "cold").in_flight == n,
                     timeout=30, every=0.01, what=f"job {i} to arrive")  # fmt: skip
        wait_for(lambda: aimodel()["spec"].get("replicas") == 1, timeout=30, what="a wake-up")
        assert read_demand(redis, namespace, "cold").in_flight == 8  # held jobs are demand
        time.sleep(0.5)  # every job is held; none went anywhere
        assert finished == []
        assert aimodel()["metadata"]["generation"] == generation + 1  # exactly one scale-up
        assert WOKEN_AT in aimodel()["metadata"]["annotations"]
        proxy.set_endpoints({"runner-cold": [sd_runner.url]})  # the replica turned ready
        for thread in threads:
            thread.join(timeout=120)
        assert finished == [(i, 200) for i in range(8)]
        assert aimodel()["metadata"]["generation"] == generation + 1
        demand = read_demand(redis_server.client(), namespace, "cold")
        assert demand.in_flight == 0
        assert demand.last_request > time.time() - 60
        # Each waited on the cold start: in its earnings records (private: no fee) and metrics.
        hours = wait_for(lambda: (h := read_hours(redis, namespace, "cold"))
                         and sum(r.jobs for r in h.values()) == 8 and h, timeout=10,
                         what="eight jobs in the earnings records")  # fmt: skip
        assert sum(r.cold_waits for r in hours.values()) == 8
        assert sum(r.earned_wei + r.refused for r in hours.values()) == 0
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        assert 'kubepeer_proxy_cold_jobs_total{model="cold"} 8.0' in metrics
    finally:
        stop_proxy(proxy)


def test_a_proxy_killed_mid_hold_leaves_no_demand_behind(crds, namespace, redis_server, tmp_path):
    on_demand(crds, namespace, "sleepy")
    proxy = start_proxy(tmp_path, redis_server, models=cold_models("sleepy"), endpoints={},
                        namespace=namespace, kubeconfig=crds.kubeconfig,
                        args=private(tmp_path))  # fmt: skip
    redis = redis_server.client()

    def held() -> None:
        with (
            httpx.Client(base_url=proxy.url, verify=False, timeout=60) as http,
            pytest.raises(httpx.HTTPError),
        ):
            http.post("/text-to-image", json=T2I, headers={"Authorization": "Bearer t"})

    thread = threading.Thread(target=held)
    thread.start()
    try:
        wait_for(lambda: read_demand(redis, namespace, "sleepy").in_flight == 1, timeout=30,
                 what="the hold")  # fmt: skip
        os.kill(proxy.process.pid, signal.SIGKILL)
        proxy.process.wait()
        wait_for(lambda: read_demand(redis, namespace, "sleepy").in_flight == 0, timeout=20,
                 what="the crashed proxy's job to expire")  # fmt: skip
    finally:
        thread.join(timeout=60)
        stop_proxy(proxy)


# -- Live Runner apps --------------------------------------------------------------------------
def test_a_reservation_wakes_a_cold_live_runner_and_holds_until_a_replica_is_ready(
    operator, crds, api, namespace, redis_server, tmp_path
):
    """The operator's app table row, the app's EndpointSlices and the wake, all through the
    real API server: a session reserved on a LiveRunner at zero replicas is held while the
    proxy scales it up, and answered once a replica is ready (kwok's pod IP: never dialled,
    a reservation does not call the app)."""
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LiveRunner", "metadata": {"name": "cold"},
            "spec": {"app": "examples/cold", "image": "example.invalid/app:v1", "replicas": 0,
                     "warm": {"policy": "OnDemand", "maxReplicas": 1},
                     "pricing": {"price": {"amount": "1", "currency": "wei",
                                           "unit": "hour"}}}}  # fmt: skip
    crds.kubectl("-n", namespace, "apply", "-f", "-", stdin=yaml.safe_dump(body))
    custom = client.CustomObjectsApi(api)

    def live_runner() -> dict:
        return custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "liverunners",
                                                   "cold")  # fmt: skip

    args = [*private(tmp_path), "--offchain-gateways"]
    proxy = start_proxy(tmp_path, redis_server, models=None, endpoints=None, namespace=namespace,
                        kubeconfig=crds.kubeconfig, args=args)  # fmt: skip
    answers: list[httpx.Response] = []
    try:
        with proxy.http() as http:

            def listed() -> list | None:
                return http.get("/discovery").json()[0].get("runners")

            [app] = wait_for(listed, timeout=60, what="the app in discovery")
            assert (app["app"], app["url"]) == ("examples/cold", f"{proxy.url}/apps/cold/session")
            assert live_runner()["spec"]["replicas"] == 0
            reserving = threading.Thread(
                target=lambda: answers.append(http.post("/apps/cold/session", json={}))
            )
            reserving.start()
            wait_for(lambda: live_runner()["spec"].get("replicas") == 1, timeout=30,
                     what="the wake-up")  # fmt: skip
            assert WOKEN_AT in live_runner()["metadata"]["annotations"]
            reserving.join(timeout=120)
            [answer] = answers
            assert answer.status_code == 200, answer.text
            sid = answer.json()["session_id"]
            assert answer.json()["control_url"] == f"{proxy.url}/apps/cold/session/{sid}"
            [app] = listed()
            assert (app["capacity"], app["capacity_used"]) == (1, 1)
            assert http.post(f"/apps/cold/session/{sid}/stop").status_code == 204
    finally:
        stop_proxy(proxy)
