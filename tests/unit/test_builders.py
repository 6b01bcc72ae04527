"""Runner manifests from AIModels: pure functions, no cluster."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from kubepeer.api import AIModelSpec
from kubepeer.contracts import labels as L
from kubepeer.controller.builders import (
    Member,
    RunnerPlan,
    admit_group,
    build_priority_classes,
    build_runner_deployment,
    build_runner_service,
)
from kubepeer.controller.fleet import View, plan_runner
from kubepeer.controller.handlers import build_registry
from kubepeer.controller.settings import OperatorSettings

SETTINGS = OperatorSettings(runner_image="runner:default", startup_timeout_seconds=900)


def member(name: str = "sdxl", created: str = "", **spec: Any) -> Member:
    full = {"pipeline": "text-to-image", "modelId": "org/model", **spec}
    return Member(
        name=name, uid=f"uid-{name}", spec=AIModelSpec.model_validate(full), created=created
    )


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def env(deployment: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(deployment)["env"]}


def test_dedicated_runner_carries_the_model_and_its_gpu_needs():
    plan = RunnerPlan.dedicated(
        "ns", member(optimizations=["SFAST", "DEEPCACHE"], gpu={"count": 2})
    )
    deployment = build_runner_deployment(plan, SETTINGS)
    assert deployment["metadata"]["name"] == "runner-sdxl"
    assert container(deployment)["image"] == "runner:default"
    assert container(deployment)["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    assert env(deployment)["PIPELINE"] == "text-to-image"
    assert env(deployment)["MODEL_ID"] == "org/model"
    assert env(deployment)["SFAST"] == env(deployment)["DEEPCACHE"] == "true"
    assert env(deployment)["AUTH_TOKEN"] == {
        "secretKeyRef": {"name": "kubepeer-runner-auth", "key": "token"}
    }
    [owner] = deployment["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("AIModel", "sdxl", True)
    assert deployment["spec"]["template"]["metadata"]["labels"][L.AIMODEL] == "sdxl"


def test_startup_probe_waits_as_long_as_the_settings_allow_a_load_to_take():
    deployment = build_runner_deployment(RunnerPlan.dedicated("ns", member()), SETTINGS)
    startup = container(deployment)["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 900
    assert container(deployment)["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_vram_and_products_become_node_affinity():
    plan = RunnerPlan.dedicated("ns", member(gpu={"minMemory": "24Gi", "products": ["B", "A"]}))
    terms = build_runner_deployment(plan, SETTINGS)["spec"]["template"]["spec"]["affinity"]
    [term] = terms["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert term["matchExpressions"] == [
        {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["A", "B"]},
        {"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": ["24575"]},
    ]


def test_cpu_only_model_asks_for_no_gpu_and_no_gpu_toleration():
    deployment = build_runner_deployment(
        RunnerPlan.dedicated("ns", member(gpu={"count": 0})), SETTINGS
    )
    assert "limits" not in container(deployment).get("resources", {})
    assert "tolerations" not in deployment["spec"]["template"]["spec"]


def test_policy_picks_the_priority_class():
    warm = build_runner_deployment(RunnerPlan.dedicated("ns", member()), SETTINGS)
    cold = build_runner_deployment(
        RunnerPlan.dedicated("ns", member(warm={"policy": "OnDemand"})), SETTINGS
    )
    assert warm["spec"]["template"]["spec"]["priorityClassName"] == "kubepeer-warm"
    assert cold["spec"]["template"]["spec"]["priorityClassName"] == "kubepeer-cold"
    assert cold["spec"]["replicas"] == 0
    classes = {c["metadata"]["name"]: c for c in build_priority_classes(SETTINGS)}
    assert classes["kubepeer-warm"]["value"] > classes["kubepeer-cold"]["value"]
    assert classes["kubepeer-cold"]["preemptionPolicy"] == "Never"


def test_share_group_is_one_runner_on_one_gpu_with_every_model():
    members = [
        member("whisper", pipeline="audio-to-text", modelId="w", gpu={"shareGroup": "g"}),
        member("blip", pipeline="image-to-text", modelId="b", gpu={"shareGroup": "g"}),
    ]
    plan = RunnerPlan.group("ns", "g", members)
    deployment = build_runner_deployment(plan, SETTINGS)
    assert deployment["metadata"]["name"] == "group-g"
    assert container(deployment)["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert "PIPELINE" not in env(deployment)
    assert json.loads(env(deployment)["MODELS"]) == [
        {"pipeline": "image-to-text", "model_id": "b", "optimizations": []},
        {"pipeline": "audio-to-text", "model_id": "w", "optimizations": []},
    ]
    owners = deployment["metadata"]["ownerReferences"]
    assert {o["name"] for o in owners} == {"whisper", "blip"}
    assert not any(o["controller"] for o in owners)
    annotation = deployment["metadata"]["annotations"][L.MODELS_ANNOTATION]
    assert [m["aimodel"] for m in json.loads(annotation)] == ["blip", "whisper"]


def test_a_group_newcomer_that_conflicts_is_refused_alone():
    members = [
        member("first", created="2026-01-01T00:00:00Z", image="one", gpu={"shareGroup": "g"}),
        member("other-image", created="2026-01-02T00:00:00Z", image="two",
               pipeline="llm", gpu={"shareGroup": "g"}),
        member("same-pipeline", created="2026-01-03T00:00:00Z", image="one",
               gpu={"shareGroup": "g"}),
        member("fits", created="2026-01-04T00:00:00Z", image="one", pipeline="llm",
               gpu={"shareGroup": "g"}),
    ]  # fmt: skip
    admitted, refused = admit_group("g", members)
    assert [m.name for m in admitted] == ["first", "fits"]
    assert "runs image one (AIModel 'first')" in refused["other-image"]
    assert "already serves pipeline text-to-image with AIModel 'first'" in refused["same-pipeline"]


def test_planning_a_runner_reads_only_its_own_members():
    def body(name: str, created: str, **spec: Any) -> dict[str, Any]:
        return {
            "metadata": {
                "name": name,
                "uid": name,
                "namespace": "ns",
                "creationTimestamp": created,
            },
            "spec": {"pipeline": "llm", "modelId": "m", **spec},
        }

    bodies = [
        body("a", "1", image="one", gpu={"shareGroup": "g"}),
        body("b", "2", image="two", gpu={"shareGroup": "g"}),
    ]
    view = View(
        aimodels={("ns", b["metadata"]["name"]): [b] for b in bodies},
        members={("ns", "group-g"): ["a", "b"]},
    )
    outcome = plan_runner(view, "ns", "group-g")
    assert outcome.plan is not None
    assert [m.name for m in outcome.plan.members] == ["a"]
    assert set(outcome.refused) == {"b"}
    assert plan_runner(view, "ns", "runner-other").plan is None


def test_no_handler_needs_the_diff_base_the_operator_stops_kopf_keeping():
    """The operator drops kopf's per-event copy of each object (NoDiffBase): safe only while
    no change handler (create/update/delete) or daemon/timer is registered to read it."""
    registry = build_registry(SETTINGS, None, None)  # type: ignore[arg-type]
    assert registry._changing.get_all_handlers() == []
    assert registry._spawning.get_all_handlers() == []
    assert len(registry._watching.get_all_handlers()) == 9  # the event handlers do run


def test_service_selects_the_runner_pods():
    plan = RunnerPlan.dedicated("ns", member())
    service = build_runner_service(plan, SETTINGS)
    deployment = build_runner_deployment(plan, SETTINGS)
    selector = service["spec"]["selector"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"


@pytest.mark.parametrize(
    "name",
    ["x" * 253, "a.b", "a-b", "with.dots.and-" + "y" * 60, "a--b", "g", "group-x", "m0213"],
)
def test_any_valid_aimodel_name_gives_valid_distinct_runner_names(name):
    dns_1035 = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
    dedicated = L.runner_name(aimodel=name)
    assert len(dedicated) <= 63
    assert re.match(dns_1035, dedicated), dedicated
    assert dedicated == L.runner_name(aimodel=name)
    assert len(L.label_value(name)) <= 63
    assert len(L.table_name(name)) <= 253


def test_similar_names_and_groups_never_share_a_runner():
    names = ["a.b", "a-b", "a--b", "x" * 80, "x" * 79, "group-x", "runner-x", "x"]
    dedicated = {L.runner_name(aimodel=n) for n in names}
    groups = {L.runner_name(share_group=g) for g in ["x", "a-b", "runner-x", "group-x"]}
    assert len(dedicated) == len(names)
    assert len(groups) == 4
    assert not dedicated & groups
    assert L.runner_name(aimodel="group-x") != L.runner_name(share_group="x")


def test_runner_pods_meet_pod_security_restricted():
    deployment = build_runner_deployment(RunnerPlan.dedicated("ns", member()), SETTINGS)
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container(deployment)["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}


def test_capacity_is_routing_data_not_pod_data():
    one = build_runner_deployment(RunnerPlan.dedicated("ns", member(capacity=1)), SETTINGS)
    four = build_runner_deployment(RunnerPlan.dedicated("ns", member(capacity=4)), SETTINGS)
    assert one["spec"]["template"] == four["spec"]["template"]


def test_service_is_headless():
    service = build_runner_service(RunnerPlan.dedicated("ns", member()), SETTINGS)
    assert service["spec"]["clusterIP"] == "None"


def test_model_cache_refuses_host_paths():
    with pytest.raises(ValueError, match="hostPath"):
        member(modelCache={"volume": {"hostPath": {"path": "/"}}})
    cached = member(modelCache={"volume": {"persistentVolumeClaim": {"claimName": "models"}}})
    [volume] = build_runner_deployment(RunnerPlan.dedicated("ns", cached), SETTINGS)["spec"][
        "template"
    ]["spec"]["volumes"]
    assert volume == {"name": "models", "persistentVolumeClaim": {"claimName": "models"}}


def test_building_twice_gives_the_same_manifest():
    plan = RunnerPlan.dedicated("ns", member(env=[{"name": "A", "value": "1"}]))
    assert build_runner_deployment(plan, SETTINGS) == build_runner_deployment(plan, SETTINGS)
