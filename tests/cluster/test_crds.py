"""The generated CRDs on a real API server: samples apply, nonsense is refused, kubectl explains."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from kubepeer.api import GROUP, VERSION, AIModelSpec, LiveRunnerSpec, Pipeline, PricingSpec
from tests.conftest import REPO

pytestmark = pytest.mark.cluster


def test_every_sample_applies_cleanly(crds, namespace):
    result = crds.kubectl("-n", namespace, "apply", "-f", str(REPO / "manifests"))
    samples = sorted(p.stem.removeprefix("aimodel-") for p in (REPO / "manifests").glob("*.yaml"))
    assert result.stdout.count(" created") == len(samples)
    listed = json.loads(crds.kubectl("-n", namespace, "get", "kubepeer", "-o", "json").stdout)
    assert len(listed["items"]) == len(samples)


def test_server_fills_in_the_policy_defaults(crds, namespace):
    crds.kubectl("-n", namespace, "apply", "-f", "-", stdin=aimodel_yaml("plain", {}))
    stored = json.loads(
        crds.kubectl("-n", namespace, "get", "aimodel", "plain", "-o", "json").stdout
    )
    assert stored["spec"]["warm"] == {"policy": "Always", "maxReplicas": 1, "idleTimeout": "10m"}
    assert stored["spec"]["gpu"] == {"count": 1}
    assert stored["spec"]["capacity"] == 1


def resource_yaml(kind: str, name: str, spec: dict[str, Any]) -> str:
    return yaml.safe_dump(
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name}, "spec": spec}
    )


def aimodel_yaml(name: str, spec: dict[str, Any]) -> str:
    return resource_yaml("AIModel", name, {"pipeline": "text-to-image", "modelId": "org/model",
                                           **spec})  # fmt: skip


INVALID = [
    ("unknown-pipeline", {"pipeline": "text-to-3d"}, "spec.pipeline"),
    ("empty-model-id", {"modelId": ""}, "spec.modelId"),
    ("negative-capacity", {"capacity": -1}, "spec.capacity"),
    ("min-over-max", {"warm": {"minReplicas": 3, "maxReplicas": 2}}, "spec.warm.minReplicas"),
    (
        "on-demand-floor",
        {"warm": {"policy": "OnDemand", "minReplicas": 1}},
        "spec.warm.minReplicas",
    ),
    ("bad-policy", {"warm": {"policy": "Sometimes"}}, "spec.warm.policy"),
    ("bad-idle-timeout", {"warm": {"idleTimeout": "ten minutes"}}, "spec.warm.idleTimeout"),
    ("bad-vram", {"gpu": {"minMemory": "lots"}}, "spec.gpu.minMemory"),
    ("too-many-gpus", {"gpu": {"count": 9}}, "spec.gpu.count"),
    ("share-group-two-gpus", {"gpu": {"count": 2, "shareGroup": "small"}}, "spec.gpu.shareGroup"),
    ("unknown-optimization", {"optimizations": ["WARP_DRIVE"]}, "spec.optimizations[0]"),
    ("replicas-over-max", {"replicas": 5, "warm": {"maxReplicas": 2}}, "spec.replicas"),
    ("unknown-unit", {"pricing": {"price": {"pricePerUnit": "1", "unit": "furlong"}}}, "unit"),
    (
        "unit-wrong-for-pipeline",
        {"pricing": {"price": {"pricePerUnit": "1", "unit": "token"}}},
        "unit",
    ),
    ("usd-without-rate", {"pricing": {"price": {"pricePerUnit": "1", "currency": "USD"}}}, "price"),
    (
        "ref-and-price",
        {"pricing": {"ref": "default", "price": {"pricePerUnit": "1"}}},
        "spec.pricing",
    ),
    ("negative-price", {"pricing": {"price": {"pricePerUnit": "-1"}}}, "pricePerUnit"),
]


@pytest.mark.parametrize(("name", "spec", "field"), INVALID, ids=[n for n, _, _ in INVALID])
def test_invalid_aimodel_is_rejected_naming_the_field(crds, namespace, name, spec, field):
    assert_refused_naming(crds, namespace, aimodel_yaml(name, spec), field, AIModelSpec)


def assert_refused_naming(crds, namespace: str, text: str, field: str, model: Any) -> None:
    """The API server refuses the object, naming `field`, and stores nothing; the pydantic
    model refuses the same spec: one source of truth, two enforcers."""
    body = yaml.safe_load(text)
    result = crds.kubectl("-n", namespace, "apply", "-f", "-", stdin=text, check=False)
    assert result.returncode != 0
    assert "is invalid" in result.stderr
    assert field in result.stderr, result.stderr
    name, kind = body["metadata"]["name"], body["kind"].lower()
    assert crds.kubectl("-n", namespace, "get", kind, name, check=False).returncode != 0
    with pytest.raises(ValidationError):
        model.model_validate(body["spec"])


def live_runner_yaml(name: str, spec: dict[str, Any]) -> str:
    full = {"app": "examples/echo", "image": "example.invalid/app:v1", **spec}
    return resource_yaml("LiveRunner", name, full)


INVALID_LIVE = [
    ("no-image", {"image": ""}, "spec.image"),
    ("app-with-spaces", {"app": " echo "}, "spec.app"),
    ("bad-mode", {"mode": "forever"}, "spec.mode"),
    ("no-capacity", {"capacity": 0}, "spec.capacity"),
    ("port-out-of-range", {"port": 70000}, "spec.port"),
    ("relative-health-path", {"healthPath": "health"}, "spec.healthPath"),
    ("unhealthy-status", {"healthyStatusCode": 500}, "spec.healthyStatusCode"),
    ("metadata-too-long", {"metadata": "x" * 1025}, "spec.metadata"),
    ("share-group", {"gpu": {"shareGroup": "small"}}, "spec.gpu.shareGroup"),
    ("replicas-over-max", {"replicas": 3, "warm": {"maxReplicas": 2}}, "spec.replicas"),
    ("free", {"pricing": {"price": {"amount": "0.0"}}}, "spec.pricing.price.amount"),
    ("per-minute", {"pricing": {"price": {"amount": "1", "unit": "minute"}}}, "unit"),
    ("ref-and-price", {"pricing": {"ref": "default", "price": {"amount": "1"}}}, "spec.pricing"),
]


@pytest.mark.parametrize(
    ("name", "spec", "field"), INVALID_LIVE, ids=[n for n, _, _ in INVALID_LIVE]
)
def test_invalid_live_runner_is_rejected_naming_the_field(crds, namespace, name, spec, field):
    assert_refused_naming(crds, namespace, live_runner_yaml(name, spec), field, LiveRunnerSpec)


def test_server_fills_in_a_live_runners_defaults_and_scales_it(crds, namespace):
    spec = {"warm": {"policy": "OnDemand", "maxReplicas": 2}}
    crds.kubectl("-n", namespace, "apply", "-f", "-", stdin=live_runner_yaml("plain", spec))
    crds.kubectl("-n", namespace, "scale", "liverunner", "plain", "--replicas", "2")
    stored = json.loads(crds.kubectl("-n", namespace, "get", "lr", "plain", "-o", "json").stdout)[
        "spec"
    ]
    assert (stored["mode"], stored["capacity"], stored["port"]) == ("persistent", 1, 8080)
    assert (stored["healthPath"], stored["healthyStatusCode"]) == ("/health", 200)
    assert stored["gpu"] == {"count": 1}
    assert stored["warm"] == {"policy": "OnDemand", "maxReplicas": 2, "idleTimeout": "10m"}
    assert stored["replicas"] == 2
    refused = crds.kubectl(
        "-n", namespace, "scale", "liverunner", "plain", "--replicas", "3", check=False
    )
    assert refused.returncode != 0


def test_a_pricing_needs_a_job_price_or_an_app_price(crds, namespace):
    apps = resource_yaml("Pricing", "apps-only", {"apps": [{"app": "*", "amount": "1000000"}]})
    crds.kubectl("-n", namespace, "apply", "-f", "-", stdin=apps)
    empty = resource_yaml("Pricing", "empty", {})
    refused = crds.kubectl("-n", namespace, "apply", "-f", "-", stdin=empty, check=False)
    assert refused.returncode != 0
    assert "spec.prices or spec.apps" in refused.stderr


def test_unknown_field_is_rejected_by_strict_field_validation(crds, namespace):
    result = crds.kubectl(
        "-n",
        namespace,
        "apply",
        "-f",
        "-",
        stdin=aimodel_yaml("typo", {"capasity": 2}),
        check=False,
    )
    assert result.returncode != 0
    assert 'unknown field "spec.capasity"' in result.stderr


def test_usd_pricing_without_a_rate_is_rejected(crds, namespace):
    pricing = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Pricing",
        "metadata": {"name": "no-rate"},
        "spec": {"prices": [{"pipeline": "llm", "pricePerUnit": "0.0001", "currency": "USD"}]},
    }
    result = crds.kubectl(
        "-n", namespace, "apply", "-f", "-", stdin=yaml.safe_dump(pricing), check=False
    )
    assert result.returncode != 0
    assert "spec.prices" in result.stderr
    assert "usdPerEth" in result.stderr


def test_kubectl_scale_updates_spec_replicas(crds, namespace):
    spec = {"warm": {"policy": "OnDemand", "maxReplicas": 3}}
    crds.kubectl("-n", namespace, "apply", "-f", "-", stdin=aimodel_yaml("scalable", spec))
    crds.kubectl("-n", namespace, "scale", "aimodel", "scalable", "--replicas", "2")
    stored = json.loads(
        crds.kubectl("-n", namespace, "get", "aimodel", "scalable", "-o", "json").stdout
    )
    assert stored["spec"]["replicas"] == 2

    refused = crds.kubectl(
        "-n", namespace, "scale", "aimodel", "scalable", "--replicas", "4", check=False
    )
    assert refused.returncode != 0
    assert "spec.replicas must not exceed spec.warm.maxReplicas" in refused.stderr


def test_kubectl_get_shows_the_printer_columns(crds, namespace):
    crds.kubectl("-n", namespace, "apply", "-f", str(REPO / "manifests" / "aimodel-llm.yaml"))
    out = crds.kubectl("-n", namespace, "get", "aimodels").stdout.splitlines()
    assert out[0].split() == ["NAME", "PIPELINE", "MODEL", "POLICY", "READY", "PHASE", "AGE"]
    assert out[1].split()[:4] == ["llm", "llm", "meta-llama/Meta-Llama-3.1-8B-Instruct", "Always"]


def test_kubectl_explain_teaches_the_warm_policy(crds):
    out = crds.kubectl("explain", "aimodel.spec.warm").stdout
    assert "The warm-start policy." in out
    for field in ("policy", "minReplicas", "maxReplicas", "idleTimeout"):
        assert field in out
    policy = " ".join(crds.kubectl("explain", "aimodel.spec.warm.policy").stdout.split())
    assert "scale to zero" in policy
    assert "Always" in policy
    assert "OnDemand" in policy


# --- property: the pydantic model and the API server agree on what is valid ---


def around(low: int, high: int) -> st.SearchStrategy[int]:
    """Integers in and just outside [low, high], the edges drawn often."""
    return st.one_of(
        st.sampled_from([low - 1, low, high, high + 1]), st.integers(low - 1, high + 1)
    )


def mostly(valid: list[Any], invalid: list[Any]) -> st.SearchStrategy[Any]:
    """Valid values four times as often as invalid ones, so whole specs are often valid."""
    return st.sampled_from(valid * 4 + invalid)


pipelines = mostly([p.value for p in Pipeline], ["text-to-3d", ""])
model_ids = mostly(["org/model", "model", "a/b/c"], ["", "/lead", "bad id", "x" * 300])
memory = mostly(["24Gi", "80G", "1.5Gi", "512"], ["lots", "24 Gi", "-1Gi"])
durations = mostly(["90s", "10m", "1h30m", "500ms"], ["ten", "10", "1d"])
prices = st.fixed_dictionaries(
    {"pricePerUnit": mostly(["1", "0.004", "1e-9", "1.5E3"], ["-1", "abc"])},
    optional={
        "unit": mostly(["pixel", "millisecond", "character", "token", "request"], ["yard"]),
        "currency": mostly(["USD", "ETH", "wei"], ["EUR"]),
        "usdPerEth": mostly(["3000", "2.5e3"], ["x"]),
        "pixelsPerUnit": around(1, 10**12),
    },
)
specs = st.fixed_dictionaries(
    {"pipeline": pipelines, "modelId": model_ids},
    optional={
        "capacity": around(1, 64),
        "replicas": around(0, 64),
        "optimizations": st.lists(
            st.sampled_from(["SFAST", "DEEPCACHE", "BFLOAT16", "NOPE"]), max_size=2, unique=True
        ),
        "gpu": st.fixed_dictionaries(
            {},
            optional={
                "count": around(0, 8),
                "minMemory": memory,
                "shareGroup": mostly(["small"], ["Bad_Group", "a" * 70]),
            },
        ),
        "warm": st.fixed_dictionaries(
            {},
            optional={
                "policy": mostly(["Always", "OnDemand"], ["Never"]),
                "minReplicas": around(0, 64),
                "maxReplicas": around(1, 64),
                "idleTimeout": durations,
            },
        ),
        "pricing": st.one_of(
            st.fixed_dictionaries({"ref": st.sampled_from(["default", "Not_A_Name"])}),
            st.fixed_dictionaries({"price": prices}),
            st.fixed_dictionaries({"ref": st.just("default"), "price": prices}),
            st.just({}),
        ),
    },
)


def _server_accepts(
    custom: client.CustomObjectsApi, namespace: str, kind: str, plural: str, spec: dict
) -> bool:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": kind,
        "metadata": {"name": "probe"},
        "spec": spec,
    }
    try:
        custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, plural, body, dry_run="All"
        )
    except ApiException as exc:
        if exc.status != 422:
            raise
        return False
    return True


def _model_accepts(model: type, spec: dict) -> bool:
    try:
        model.model_validate(spec)
    except ValidationError:
        return False
    return True


def assert_model_and_server_agree(
    api, namespace: str, kind: str, plural: str, model: type, spec: dict
) -> None:
    accepted = _model_accepts(model, spec)
    event(f"model accepts: {accepted}")
    custom = client.CustomObjectsApi(api)
    assert _server_accepts(custom, namespace, kind, plural, spec) == accepted, spec


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(spec=specs)
def test_model_and_api_server_agree_on_aimodel_validity(crds, api, namespace, spec):
    assert_model_and_server_agree(api, namespace, "AIModel", "aimodels", AIModelSpec, spec)


pricing_entries = st.fixed_dictionaries(
    {
        "pipeline": st.sampled_from([p.value for p in Pipeline] + ["*", "text-to-3d"]),
        "pricePerUnit": st.sampled_from(["1", "0.06", "-2"]),
    },
    optional={
        "modelId": st.sampled_from(["*", "depth", ""]),
        "unit": st.sampled_from(["pixel", "millisecond", "token", "character", "request"]),
        "currency": st.sampled_from(["USD", "wei"]),
        "usdPerEth": st.just("3000"),
        "gateway": st.sampled_from(
            ["0x5be44e23041e93cdf9bcd5a0968524e104e38ae1", "0x123", "default"]
        ),
    },
)
pricing_specs = st.fixed_dictionaries(
    {"prices": st.lists(pricing_entries, max_size=3)},
    optional={
        "usdPerEth": st.sampled_from(["3000", "bad"]),
        "surge": st.fixed_dictionaries(
            {},
            optional={
                "utilizationThreshold": st.sampled_from([0, 0.5, 0.99, 1, 1.5, -0.1]),
                "maxMultiplier": st.sampled_from([1, 2.5, 100, 101, 0.5]),
            },
        ),
    },
)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(spec=pricing_specs)
def test_model_and_api_server_agree_on_pricing_validity(crds, api, namespace, spec):
    assert_model_and_server_agree(api, namespace, "Pricing", "pricings", PricingSpec, spec)
