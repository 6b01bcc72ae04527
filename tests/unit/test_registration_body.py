"""What the operator tells an external orchestrator about each replica (issue 27), checked
against live-runner-wire.md 2.1 and 2.3: the heartbeat's fields and their rules. Pure."""

from __future__ import annotations

from decimal import Decimal

import pytest

from kubepeer.api.live_runner import LiveRunnerSpec
from kubepeer.api.pricing import AppPrice
from kubepeer.controller.registration import (
    Replica,
    _seconds,
    heartbeat_body,
    node_gpu,
    price_info,
    ready_replicas,
    runner_url,
)
from kubepeer.livepeer.price_feed import EthUsd

SPEC = LiveRunnerSpec.model_validate({
    "app": "acme/echo", "image": "x", "mode": "single-shot", "capacity": 3, "version": "2",
    "metadata": "hi", "port": 9000,
})  # fmt: skip
ETH_AT_3000 = EthUsd(
    answer=3000 * 10**8, decimals=8, round_id=1, updated_at=0, feed="0x", read_at=0
)


def pod(name: str, ip: str | None, ready: str, deleting: bool = False) -> dict:
    status = {"podIP": ip, "conditions": [{"type": "Ready", "status": ready}]}
    meta = {"name": name, "deletionTimestamp": "now" if deleting else None}
    return {"metadata": meta, "spec": {"nodeName": "gpu-1"}, "status": status}


def test_only_ready_addressed_pods_that_are_not_leaving_are_registered():
    pods = [pod("b", "10.0.0.2", "True"), pod("a", "10.0.0.1", "True"),
            pod("c", None, "True"), pod("d", "10.0.0.4", "False"),
            pod("e", "10.0.0.5", "True", deleting=True)]  # fmt: skip
    assert ready_replicas(pods) == [Replica("a", "10.0.0.1", "gpu-1"),
                                    Replica("b", "10.0.0.2", "gpu-1")]  # fmt: skip


def test_the_heartbeat_is_the_full_state_section_2_3_asks_for():
    url = runner_url("http://{podIP}:{port}", "ns", Replica("p", "fd00::7", None), 9000)
    assert url == "http://[fd00::7]:9000"
    body = heartbeat_body("ns.p", SPEC, url, price_info(None, None), None)
    assert body == {
        "runner_id": "ns.p", "label": "ns.p", "runner_url": "http://[fd00::7]:9000",
        "app": "acme/echo", "mode": "single-shot", "capacity": 3, "proxy": False,
        "status": "ready", "price_info": {"price": 0, "currency": "usd", "unit": "hour"},
        "version": "2", "metadata": "hi",
    }  # fmt: skip
    named = runner_url("https://{pod}.{namespace}.apps.example", "ns", Replica("p", "1", None), 1)
    assert named == "https://p.ns.apps.example"


@pytest.mark.parametrize(
    ("price", "reading", "expected"),
    [
        (
            AppPrice(amount=Decimal("3.5"), currency="USD", unit="hour"),
            None,
            {"price": "3.5", "currency": "usd", "unit": "hour"},
        ),
        # go-livepeer takes USD only: wei are sent at the ETH/USD reading (1e18 wei = $3000)
        (
            AppPrice(amount=Decimal(10**15), currency="wei", unit="fixed"),
            ETH_AT_3000,
            {"price": "3", "currency": "usd", "unit": "fixed"},
        ),
        (
            AppPrice(amount=Decimal(10**15), currency="wei", unit="720p"),
            None,
            {"price": 0, "currency": "usd", "unit": "720p"},
        ),
    ],
)
def test_prices_go_in_usd_per_hour_720p_or_call(price, reading, expected):
    assert price_info(price, reading) == expected


def test_the_gpu_comes_from_the_nodes_feature_discovery_labels():
    labels = {"nvidia.com/gpu.product": "NVIDIA-L40S", "nvidia.com/gpu.memory": "46068"}
    assert node_gpu(labels, "gpu-1") == {"id": "gpu-1", "name": "NVIDIA-L40S", "vram_mb": 46068}
    assert node_gpu({}, "cpu-1") is None


@pytest.mark.parametrize(("text", "seconds"), [("5s", 5.0), ("500ms", 0.5), ("1m", 60.0),
                                               ("soon", 5.0), (None, 5.0)])  # fmt: skip
def test_the_interval_is_read_as_the_sdk_reads_it(text, seconds):
    assert _seconds(text, 5.0) == seconds
