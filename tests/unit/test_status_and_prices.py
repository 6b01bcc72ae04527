"""Status from observed objects, prices from Pricings, idleness from demand: pure functions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import pytest

from kubepeer.api import AIModelSpec, AIModelStatus, Phase, PricingSpec
from kubepeer.contracts.demand import Demand, idle_for
from kubepeer.contracts.price_table import price_info
from kubepeer.controller.prices import (
    PricingProblem,
    TableRow,
    ai_models_json,
    models_table,
    resolve_price,
)
from kubepeer.controller.status import Observed, compute_status

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def deployment(
    replicas: int, ready: int, updated: int | None = None, generation: int = 1
) -> dict[str, Any]:
    """A Deployment whose controller has seen `generation`: `updated` of its replicas run
    the newest template (all of them unless said), `ready` are available."""
    return {
        "metadata": {"generation": generation},
        "status": {
            "observedGeneration": generation,
            "replicas": replicas,
            "readyReplicas": ready,
            "availableReplicas": ready,
            "updatedReplicas": replicas if updated is None else updated,
        },
    }


def pod(
    scheduled: bool = True, ready_at: datetime | None = None, unschedulable: str | None = None
) -> dict[str, Any]:
    conditions = []
    if unschedulable:
        conditions.append(
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
             "message": unschedulable}
        )  # fmt: skip
    if ready_at:
        conditions.append(
            {"type": "Ready", "status": "True", "lastTransitionTime": ready_at.isoformat()}
        )
    return {
        "metadata": {"name": "p"},
        "spec": {"nodeName": "n"} if scheduled else {},
        "status": {"conditions": conditions},
    }


def observe(desired: int, dep: dict[str, Any] | None, pods: list[dict[str, Any]], **kw: Any):
    return Observed(desired=desired, generation=3, deployment=dep, pods=pods, selector="s", **kw)


def condition(status: AIModelStatus, type_: str):
    return next(c for c in status.conditions if c.type == type_)


def test_all_replicas_ready_is_ready():
    status = compute_status(observe(2, deployment(2, 2), [pod(), pod()]), None, NOW)
    assert status.phase is Phase.READY
    assert condition(status, "Ready").reason == "AllReplicasReady"
    assert status.observed_generation == 3


def test_scheduled_but_not_ready_is_loading():
    status = compute_status(observe(1, deployment(1, 0), [pod()]), None, NOW)
    assert status.phase is Phase.LOADING


def test_no_node_fits_is_pending_where_a_gpu_pool_may_scale_from_zero():
    message = "0/2 nodes are available: 2 node(s) didn't match Pod's node affinity/selector."
    unschedulable = [pod(scheduled=False, unschedulable=message)]
    status = compute_status(observe(1, deployment(1, 0), unschedulable), None, NOW)
    assert status.phase is Phase.PENDING
    assert condition(status, "Ready").reason == "Unschedulable"
    assert message in condition(status, "Ready").message


def test_no_node_fits_is_failed_with_the_schedulers_words_where_nodes_are_fixed():
    message = "0/2 nodes are available: 2 node(s) didn't match Pod's node affinity/selector."
    status = compute_status(
        observe(1, deployment(1, 0), [pod(scheduled=False, unschedulable=message)],
                nodes_fixed=True),
        None,
        NOW,
    )  # fmt: skip
    assert status.phase is Phase.FAILED
    assert condition(status, "Ready").reason == "Unschedulable"
    assert message in condition(status, "Degraded").message


def test_gpus_merely_busy_is_pending_not_failed():
    message = "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."
    status = compute_status(
        observe(1, deployment(1, 0), [pod(scheduled=False, unschedulable=message)]), None, NOW
    )
    assert status.phase is Phase.PENDING
    assert condition(status, "Ready").reason == "Unschedulable"


def test_crash_looping_runner_is_a_failed_load():
    crashing = pod()
    crashing["status"]["containerStatuses"] = [
        {
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"message": "CUDA out of memory"}},
        }
    ]
    status = compute_status(observe(1, deployment(1, 0), [crashing]), None, NOW)
    assert status.phase is Phase.FAILED
    assert condition(status, "Degraded").reason == "ModelLoadFailed"
    assert "CUDA out of memory" in condition(status, "Degraded").message


def test_ready_only_when_the_current_spec_has_rolled_out():
    # The old replica still serves; the new template's replica is not available yet.
    rolling = compute_status(observe(1, deployment(2, 1, updated=1), [pod(), pod()]), None, NOW)
    assert rolling.phase is Phase.LOADING
    assert condition(rolling, "Ready").reason == "RollingOut"
    # The Deployment still carries the previous spec of the AIModel.
    stale = compute_status(observe(1, deployment(1, 1), [pod()], current=False), None, NOW)
    assert stale.phase is not Phase.READY
    # The controller has not seen the Deployment's latest generation yet.
    unseen = deployment(1, 1, generation=2)
    unseen["status"]["observedGeneration"] = 1
    assert compute_status(observe(1, unseen, [pod()]), None, NOW).phase is not Phase.READY


def test_a_crash_looping_new_version_is_degraded_while_the_old_one_serves():
    crashing = pod()
    crashing["status"]["containerStatuses"] = [
        {"state": {"waiting": {"reason": "CrashLoopBackOff"}}}
    ]
    status = compute_status(observe(1, deployment(2, 1, updated=1), [pod(), crashing]), None, NOW)
    assert status.phase is Phase.DEGRADED
    assert condition(status, "Ready").reason == "ModelLoadFailed"


def test_a_stalled_rollout_says_so():
    stalled = deployment(2, 1, updated=1)
    stalled["status"]["conditions"] = [
        {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
         "message": 'ReplicaSet "r" has timed out progressing.'}
    ]  # fmt: skip
    status = compute_status(observe(1, stalled, [pod(), pod()]), None, NOW)
    assert condition(status, "Ready").reason == "ProgressDeadlineExceeded"
    assert "timed out" in condition(status, "Degraded").message


def test_some_ready_is_degraded():
    status = compute_status(observe(2, deployment(2, 1), [pod(), pod()]), None, NOW)
    assert status.phase is Phase.DEGRADED


def test_zero_wanted_is_idle():
    status = compute_status(observe(0, deployment(0, 0), []), None, NOW)
    assert status.phase is Phase.IDLE
    assert condition(status, "Ready").reason == "ScaledToZero"


def test_invalid_spec_is_failed_whatever_the_cluster_says():
    status = compute_status(observe(1, None, [], invalid="mixes runner images"), None, NOW)
    assert status.phase is Phase.FAILED
    assert condition(status, "Ready").reason == "InvalidSpec"


def test_transition_time_moves_only_when_the_status_changes():
    first = compute_status(observe(1, deployment(1, 0), [pod()]), None, NOW)
    later = NOW + timedelta(seconds=30)
    same = compute_status(observe(1, deployment(1, 0), [pod()]), first, later)
    assert condition(same, "Ready").last_transition_time == NOW
    ready = compute_status(observe(1, deployment(1, 1), [pod()]), same, later)
    assert condition(ready, "Ready").last_transition_time == later


def test_cold_start_runs_from_scale_up_to_the_first_ready_pod():
    woken = AIModelStatus(last_scale_up_time=NOW, observed_generation=3)
    became_ready = NOW + timedelta(seconds=42)
    status = compute_status(
        observe(1, deployment(1, 1), [pod(ready_at=became_ready)]),
        woken,
        NOW + timedelta(seconds=45),
    )
    assert status.last_cold_start_seconds == 42


def test_missing_pricing_is_a_condition():
    status = compute_status(
        observe(1, deployment(1, 1), [pod()], pricing_problem="Pricing 'x' not found"), None, NOW
    )
    priced = condition(status, "Priced")
    assert (priced.status.value, priced.reason) == ("False", "PricingNotFound")


# --- prices ---


def spec(**kw: Any) -> AIModelSpec:
    return AIModelSpec.model_validate({"pipeline": "text-to-image", "modelId": "org/m", **kw})


PRICING = PricingSpec.model_validate(
    {
        "usdPerEth": "2000",
        "prices": [
            {"pipeline": "*", "pricePerUnit": "7"},
            {"pipeline": "text-to-image", "pricePerUnit": "5"},
            {"pipeline": "text-to-image", "modelId": "org/m", "pricePerUnit": "0.002",
             "currency": "USD", "pixelsPerUnit": 1000000},
            {"pipeline": "text-to-image", "pricePerUnit": "1", "currency": "ETH",
             "pixelsPerUnit": 10**12, "gateway": "0x00000000000000000000000000000000000000AA"},
        ],
    }
)  # fmt: skip


def test_the_most_specific_price_wins_and_usd_becomes_exact_wei():
    price = resolve_price(spec(pricing={"ref": "default"}), {"default": PRICING})
    # 0.002 USD / 2000 USD per ETH = 1e-6 ETH = 1e12 wei per 1e6 pixels.
    assert price.wei_per_unit == Fraction(10**6)
    assert price.gateways == {"0x00000000000000000000000000000000000000aa": Fraction(10**6)}


def test_wildcards_apply_when_nothing_more_specific_does():
    price = resolve_price(spec(modelId="other/m"), {"default": PRICING})
    assert price.wei_per_unit == 5
    llm = AIModelSpec.model_validate({"pipeline": "llm", "modelId": "x"})
    assert resolve_price(llm, {"default": PRICING}).wei_per_unit == 7


def test_missing_reference_is_a_pricing_problem():
    with pytest.raises(PricingProblem, match="'gone' not found"):
        resolve_price(spec(pricing={"ref": "gone"}), {"default": PRICING})


def test_unit_mismatched_wildcard_does_not_price_a_pipeline():
    only_tokens = PricingSpec.model_validate(
        {"prices": [{"pipeline": "*", "pricePerUnit": "1", "unit": "token"}]}
    )
    with pytest.raises(PricingProblem, match="no price for text-to-image"):
        resolve_price(spec(), {"tokens": only_tokens})


def test_price_info_fits_int64_and_is_exact_when_it_can_be():
    assert price_info(Fraction(4, 3)) == (4, 3)
    awkward = Fraction(10**15, 7) + Fraction(1, 10**30)
    num, den = price_info(awkward)
    assert num < 2**63
    assert abs(Fraction(num, den) - awkward) / awkward < Fraction(1, 10**12)
    with pytest.raises(PricingProblem, match="more than the wire can carry"):
        price_info(Fraction(2**64))


def test_ai_models_json_offers_priced_models_at_the_proxy():
    priced = resolve_price(spec(capacity=2, warm={"maxReplicas": 3}), {"default": PRICING})
    rows = [
        TableRow("m", spec(capacity=2, warm={"maxReplicas": 3}), "runner-m", priced),
        TableRow("free", spec(modelId="f"), "runner-free", None),
    ]
    entries = ai_models_json(rows, "https://proxy:8935")
    assert entries[0] == {
        "pipeline": "text-to-image",
        "model_id": "org/m",
        "warm": True,
        "capacity": 6,
        "url": "https://proxy:8935",
        "price_per_unit": "0.002USD",
        "pixels_per_unit": 1000000,
        "currency": "USD",
    }
    assert entries[1]["gateway"] == "0x00000000000000000000000000000000000000aa"
    assert all(e["model_id"] != "f" for e in entries)
    table = models_table(rows, 8000)
    assert [m["aimodel"] for m in table["models"]] == ["free", "m"]
    assert table["models"][0]["price"] is None


def test_a_live_models_price_per_second_is_charged_per_pixel_of_720p30():
    """gateway-wire 3.5: the wire bills each second of a stream as 1280 x 720 x 30 pixels."""
    live = AIModelSpec.model_validate({
        "pipeline": "live-video-to-video", "modelId": "noop", "capacity": 2,
        "pricing": {"price": {"pricePerUnit": "27648000", "currency": "wei"}},
    })  # fmt: skip
    price = resolve_price(live, {})
    [row] = models_table([TableRow("live", live, "runner-live", price)], 8000)["models"]
    assert row["capacity"] == 2  # streams per replica
    assert (row["price"]["unit"], row["price"]["weiPerUnit"]) == ("pixel", "1")
    [entry] = ai_models_json([TableRow("live", live, "runner-live", price)], "https://p:8935")
    assert (entry["price_per_unit"], entry["pixels_per_unit"]) == (1, 1)
    usd = AIModelSpec.model_validate({
        "pipeline": "live-video-to-video", "modelId": "noop",
        "pricing": {"price": {"pricePerUnit": "0.0001", "currency": "USD", "usdPerEth": "2000",
                              "unit": "second"}},
    })  # fmt: skip
    [entry] = ai_models_json([TableRow("u", usd, "r", resolve_price(usd, {}))], "https://p")
    assert (entry["price_per_unit"], entry["pixels_per_unit"]) == ("0.0001USD", 27648000)
    with pytest.raises(ValueError, match="unit 'millisecond' cannot bill live-video-to-video"):
        AIModelSpec.model_validate({
            "pipeline": "live-video-to-video", "modelId": "noop",
            "pricing": {"price": {"pricePerUnit": "1", "unit": "millisecond"}},
        })  # fmt: skip


# --- demand ---


def test_idle_counts_from_the_later_of_last_request_and_the_first_ready_replica():
    assert idle_for(Demand(last_request=100.0), ready_at=150.0, now=160.0) == 10
    assert idle_for(Demand(last_request=155.0), ready_at=150.0, now=160.0) == 5
    assert idle_for(Demand(last_request=100.0, in_flight=1), ready_at=150.0, now=1e9) is None
    # Still loading: not idle, however long ago the last request was.
    assert idle_for(Demand(last_request=100.0), ready_at=None, now=1e9) is None
