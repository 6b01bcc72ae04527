"""The operator on a real control plane: AIModels become runners on kwok GPU nodes."""

from __future__ import annotations

import base64
import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from kubernetes import client

from kubepeer.api import GROUP, VERSION
from kubepeer.contracts.apps import APP_ROW_KEY, AppPrice, ServedApp, parse_row
from kubepeer.contracts.demand import job_alive, job_finished, job_started, live_runner_subject
from kubepeer.contracts.earnings import hour_of, record_served
from kubepeer.controller.kube import Kube
from kubepeer.livepeer.price_feed import EthUsd, publish
from tests.conftest import GPU_MEMORY_MIB
from tests.support import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.redis]


def load_delay(delay: str) -> dict[str, str]:
    """Pod annotations that make kwok hold a runner pod un-ready for `delay`, as a model
    load would. kwok's delay is min(delay, jitter-delay) when jitter-delay is not longer
    (lifecycle.Stage.Delay), and the stage's default jitter is 5 s: both are set."""
    stage = "pod-ready.stage.kwok.x-k8s.io"
    return {f"{stage}/delay": delay, f"{stage}/jitter-delay": delay}


@pytest.fixture
def fleet(operator, crds, api, namespace):
    return Fleet(crds, api, namespace)


@pytest.fixture
def operator_kube(api) -> Kube:
    """The operator's own API calls, made from the test."""
    return Kube(api)


class Fleet:
    """The test's view of one namespace with the operator running."""

    def __init__(self, cluster, api, namespace: str) -> None:
        self.cluster, self.namespace = cluster, namespace
        self.apps = client.AppsV1Api(api)
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    def apply(self, name: str, **spec: Any) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "AIModel",
            "metadata": {"name": name},
            "spec": {"pipeline": "text-to-image", "modelId": "org/tiny", **spec},
        }
        self.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(body))

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True):
        return self.cluster.kubectl("-n", self.namespace, *args, stdin=stdin, check=check)

    def apply_live(self, name: str, **spec: Any) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "LiveRunner",
            "metadata": {"name": name},
            "spec": {"app": f"examples/{name}", "image": "example.invalid/app:v1", **spec},
        }
        self.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(body))

    def aimodel(self, name: str, plural: str = "aimodels") -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, plural, name
        )

    def status(self, name: str, plural: str = "aimodels") -> dict[str, Any]:
        return self.aimodel(name, plural).get("status") or {}

    def condition(self, name: str, type_: str, plural: str = "aimodels") -> dict[str, Any]:
        conditions = self.status(name, plural).get("conditions", [])
        return next((c for c in conditions if c["type"] == type_), {})

    def wait_phase(
        self, name: str, phase: str, timeout: float = 60, plural: str = "aimodels"
    ) -> dict[str, Any]:
        seen: list[dict[str, Any]] = [{}]

        def reached() -> dict[str, Any] | None:
            seen[0] = self.status(name, plural)
            return seen[0] if seen[0].get("phase") == phase else None

        try:
            return wait_for(reached, timeout=timeout, what=f"{plural} {name} to be {phase}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last status: {json.dumps(seen[0], indent=1)}") from None

    def deployment(self, name: str) -> client.V1Deployment:
        return self.apps.read_namespaced_deployment(name, self.namespace)

    def pods(self, runner: str, label: str = "kubepeer.io/runner") -> list[client.V1Pod]:
        selector = f"{label}={runner}"
        return self.core.list_namespaced_pod(self.namespace, label_selector=selector).items

    def replica_sets(self, runner: str) -> list[client.V1ReplicaSet]:
        selector = f"kubepeer.io/runner={runner}"
        return self.apps.list_namespaced_replica_set(self.namespace, label_selector=selector).items

    def table(self) -> dict[str, dict[str, Any]]:
        """The price table: each AIModel's row, from its own ConfigMap."""
        found = self.core.list_namespaced_config_map(
            self.namespace, label_selector="kubepeer.io/table=model"
        ).items
        return {
            c.metadata.annotations["kubepeer.io/aimodel"]: {
                key: json.loads(value) for key, value in c.data.items()
            }
            for c in found
        }

    def app_table(self, live_runner: str) -> client.V1ConfigMap | None:
        """A LiveRunner's table ConfigMap, if there is one."""
        found = self.core.list_namespaced_config_map(
            self.namespace, label_selector="kubepeer.io/table=app"
        ).items
        return next(
            (c for c in found if c.metadata.annotations["kubepeer.io/live-runner"] == live_runner),
            None,
        )

    def app_row(self, live_runner: str) -> ServedApp | None:
        """A LiveRunner's row of the app table, read as the proxy reads it."""
        table = self.app_table(live_runner)
        return None if table is None else parse_row(json.loads(table.data[APP_ROW_KEY]), "test")

    def patch_template(self, runner: str, annotations: dict[str, str]) -> None:
        patch = {"spec": {"template": {"metadata": {"annotations": annotations}}}}
        self.kubectl("patch", "deployment", runner, "--type", "merge", "-p", json.dumps(patch))


def test_always_model_becomes_a_ready_gpu_runner(fleet):
    fleet.apply(
        "sdxl",
        optimizations=["SFAST"],
        gpu={"count": 1, "minMemory": "16Gi", "products": ["NVIDIA-A10G", "NVIDIA-L4"]},
        warm={"policy": "Always"},
    )
    status = fleet.wait_phase("sdxl", "Ready")
    assert status["readyReplicas"] == 1
    assert status["observedGeneration"] == fleet.aimodel("sdxl")["metadata"]["generation"]
    assert status["lastColdStartSeconds"] >= 0
    ready = fleet.condition("sdxl", "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "AllReplicasReady")

    deployment = fleet.deployment("runner-sdxl")
    pod_spec = deployment.spec.template.spec
    runner = pod_spec.containers[0]
    assert runner.resources.limits["nvidia.com/gpu"] == "1"
    env = {e.name: e for e in runner.env}
    assert env["PIPELINE"].value == "text-to-image"
    assert env["MODEL_ID"].value == "org/tiny"
    assert env["SFAST"].value == "true"
    assert env["AUTH_TOKEN"].value_from.secret_key_ref.name == "kubepeer-runner-auth"
    assert runner.startup_probe.failure_threshold * runner.startup_probe.period_seconds >= 600
    assert runner.readiness_probe.http_get.path == "/readyz"
    assert runner.liveness_probe.http_get.path == "/livez"
    terms = pod_spec.affinity.node_affinity.required_during_scheduling_ignored_during_execution
    expressions = {e.key: e for e in terms.node_selector_terms[0].match_expressions}
    assert expressions["nvidia.com/gpu.product"].values == ["NVIDIA-A10G", "NVIDIA-L4"]
    assert expressions["nvidia.com/gpu.memory"].operator == "Gt"
    assert expressions["nvidia.com/gpu.memory"].values == [str(16 * 1024 - 1)]
    assert pod_spec.priority_class_name == "kubepeer-warm"
    assert deployment.metadata.owner_references[0].kind == "AIModel"

    [pod] = fleet.pods("runner-sdxl")
    node = fleet.core.read_node(pod.spec.node_name)
    assert node.metadata.labels["nvidia.com/gpu.present"] == "true"
    service = fleet.core.read_namespaced_service("runner-sdxl", fleet.namespace)
    assert service.spec.selector == {"kubepeer.io/runner": "runner-sdxl"}
    assert service.spec.cluster_ip == "None"  # headless: no service IP to run out of
    # The auth token exists, and is never in the pod spec itself.
    secret = fleet.core.read_namespaced_secret("kubepeer-runner-auth", fleet.namespace)
    token = base64.b64decode(secret.data["token"]).decode()
    assert len(token) >= 32
    assert env["AUTH_TOKEN"].value is None
    assert token not in json.dumps(fleet.core.api_client.sanitize_for_serialization(deployment))


def test_model_no_node_fits_yet_is_pending_with_the_schedulers_reason(fleet):
    # No node has 80Gi GPUs; a GPU pool scaling from zero might add one, so: Pending.
    assert GPU_MEMORY_MIB < 80 * 1024
    fleet.apply("huge", gpu={"count": 1, "minMemory": "80Gi"})
    wait_for(
        lambda: fleet.condition("huge", "Ready").get("reason") == "Unschedulable",
        timeout=60,
        what="the scheduler's verdict in the Ready condition",
    )
    status = fleet.status("huge")
    assert status["phase"] == "Pending"
    assert "node affinity" in fleet.condition("huge", "Ready")["message"]
    assert status["readyReplicas"] == 0


def test_dotted_and_long_names_run_and_never_block_another_model(fleet):
    long_name = "a" * 70 + ".v1"
    for name in ("bad.name", long_name, "good"):
        fleet.apply(name)
    for name in ("bad.name", long_name, "good"):
        fleet.wait_phase(name, "Ready")
    names = {d.metadata.name for d in fleet.apps.list_namespaced_deployment(fleet.namespace).items}
    assert "runner-good" in names
    assert len(names) == 3
    assert all(len(n) <= 63 and "." not in n for n in names)


def test_a_model_named_like_a_group_and_the_group_get_separate_runners(fleet):
    fleet.apply("group-x")
    fleet.apply("member", pipeline="llm", modelId="org/llm", gpu={"shareGroup": "x"})
    fleet.wait_phase("group-x", "Ready")
    fleet.wait_phase("member", "Ready")
    runners = {
        d.metadata.name: d for d in fleet.apps.list_namespaced_deployment(fleet.namespace).items
    }
    assert len(runners) == 2
    envs = [
        {e.name: e.value for e in d.spec.template.spec.containers[0].env} for d in runners.values()
    ]
    assert sorted("MODELS" in e for e in envs) == [False, True]


def test_runners_start_in_a_pod_security_restricted_namespace(fleet):
    fleet.kubectl(
        "label", "namespace", fleet.namespace, "pod-security.kubernetes.io/enforce=restricted"
    )
    fleet.apply("strict")
    fleet.wait_phase("strict", "Ready")


def test_spec_change_rolls_the_runner_and_an_unchanged_apply_does_not(fleet):
    fleet.apply("rolling", image="example.invalid/runner:v1")
    fleet.wait_phase("rolling", "Ready")
    first = {rs.metadata.name for rs in fleet.replica_sets("runner-rolling")}
    assert len(first) == 1
    version = fleet.aimodel("rolling")["metadata"]["resourceVersion"]

    fleet.apply("rolling", image="example.invalid/runner:v1")  # same spec again
    time.sleep(2)  # time for a wrong rollout or a needless write to show
    assert {rs.metadata.name for rs in fleet.replica_sets("runner-rolling")} == first
    assert fleet.deployment("runner-rolling").metadata.generation == 1
    assert fleet.aimodel("rolling")["metadata"]["resourceVersion"] == version

    fleet.apply("rolling", image="example.invalid/runner:v2", optimizations=["DEEPCACHE"])
    wait_for(
        lambda: len(fleet.replica_sets("runner-rolling")) == 2,
        timeout=30,
        what="a second ReplicaSet for the new spec",
    )
    runner = fleet.deployment("runner-rolling").spec.template.spec.containers[0]
    assert runner.image == "example.invalid/runner:v2"
    assert "DEEPCACHE" in {e.name for e in runner.env}
    fleet.wait_phase("rolling", "Ready")


def test_ready_waits_for_the_new_version_while_the_old_one_serves(fleet):
    fleet.apply("upgrade", image="example.invalid/runner:v1")
    fleet.wait_phase("upgrade", "Ready")
    # From now on a new runner pod takes an hour to load (kwok holds it un-ready).
    fleet.patch_template("runner-upgrade", load_delay("1h"))
    fleet.apply("upgrade", image="example.invalid/runner:v2")

    def new_generation_seen() -> dict[str, Any] | None:
        status = fleet.status("upgrade")
        return status if status.get("observedGeneration") == 2 else None

    status = wait_for(new_generation_seen, timeout=30, what="status for generation 2")
    for _ in range(10):  # and it stays so: the old pod serves, the new one is loading
        status = fleet.status("upgrade")
        assert status["phase"] == "Loading", status
        assert fleet.condition("upgrade", "Ready")["reason"] == "RollingOut"
        time.sleep(0.3)
    assert status["readyReplicas"] == 1

    # The new version crash-loops (as the kubelet would report it): Degraded, with why.
    new_pod = next(
        p for p in fleet.pods("runner-upgrade") if p.spec.containers[0].image.endswith("v2")
    )
    crash = {"status": {"containerStatuses": [{
        "name": "runner", "image": "example.invalid/runner:v2", "imageID": "", "ready": False,
        "restartCount": 3, "state": {"waiting": {"reason": "CrashLoopBackOff",
                                                 "message": "back-off restarting"}},
        "lastState": {"terminated": {"exitCode": 1, "reason": "Error",
                                     "message": "CUDA out of memory"}},
    }]}}  # fmt: skip
    fleet.kubectl(
        "patch", "pod", new_pod.metadata.name, "--subresource=status", "--type=merge",
        "-p", json.dumps(crash),
    )  # fmt: skip
    fleet.wait_phase("upgrade", "Degraded")
    ready = fleet.condition("upgrade", "Ready")
    assert ready["reason"] == "ModelLoadFailed"
    assert "CUDA out of memory" in ready["message"]


def test_on_demand_model_wakes_on_scale_and_sleeps_when_idle(fleet, redis_server):
    fleet.apply("cold", warm={"policy": "OnDemand", "maxReplicas": 2, "idleTimeout": "3s"})
    fleet.wait_phase("cold", "Idle")
    assert fleet.deployment("runner-cold").spec.replicas == 0
    assert fleet.deployment("runner-cold").spec.template.spec.priority_class_name == "kubepeer-cold"

    # kwok makes the woken runner take 2 s to turn ready, as a model load would.
    fleet.patch_template("runner-cold", load_delay("2s"))

    # A job in flight keeps it awake past its idle timeout...
    redis = redis_server.client()
    job_started(redis, fleet.namespace, "cold", "job-1")
    fleet.kubectl("scale", "aimodel", "cold", "--replicas", "1")
    fleet.wait_phase("cold", "Loading")
    status = fleet.wait_phase("cold", "Ready")
    assert 1.5 <= status["lastColdStartSeconds"] < 15
    assert len(fleet.pods("runner-cold")) == 1
    time.sleep(4)
    assert fleet.aimodel("cold")["spec"]["replicas"] == 1

    # ...and once it is done, idleTimeout later the model scales to zero.
    job_finished(redis, fleet.namespace, "cold", "job-1")
    fleet.wait_phase("cold", "Idle", timeout=30)
    assert fleet.aimodel("cold")["spec"]["replicas"] == 0
    assert fleet.deployment("runner-cold").spec.replicas == 0
    events = fleet.kubectl("get", "events", "--field-selector", "involvedObject.name=cold").stdout
    assert "ScaledToZero" in events
    # The next job finds the model claimed idle: the proxy must wake it.
    assert job_started(redis, fleet.namespace, "cold", "job-2") is True


def test_a_model_still_loading_is_not_idle(fleet):
    fleet.apply("slow", warm={"policy": "OnDemand", "idleTimeout": "2s"})
    fleet.wait_phase("slow", "Idle")
    fleet.patch_template("runner-slow", load_delay("6s"))  # loads for longer than idleTimeout
    fleet.kubectl("scale", "aimodel", "slow", "--replicas", "1")
    fleet.wait_phase("slow", "Ready", timeout=30)  # not scaled away while it loaded
    fleet.wait_phase("slow", "Idle", timeout=30)  # then idle from the moment it was Ready


def test_a_job_whose_proxy_died_stops_holding_the_gpu(fleet, redis_server):
    fleet.apply("orphaned", warm={"policy": "OnDemand", "idleTimeout": "1s"})
    fleet.wait_phase("orphaned", "Idle")
    redis, ttl = redis_server.client(), 3.0
    job_started(redis, fleet.namespace, "orphaned", "job", ttl=ttl)
    proxy_alive = threading.Event()
    proxy_alive.set()

    def proxy() -> None:  # refreshes its running job, as a live proxy does
        while proxy_alive.is_set():
            job_alive(redis, fleet.namespace, "orphaned", "job", ttl=ttl)
            time.sleep(ttl / 4)

    refresher = threading.Thread(target=proxy, daemon=True)
    refresher.start()
    fleet.kubectl("scale", "aimodel", "orphaned", "--replicas", "1")
    fleet.wait_phase("orphaned", "Ready")
    time.sleep(2 * ttl)  # past the job's first expiry and the idleTimeout: held while refreshed
    assert fleet.aimodel("orphaned")["spec"]["replicas"] == 1

    proxy_alive.clear()  # the proxy dies mid-job: nobody refreshes or finishes it
    refresher.join()
    fleet.wait_phase("orphaned", "Idle", timeout=40)  # released once it expired


def test_scale_to_zero_loses_to_a_change_made_since_it_looked(fleet, operator_kube):
    fleet.apply("raced", warm={"policy": "OnDemand", "maxReplicas": 2}, replicas=1)
    fleet.wait_phase("raced", "Ready")  # its status settled: the operator writes no more
    seen = fleet.aimodel("raced")["metadata"]["resourceVersion"]
    fleet.kubectl("annotate", "aimodel", "raced", "kubepeer.io/woken-at=1")  # a wake-up lands
    with pytest.raises(client.ApiException) as refused:
        operator_kube.scale(fleet.namespace, "raced", 0, resource_version=seen)
    assert refused.value.status == 409
    assert fleet.aimodel("raced")["spec"]["replicas"] == 1


def test_no_aimodel_waits_for_the_operator_to_be_deleted(fleet, operator_kube):
    fleet.apply("plain")
    fleet.wait_phase("plain", "Ready")
    assert not fleet.aimodel("plain")["metadata"].get("finalizers")
    # One marked by an earlier version: `kubepeer uninstall` releases it.
    fleet.kubectl("patch", "aimodel", "plain", "--type", "merge", "-p",
                  json.dumps({"metadata": {"finalizers": ["kubepeer.io/operator"]}}))  # fmt: skip
    fleet.kubectl("delete", "aimodel", "plain", "--wait=false")
    assert fleet.aimodel("plain")["metadata"].get("deletionTimestamp")
    assert operator_kube.release_aimodels([fleet.namespace]) == 1
    wait_for(
        lambda: (
            not fleet.custom.list_namespaced_custom_object(
                GROUP, VERSION, fleet.namespace, "aimodels"
            )["items"]
        ),
        timeout=30,
        what="the AIModel to be gone",
    )


@pytest.fixture
def small_gpu_node(api) -> Iterator[str]:
    """A kwok node of our own with 2 GPUs of a product no other test asks for."""
    core = client.CoreV1Api(api)
    name, product = f"preempt-{int(time.time())}", "TEST-PREEMPT-GPU"
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake"},
            "labels": {
                "type": "kwok",
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": product,
                "nvidia.com/gpu.memory": "24576",
            },
        },
        "status": {
            "allocatable": {"cpu": "32", "memory": "256Gi", "pods": "110", "nvidia.com/gpu": "2"},
            "capacity": {"cpu": "32", "memory": "256Gi", "pods": "110", "nvidia.com/gpu": "2"},
        },
    }
    core.create_node(node)
    wait_for(
        lambda: any(
            c.type == "Ready" and c.status == "True"
            for c in core.read_node(name).status.conditions or []
        ),
        timeout=30,
        what="the extra GPU node to be Ready",
    )
    yield product
    core.delete_node(name)


def test_warm_model_preempts_a_cold_one_when_gpus_are_full(fleet, small_gpu_node):
    only_here = {"count": 1, "products": [small_gpu_node]}
    fleet.apply(
        "cold-fill", gpu=only_here, warm={"policy": "OnDemand", "maxReplicas": 2}, replicas=2
    )
    wait_for(
        lambda: fleet.status("cold-fill").get("readyReplicas") == 2,
        timeout=60,
        what="two cold replicas filling the node's GPUs",
    )

    fleet.apply("warm", gpu=only_here, warm={"policy": "Always"})
    fleet.wait_phase("warm", "Ready", timeout=90)
    events = fleet.kubectl("get", "events", "-o", "json").stdout
    assert any(e["reason"] == "Preempted" for e in json.loads(events)["items"])
    assert fleet.status("cold-fill")["readyReplicas"] <= 1


def test_share_group_packs_three_models_into_one_runner_on_one_gpu(fleet):
    for name, pipeline in (
        ("whisper", "audio-to-text"),
        ("blip", "image-to-text"),
        ("sam", "segment-anything-2"),
    ):
        fleet.apply(name, pipeline=pipeline, modelId=f"tiny/{name}", gpu={"shareGroup": "small"})
    for name in ("whisper", "blip", "sam"):
        fleet.wait_phase(name, "Ready")
    runners = fleet.apps.list_namespaced_deployment(fleet.namespace).items
    assert [d.metadata.name for d in runners] == ["group-small"]
    container = runners[0].spec.template.spec.containers[0]
    assert container.resources.limits["nvidia.com/gpu"] == "1"
    models = json.loads(next(e.value for e in container.env if e.name == "MODELS"))
    assert [(m["pipeline"], m["model_id"]) for m in models] == [
        ("image-to-text", "tiny/blip"),
        ("segment-anything-2", "tiny/sam"),
        ("audio-to-text", "tiny/whisper"),
    ]
    assert len(runners[0].metadata.owner_references) == 3

    # A newcomer the runner cannot serve (a pipeline the group already has) is refused
    # alone, on its own status; the group keeps running untouched.
    generation = runners[0].metadata.generation
    fleet.apply(
        "whisper-2", pipeline="audio-to-text", modelId="tiny/w2", gpu={"shareGroup": "small"}
    )
    fleet.wait_phase("whisper-2", "Failed")
    ready = fleet.condition("whisper-2", "Ready")
    assert ready["reason"] == "InvalidSpec"
    assert "already serves pipeline audio-to-text with AIModel 'whisper'" in ready["message"]
    assert fleet.deployment("group-small").metadata.generation == generation
    for name in ("whisper", "blip", "sam"):
        assert fleet.status(name)["phase"] == "Ready"

    # Leaving the group re-renders the runner with the two that stay.
    fleet.kubectl("delete", "aimodel", "blip")
    wait_for(lambda: len(_group_models(fleet)) == 2, timeout=30, what="the group runner to shrink")


def _group_models(fleet: Fleet) -> list[dict[str, Any]]:
    container = fleet.deployment("group-small").spec.template.spec.containers[0]
    return json.loads(next(e.value for e in container.env if e.name == "MODELS"))


def test_every_model_of_a_burst_gets_its_first_status(fleet):
    """Forty AIModels in one apply, so forty runners created in a burst: each first status
    comes from its runner's first watch event or from the deadline, and none is missing."""
    names = [f"burst-{i:02d}" for i in range(40)]
    fleet.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all([
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": "AIModel", "metadata": {"name": name},
         "spec": {"pipeline": "text-to-image", "modelId": f"org/{name}",
                  "warm": {"policy": "OnDemand"}}}
        for name in names
    ]))  # fmt: skip
    missing: list[str] = []

    def all_have_a_status() -> bool:
        items = fleet.custom.list_namespaced_custom_object(
            GROUP, VERSION, fleet.namespace, "aimodels"
        )["items"]
        phases = {m["metadata"]["name"]: (m.get("status") or {}).get("phase") for m in items}
        missing[:] = [name for name in names if not phases.get(name)]
        return not missing

    try:
        wait_for(all_have_a_status, timeout=60, what="a status on every AIModel", every=1.0)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; without one: {missing}") from None
    assert {fleet.status(name)["phase"] for name in names} == {"Idle"}  # OnDemand, no demand
    assert len(fleet.apps.list_namespaced_deployment(fleet.namespace).items) == len(names)


def test_deleting_an_aimodel_garbage_collects_its_runner(fleet):
    fleet.apply("short-lived")
    fleet.wait_phase("short-lived", "Ready")
    fleet.kubectl("delete", "aimodel", "short-lived")
    wait_for(
        lambda: not fleet.apps.list_namespaced_deployment(fleet.namespace).items,
        timeout=30,
        what="the runner Deployment to be garbage-collected",
    )


# --- LiveRunner apps (issue 26: the CRD and the operator) ---

LIVE, APP_LABEL = "liverunners", "kubepeer.io/live-runner"
HOURLY = {"price": {"amount": "3.50", "currency": "USD", "unit": "hour"}}


def test_a_live_runner_app_runs_ready_beside_a_model_and_is_never_taken_for_a_runner(
    fleet, redis_server
):
    # The ETH/USD reading the payments controller publishes (tests/chain/test_price_feed.py).
    publish(redis_server.client(), EthUsd(3000 * 10**8, 8, 1, 0, "0xfeed", time.time()))
    fleet.apply("beside")  # an AIModel in the same namespace: its watches see the app too
    fleet.apply_live("echo", port=9000, capacity=4, pricing=HOURLY)
    status = fleet.wait_phase("echo", "Ready", plural=LIVE)
    assert status["readyReplicas"] == 1
    assert status["selector"] == f"{APP_LABEL}=live-echo"
    assert fleet.condition("echo", "Priced", LIVE)["status"] == "True"
    assert (status["price"]["wei"], status["price"]["unit"]) == ("324074074074", "seconds")
    deployment = fleet.deployment("live-echo")
    [app] = deployment.spec.template.spec.containers
    assert (app.image, app.ports[0].container_port) == ("example.invalid/app:v1", 9000)
    assert app.readiness_probe.http_get.path == "/health"
    assert app.resources.limits == {"nvidia.com/gpu": "1"}
    [pod] = fleet.pods("live-echo", APP_LABEL)
    assert "nvidia.com/gpu" in fleet.core.read_node(pod.spec.node_name).status.allocatable
    fleet.wait_phase("beside", "Ready")

    # The app's Deployment changes (scaled through the LiveRunner's scale subresource) and
    # the AIModel machinery, which deletes runner Deployments no AIModel wants, leaves it be.
    fleet.kubectl("patch", LIVE, "echo", "--type=merge", "-p",
                  json.dumps({"spec": {"warm": {"maxReplicas": 2}}}))  # fmt: skip
    fleet.kubectl("scale", "liverunner", "echo", "--replicas", "2")
    status = fleet.wait_phase("echo", "Ready", plural=LIVE)
    wait_for(lambda: fleet.status("echo", LIVE).get("readyReplicas") == 2, timeout=30,
             what="two ready replicas of the app")  # fmt: skip
    assert fleet.deployment("live-echo").metadata.uid == deployment.metadata.uid
    assert fleet.aimodel("echo", LIVE)["status"]["observedGeneration"] == 3

    # A new reading of the feed reprices the app (3.50 USD an hour at 3,500 USD per ETH).
    publish(redis_server.client(), EthUsd(3500 * 10**8, 8, 2, 0, "0xfeed", time.time()))
    wait_for(lambda: fleet.status("echo", LIVE)["price"]["wei"] == "277777777777", timeout=30,
             what="the app repriced at the new ETH/USD rate")  # fmt: skip
    assert fleet.status("echo", LIVE)["price"]["roundId"] == "2"

    # A price in wei needs no rate: the status's price is replaced whole, not merged...
    in_wei = {"price": {"amount": "3600000000", "currency": "wei", "unit": "hour"}}
    fleet.kubectl("patch", LIVE, "echo", "--type=merge", "-p",
                  json.dumps({"spec": {"pricing": in_wei}}))  # fmt: skip
    alone = {"wei": "1000000", "unit": "seconds"}
    wait_for(lambda: fleet.status("echo", LIVE).get("price") == alone, timeout=30,
             what="the wei price alone, no rate left over")  # fmt: skip
    # ...and it goes when no price can be computed (under 1 wei a second).
    fleet.kubectl("patch", LIVE, "echo", "--type=merge", "-p", json.dumps(
        {"spec": {"pricing": {"price": {"amount": "100", "currency": "wei"}}}}))  # fmt: skip
    wait_for(lambda: "price" not in fleet.status("echo", LIVE), timeout=30,
             what="no price in the status")  # fmt: skip
    assert fleet.condition("echo", "Priced", LIVE)["status"] == "False"


def test_an_on_demand_live_runner_wakes_when_scaled_and_sleeps_when_idle(fleet, redis_server):
    fleet.apply_live(
        "hello", mode="single-shot", pricing={"price": {"amount": "0.01", "unit": "fixed"}},
        warm={"policy": "OnDemand", "maxReplicas": 2, "idleTimeout": "3s"},
    )  # fmt: skip
    fleet.wait_phase("hello", "Idle", plural=LIVE)
    deployment = fleet.deployment("live-hello")
    assert deployment.spec.replicas == 0
    assert deployment.spec.template.spec.priority_class_name == "kubepeer-cold"

    # A session in flight (the proxy records one as a job) keeps it awake past idleTimeout...
    redis = redis_server.client()
    subject = live_runner_subject("hello")
    job_started(redis, fleet.namespace, subject, "session-1")
    fleet.kubectl("scale", "liverunner", "hello", "--replicas", "1")
    status = fleet.wait_phase("hello", "Ready", plural=LIVE)
    assert status["readyReplicas"] == 1
    assert status["lastColdStartSeconds"] >= 0
    time.sleep(4)
    assert fleet.aimodel("hello", LIVE)["spec"]["replicas"] == 1

    # ...and once it ends, idleTimeout later the app scales to zero.
    job_finished(redis, fleet.namespace, subject, "session-1")
    fleet.wait_phase("hello", "Idle", timeout=30, plural=LIVE)
    assert fleet.aimodel("hello", LIVE)["spec"]["replicas"] == 0
    assert fleet.deployment("live-hello").spec.replicas == 0


def test_a_live_runner_with_no_price_says_so_until_a_pricing_gives_one(fleet):
    fleet.apply_live("unpriced")
    wait_for(lambda: fleet.condition("unpriced", "Priced", LIVE).get("status") == "False",
             timeout=30, what="Priced=False")  # fmt: skip
    priced = fleet.condition("unpriced", "Priced", LIVE)
    assert priced["reason"] == "PricingNotFound"
    assert "examples/unpriced" in priced["message"]
    row = fleet.app_row("unpriced")  # written before the status: the proxy decides
    assert row is not None
    assert row.price is None
    fleet.kubectl("apply", "-f", "-", stdin=yaml.safe_dump({
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "Pricing", "metadata": {"name": "apps"},
        "spec": {"apps": [{"app": "*", "amount": "1000000", "currency": "wei"}]},
    }))  # fmt: skip
    wait_for(lambda: fleet.condition("unpriced", "Priced", LIVE).get("status") == "True",
             timeout=30, what="Priced=True once a Pricing prices every app")  # fmt: skip
    assert fleet.app_row("unpriced").price == AppPrice(277, "seconds")  # 1e6 wei an hour


def test_a_live_runner_publishes_its_app_table_row_which_goes_with_it(fleet):
    in_wei = {"price": {"amount": "36000", "currency": "wei", "unit": "hour"}}  # 10 a second
    fleet.apply_live("brief", capacity=2, pricing=in_wei)
    row = wait_for(lambda: fleet.app_row("brief"), timeout=30, what="the app's table row")
    assert row == ServedApp(
        route="brief", app="examples/brief", mode="persistent", runner="live-brief", port=8080,
        capacity=2, on_demand=False, max_replicas=1, proxy=False, metadata=None, version=None,
        price=AppPrice(wei=10, unit="seconds"),
    )  # fmt: skip
    table = fleet.app_table("brief")
    assert table.metadata.name == "kubepeer-app-brief"
    [owner] = table.metadata.owner_references
    uid = fleet.aimodel("brief", LIVE)["metadata"]["uid"]
    assert (owner.kind, owner.uid, owner.controller) == ("LiveRunner", uid, True)

    # A row deleted by hand is written again.
    fleet.kubectl("delete", "configmap", "kubepeer-app-brief")
    wait_for(lambda: fleet.app_row("brief") == row, timeout=30, what="the row written again")

    # A new capacity is a new row (the proxy's admission), and no new app.
    fleet.apply_live("brief", capacity=3, pricing=in_wei)
    wait_for(lambda: fleet.app_row("brief").capacity == 3, timeout=30,
             what="the new capacity in the app's row")  # fmt: skip
    assert fleet.app_row("brief") == dataclasses.replace(row, capacity=3)
    assert fleet.deployment("live-brief").metadata.generation == 1

    # Deleting the LiveRunner collects its app and its row.
    fleet.wait_phase("brief", "Ready", plural=LIVE)
    fleet.kubectl("delete", "liverunner", "brief")
    wait_for(
        lambda: (
            not fleet.apps.list_namespaced_deployment(fleet.namespace).items
            and not fleet.core.list_namespaced_service(fleet.namespace).items
            and fleet.app_table("brief") is None
        ),
        # The garbage collector finds a CRD's kind by discovery, every 30 s: run alone,
        # this test can delete its LiveRunner before the collector knows the kind.
        timeout=60,
        what="the app's Deployment, Service and table row to be garbage-collected",
    )


def test_prices_compile_into_the_proxy_table_and_ai_models_json(fleet):
    fleet.kubectl("apply", "-f", "-", stdin=yaml.safe_dump({
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Pricing",
        "metadata": {"name": "default"},
        "spec": {
            "usdPerEth": "2000",
            "prices": [{"pipeline": "text-to-image", "pricePerUnit": "0.002", "currency": "USD",
                        "pixelsPerUnit": 1000000}],
        },
    }))  # fmt: skip
    fleet.apply("priced", pricing={"ref": "default"}, capacity=2)
    fleet.apply("unpriced", pipeline="llm", pricing={"ref": "missing"})

    def published() -> dict[str, Any] | None:
        table = fleet.table()
        return table if len(table) == 2 else None

    table = wait_for(published, timeout=30, what="a table row for each model")
    priced = table["priced"]["model.json"]
    # 0.002 USD per megapixel at 2000 USD/ETH = 1e-6 ETH per 1e6 pixels = 1e6 wei per pixel.
    assert priced["price"]["weiPerUnit"] == "1000000"
    assert (priced["price"]["pricePerUnit"], priced["price"]["pixelsPerUnit"]) == (1000000, 1)
    assert priced["capability"] == 27
    assert priced["runner"] == "runner-priced"
    assert table["unpriced"]["model.json"]["price"] is None
    assert table["unpriced"]["aiModels.json"] == []
    [entry] = table["priced"]["aiModels.json"]
    assert entry == {
        "pipeline": "text-to-image",
        "model_id": "org/tiny",
        "warm": True,
        "capacity": 2,
        "url": "http://kubepeer-proxy:8000",
        "price_per_unit": "0.002USD",
        "pixels_per_unit": 1000000,
        "currency": "USD",
    }

    wait_for(
        lambda: fleet.condition("unpriced", "Priced").get("reason") == "PricingNotFound",
        timeout=30,
        what="the unpriced model's Priced condition",
    )
    assert "'missing' not found" in fleet.condition("unpriced", "Priced")["message"]


def test_capacity_changes_the_table_and_restarts_no_runner(fleet):
    fleet.apply("steady", capacity=1)
    fleet.wait_phase("steady", "Ready")
    [pod] = fleet.pods("runner-steady")
    fleet.apply("steady", capacity=4)
    wait_for(
        lambda: fleet.table().get("steady", {}).get("model.json", {}).get("capacity") == 4,
        timeout=30,
        what="the new capacity in the table",
    )
    assert [p.metadata.uid for p in fleet.pods("runner-steady")] == [pod.metadata.uid]
    assert fleet.deployment("runner-steady").metadata.generation == 1


def test_pod_policy_example_refuses_foreign_images(crds, namespace, fleet):
    from tests.conftest import REPO

    policy = REPO / "manifests" / "policy" / "aimodel-images.yaml"
    crds.kubectl("apply", "-f", str(policy))
    try:

        def refused() -> str | None:
            body = yaml.safe_dump({
                "apiVersion": f"{GROUP}/{VERSION}", "kind": "AIModel",
                "metadata": {"name": "foreign"},
                "spec": {"pipeline": "llm", "modelId": "org/m", "image": "evil.example/x:1"},
            })  # fmt: skip
            # A server-side dry run passes admission every time and creates nothing.
            result = fleet.kubectl("create", "--dry-run=server", "-f", "-", stdin=body, check=False)
            return result.returncode != 0 and result.stderr

        # The policy takes a moment to be enforced after it is created.
        message = wait_for(refused, timeout=90, what="the policy to refuse the image")
        assert "not from ghcr.io/kubepeer/" in message
    finally:
        crds.kubectl("delete", "-f", str(policy), "--wait=false", check=False)


def _earnings(redis, namespace: str, aimodel: str, wei_per_hour: int, jobs_per_hour: int,
              now: float) -> None:  # fmt: skip
    """A week of the same hour and the last hour on record, as proxies write them; and the
    same again an hour on, so that the test holds when the clock turns an hour under it."""
    hour = hour_of(now)
    pipe = redis.pipeline()
    hours = {h + turn for turn in (0, 1)
             for h in [hour - 1, *(hour - 24 * day for day in range(1, 8))]}  # fmt: skip
    for past in sorted(hours):
        for _ in range(jobs_per_hour):
            record_served(pipe, namespace, aimodel, earned_wei=wei_per_hour // jobs_per_hour,
                          cold=False, now=past * 3600 + 1)  # fmt: skip
    pipe.execute()


def test_a_revenue_model_that_earns_is_woken_and_kept_and_one_that_does_not_sleeps(
    fleet, redis_server
):
    """warm.policy Revenue (kubepeer/controller/revenue.py) on the real control plane: the
    operator's GPU price is 0.0006 ETH an hour (its default), and gateways wait no cold start
    out (the operator fixture's patience is 0 s: kwok's cold starts take a second)."""
    redis, now = redis_server.client(), time.time()
    _earnings(redis, fleet.namespace, "earner", 10**18, 100, now)  # 1 ETH an hour
    _earnings(redis, fleet.namespace, "loser", 10**12, 10, now)  # 0.000001 ETH an hour
    fleet.apply("earner", warm={"policy": "Revenue", "idleTimeout": "3s"})
    fleet.apply("loser", warm={"policy": "Revenue", "idleTimeout": "3s"}, replicas=1)

    # The earner, at zero, is woken and kept: a Warm condition and an event with its numbers.
    fleet.wait_phase("earner", "Ready", timeout=60)
    warm = fleet.condition("earner", "Warm")
    assert (warm["status"], warm["reason"]) == ("True", "KeptWarm")
    assert warm["message"].startswith("kept warm: 1.00 ETH/h expected vs 0.0006 ETH/h GPU cost")
    time.sleep(5)  # past its 3 s idle timeout without a job: kept all the same
    assert fleet.aimodel("earner")["spec"]["replicas"] == 1
    earned = fleet.status("earner")["earnings"]
    assert (earned["earnedWei"], earned["jobs"], earned["coldWaits"]) == (str(10**18), 100, 0)

    # The loser runs at first (spec.replicas 1), then sleeps once idle: on demand.
    fleet.wait_phase("loser", "Idle", timeout=60)
    assert fleet.aimodel("loser")["spec"]["replicas"] == 0
    cold = fleet.condition("loser", "Warm")
    assert (cold["status"], cold["reason"]) == ("False", "OnDemand")
    assert "ETH/h expected vs 0.0006 ETH/h GPU cost" in cold["message"]
    events = fleet.kubectl("get", "events", "--field-selector", "involvedObject.name=loser",
                           "-o", "json").stdout  # fmt: skip
    messages = {e["reason"]: e["message"] for e in json.loads(events)["items"]}
    assert messages["ScaledToZero"].startswith("on demand, idle 3s: 1e-06 ETH/h expected")
    assert messages["OnDemand"] == cold["message"]

    # It starts earning: woken and kept at the next decision.
    _earnings(redis, fleet.namespace, "loser", 10**18, 100, now)
    fleet.wait_phase("loser", "Ready", timeout=60)
    assert fleet.condition("loser", "Warm")["reason"] == "KeptWarm"
