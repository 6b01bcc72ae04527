"""LiveRunner: the model refuses what go-livepeer refuses, and the operator's pure builders
turn one into an app Deployment that no AIModel machinery mistakes for its own."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from kubepeer.api import AIModelSpec, LiveRunner, LiveRunnerSpec, Phase, PricingSpec
from kubepeer.api.pricing import AppUnit, match_app_price
from kubepeer.contracts import labels as L
from kubepeer.controller.builders import Member as AIModelMember
from kubepeer.controller.builders import RunnerPlan, build_runner_deployment
from kubepeer.controller.handlers import LIVE_OURS, OURS
from kubepeer.controller.live_runners import (
    NoAppPrice,
    build_live_runner,
    live_runner_status,
    resolve_app_price,
)
from kubepeer.controller.settings import OperatorSettings
from kubepeer.livepeer.price_feed import EthUsd

SETTINGS = OperatorSettings(runner_image="runner:default", startup_timeout_seconds=900)
PRICE = {"price": {"amount": "3.50", "currency": "USD", "unit": "hour"}}


def spec(**fields: Any) -> LiveRunnerSpec:
    return LiveRunnerSpec.model_validate({"app": "examples/echo", "image": "apps:1", **fields})


def body(name: str = "echo", generation: int = 1, **fields: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubepeer.io/v1alpha1",
        "kind": "LiveRunner",
        "metadata": {"name": name, "namespace": "ns", "uid": "uid-1", "generation": generation},
        "spec": {"app": "examples/echo", "image": "apps:1", "pricing": PRICE, **fields},
    }


# --- the resource ---


def test_defaults_are_go_livepeers():
    s = spec()
    assert (s.mode.value, s.capacity, s.port, s.health_path) == ("persistent", 1, 8080, "/health")
    assert s.healthy_status_code == 200
    assert s.desired_replicas == 1  # Always keeps one warm
    assert spec(warm={"policy": "OnDemand"}).desired_replicas == 0


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"app": " echo"}, "app"),  # go-livepeer: no surrounding spaces
        ({"app": ""}, "app"),
        ({"mode": "forever"}, "mode"),
        ({"capacity": 0}, "capacity"),
        ({"metadata": "é" * 513}, "metadata"),  # 1,026 bytes of UTF-8 in 513 characters
        ({"metadata": "bad \ufffd byte"}, "metadata"),
        ({"healthyStatusCode": 500}, "healthyStatusCode"),
        ({"healthPath": "health"}, "healthPath"),
        ({"gpu": {"shareGroup": "small"}}, "shareGroup"),
        ({"replicas": 3, "warm": {"maxReplicas": 2}}, "replicas"),
        ({"pricing": {"price": {"amount": "0"}}}, "amount"),
        ({"pricing": {"price": {"amount": "1", "unit": "minute"}}}, "unit"),
        ({"pricing": {"ref": "default", "price": {"amount": "1"}}}, "pricing"),
        ({"pricing": {}}, "pricing"),
        ({"imagePullPolicy": "Always"}, "imagePullPolicy"),  # unknown fields are refused
        ({"pricing": {"price": {"amount": "1e31"}}}, "out of range"),
        ({"pricing": {"price": {"amount": "1e-99999999999999"}}}, "out of range"),
    ],
)
def test_invalid_live_runner_is_refused_naming_the_field(fields, field):
    with pytest.raises(ValidationError) as refused:
        spec(**fields)
    assert field in str(refused.value)


def test_metadata_is_measured_in_bytes_not_characters():
    assert spec(metadata="é" * 512).metadata == "é" * 512  # 1,024 bytes: the limit


def test_a_pricing_may_hold_only_app_prices_but_not_nothing():
    apps_only = PricingSpec.model_validate({"apps": [{"app": "*", "amount": "1"}]})
    assert apps_only.prices == []
    with pytest.raises(ValidationError, match=r"spec\.prices or spec\.apps"):
        PricingSpec.model_validate({})


def test_an_apps_own_price_beats_the_wildcard():
    entries = PricingSpec.model_validate(
        {
            "apps": [
                {"app": "*", "amount": "1", "currency": "wei"},
                {"app": "examples/echo", "amount": "2", "unit": "fixed"},
            ]
        }
    ).apps
    own = match_app_price(entries, "examples/echo")
    assert own is not None
    assert (str(own.amount), own.unit) == ("2", AppUnit.FIXED)
    other = match_app_price(entries, "examples/other")
    assert other is not None
    assert (str(other.amount), other.currency.value) == ("1", "wei")
    assert match_app_price(entries[1:], "examples/other") is None


def test_an_apps_price_comes_inline_by_reference_or_from_the_namespace():
    echo = PricingSpec.model_validate({"apps": [{"app": "examples/echo", "amount": "1"}]})
    anything = PricingSpec.model_validate({"apps": [{"app": "*", "amount": "9"}]})
    assert str(resolve_app_price(spec(pricing=PRICE), {}).amount) == "3.50"
    assert str(resolve_app_price(spec(pricing={"ref": "echo"}), {"echo": echo}).amount) == "1"
    # Unreferenced: the app's own entry in any Pricing beats a '*' in any, whatever the names.
    both = {"a-anything": anything, "z-echo": echo}
    assert str(resolve_app_price(spec(), both).amount) == "1"
    assert str(resolve_app_price(spec(app="examples/other"), both).amount) == "9"


@pytest.mark.parametrize(
    ("fields", "pricings", "named"),
    [
        ({"pricing": {"ref": "gone"}}, {}, "'gone'"),
        ({"app": "examples/other", "pricing": {"ref": "echo"}}, {"echo": True}, "examples/other"),
        ({}, {}, "no Pricing in this namespace"),
    ],
)
def test_no_price_says_what_is_missing(fields, pricings, named):
    echo = PricingSpec.model_validate({"apps": [{"app": "examples/echo", "amount": "1"}]})
    with pytest.raises(NoAppPrice, match=named):
        resolve_app_price(spec(**fields), {name: echo for name in pricings})


# --- the app's manifests ---


def test_the_app_runs_its_image_on_its_port_probed_at_its_health_path():
    service, deployment = build_live_runner(
        "ns",
        "echo",
        "uid-1",
        spec(
            command=["/app"],
            args=["echo"],
            port=9000,
            healthPath="/ready",
            capacity=4,
            gpu={"count": 1, "products": ["NVIDIA-L4"], "minMemory": "24Gi"},
            env=[{"name": "MODE", "value": "fast"}],
        ),
        SETTINGS,
    )
    pod = deployment["spec"]["template"]["spec"]
    [app] = pod["containers"]
    assert deployment["metadata"]["name"] == service["metadata"]["name"] == "live-echo"
    assert (app["image"], app["command"], app["args"]) == ("apps:1", ["/app"], ["echo"])
    assert app["ports"] == [{"name": "http", "containerPort": 9000, "protocol": "TCP"}]
    assert app["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert "livenessProbe" not in app  # go-livepeer hides an unhealthy runner, restarts none
    assert app["env"] == [{"name": "MODE", "value": "fast"}]
    assert app["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    expressions = terms["nodeSelectorTerms"][0]["matchExpressions"]
    assert {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-L4"]} in (
        expressions
    )
    assert {"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": ["24575"]} in expressions
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
        pod["tolerations"]
    )
    assert app["securityContext"]["runAsNonRoot"]
    assert not pod["automountServiceAccountToken"]
    assert service["spec"]["ports"][0]["port"] == 9000
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    [owner] = deployment["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("LiveRunner", "echo", "uid-1")
    assert deployment["metadata"]["annotations"][L.LIVE_RUNNER_ANNOTATION] == "echo"


def test_warm_policy_sets_replicas_and_priority():
    warm = build_live_runner("ns", "a", "u", spec(), SETTINGS)[1]
    cold = build_live_runner("ns", "a", "u", spec(warm={"policy": "OnDemand"}), SETTINGS)[1]
    woken = build_live_runner(
        "ns", "a", "u", spec(warm={"policy": "OnDemand", "maxReplicas": 3}, replicas=2), SETTINGS
    )[1]
    assert warm["spec"]["replicas"] == 1
    assert warm["spec"]["template"]["spec"]["priorityClassName"] == SETTINGS.warm_priority_class
    assert cold["spec"]["replicas"] == 0
    assert cold["spec"]["template"]["spec"]["priorityClassName"] == SETTINGS.cold_priority_class
    assert woken["spec"]["replicas"] == 2


def test_a_changed_spec_changes_the_content_hash_and_an_equal_one_does_not():
    def stamp(s: LiveRunnerSpec) -> str:
        return build_live_runner("ns", "a", "u", s, SETTINGS)[1]["metadata"]["annotations"][
            L.CONTENT_HASH
        ]

    assert stamp(spec()) == stamp(spec())
    assert stamp(spec()) != stamp(spec(image="apps:2"))


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_the_operators_watches_keep_apps_and_model_runners_apart():
    """An app's Deployment must never be taken for an orphaned AIModel runner (which the
    operator would delete), nor a runner for an app."""
    app = build_live_runner("ns", "runner-x", "u", spec(), SETTINGS)[1]
    member = AIModelMember(
        name="x", uid="u", spec=AIModelSpec.model_validate({"pipeline": "llm", "modelId": "org/m"})
    )
    runner = build_runner_deployment(RunnerPlan.dedicated("ns", member), SETTINGS)
    assert app["metadata"]["name"] != runner["metadata"]["name"]  # live-runner-x, runner-x
    assert _matches(LIVE_OURS, app["metadata"]["labels"])
    assert not _matches(OURS, app["metadata"]["labels"])
    assert _matches(OURS, runner["metadata"]["labels"])
    assert not _matches(LIVE_OURS, runner["metadata"]["labels"])
    assert L.RUNNER not in app["spec"]["template"]["metadata"]["labels"]  # the runner pod watch
    assert L.LIVE_RUNNER not in runner["spec"]["template"]["metadata"]["labels"]


# --- status ---

NOW = datetime(2026, 12, 7, tzinfo=UTC)


def summary(built: dict[str, Any], ready: int, replicas: int | None = None) -> dict[str, Any]:
    """The operator's index entry for a Deployment the controller has rolled out."""
    replicas = ready if replicas is None else replicas
    return {
        "hash": built["metadata"]["annotations"][L.CONTENT_HASH],
        "metadata": {"name": built["metadata"]["name"], "generation": 1},
        "spec": {"replicas": built["spec"]["replicas"]},
        "status": {
            "observedGeneration": 1,
            "replicas": replicas,
            "readyReplicas": ready,
            "updatedReplicas": replicas,
            "availableReplicas": ready,
        },
    }


AT_3000 = EthUsd(answer=3000 * 10**8, decimals=8, round_id=7, updated_at=1, feed="0xfeed",
                 read_at=NOW.timestamp())  # fmt: skip


def priced(status) -> tuple[str, str]:
    condition = next(c for c in status.conditions if c.type == "Priced")
    return condition.status.value, condition.message


def test_status_is_ready_when_the_rolled_out_app_is_and_carries_its_price_in_wei():
    b = body()
    built = build_live_runner("ns", "echo", "uid-1", LiveRunner.model_validate(b).spec, SETTINGS)
    status = live_runner_status(SETTINGS, b, summary(built[1], 1), [], {}, NOW, AT_3000)
    assert status.phase is Phase.READY
    assert status.selector == f"{L.LIVE_RUNNER}=live-echo"
    assert priced(status)[0] == "True"
    assert status.price is not None
    wire = status.price.to_wire()  # 3.50 USD an hour at 3,000 USD (live-runner-wire.md 8)
    assert wire == {"wei": "324074074074", "unit": "seconds", "usdPerEth": "3000",
                    "feed": "0xfeed", "roundId": "7", "readAt": NOW.isoformat().replace(
                        "+00:00", "Z")}  # fmt: skip


def test_a_price_too_large_to_advertise_is_no_price():
    """1e30 USD at a rate of 1e-8 USD per ETH is 1e56 wei: more digits than a price has."""
    b = body(pricing={"price": {"amount": "1e30", "unit": "fixed"}})
    absurd = EthUsd(answer=1, decimals=8, round_id=1, updated_at=1, feed="0xfeed", read_at=0.0)
    status = live_runner_status(SETTINGS, b, None, [], {}, NOW, absurd)
    assert status.price is None
    state, message = priced(status)
    assert state == "False"
    assert "digits of wei" in message


def test_a_usd_price_waits_for_a_rate_and_a_wei_price_does_not():
    b = body()
    built = build_live_runner("ns", "echo", "uid-1", LiveRunner.model_validate(b).spec, SETTINGS)
    waiting = live_runner_status(SETTINGS, b, summary(built[1], 1), [], {}, NOW, None)
    assert waiting.price is None
    assert waiting.phase is Phase.READY  # it runs; it is only not offered for money yet
    state, message = priced(waiting)
    assert state == "False"
    assert "no ETH/USD rate" in message
    in_wei = body(pricing={"price": {"amount": "36000", "currency": "wei", "unit": "hour"}})
    status = live_runner_status(SETTINGS, in_wei, None, [], {}, NOW, None)
    assert status.price is not None
    assert (status.price.wei, status.price.unit, status.price.feed) == ("10", "seconds", None)
    tiny = body(pricing={"price": {"amount": "100", "currency": "wei", "unit": "hour"}})
    state, message = priced(live_runner_status(SETTINGS, tiny, None, [], {}, NOW, None))
    assert state == "False"
    assert "under 1 wei" in message


def test_status_waits_for_the_current_spec_and_says_when_no_price_applies():
    b = body(image="apps:2")
    stale = build_live_runner("ns", "echo", "uid-1", spec(), SETTINGS)[1]  # apps:1 serves
    b["spec"].pop("pricing")
    status = live_runner_status(SETTINGS, b, summary(stale, 1), [], {}, NOW)
    assert status.phase is Phase.LOADING  # the old version serves while the new one rolls
    priced = next(c for c in status.conditions if c.type == "Priced")
    assert (priced.status.value, priced.reason) == ("False", "PricingNotFound")


def test_status_of_an_idle_and_of_an_invalid_app():
    idle = body(warm={"policy": "OnDemand"})
    built = build_live_runner("ns", "echo", "u", LiveRunner.model_validate(idle).spec, SETTINGS)
    assert live_runner_status(SETTINGS, idle, summary(built[1], 0), [], {}, NOW).phase is (
        Phase.IDLE
    )
    broken = body(capacity=0)  # the API server refuses it; an older CRD might not have
    status = live_runner_status(SETTINGS, broken, None, [], {}, NOW)
    assert status.phase is Phase.FAILED
    assert "capacity" in next(c for c in status.conditions if c.type == "Ready").message
