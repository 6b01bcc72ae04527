"""Live video end to end with the official Livepeer gateway SDK (`livepeer-gateway` from PyPI,
in its own venv made by hack/setup) against the proxy in private mode, offchain gateways
admitted: the SDK discovers the proxy, starts a stream (`start_lv2v`), publishes H.264 with
its MediaPublish, reads the runner's transformed frames back through the proxy's trickle
channels, changes params through control, reads status events, stops; the runner then
reports IDLE. The runner is the real live runner with a real (tiny, random-weight) frame
model.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kubepeer_dev.gateway_sim import Gateway, get_orchestrator
from tests.conftest import REPO
from tests.gateway_rules import gateway_accepts, selectable
from tests.proxies import RUNNER_TOKEN, ProxyServer, models_json, start_proxy, stop_proxy
from tests.proxies import start_runner as runner_process
from tests.proxies import stop as stop_runner
from tests.support import wait_for

LIVE_RUNNER = REPO / "runner" / "kubepeer_runner" / "live"  # the streaming runner's package
pytestmark = [
    pytest.mark.redis,
    pytest.mark.skipif(not LIVE_RUNNER.is_dir(), reason="needs the streaming live runner"),
]

SDK_PYTHON = REPO / ".gateway-sdk" / "bin" / "python"
DRIVER = Path(__file__).with_name("sdk_gateway.py")
MODEL = "kubepeer-tiny/sd-turbo"  # the live runner's tiny img2img model (kubepeer_dev.tiny_models)
SIZE = {"width": 64, "height": 64}  # small: the tiny model runs on a CPU here


@pytest.fixture(scope="module")
def live_stack(tiny_models, redis_server, tmp_path_factory) -> Iterator[tuple[ProxyServer, str]]:
    if not SDK_PYTHON.exists():
        pytest.fail("the gateway SDK's venv is missing: run `make setup`")
    workdir = tmp_path_factory.mktemp("live-sdk")
    runner = runner_process(
        {"PIPELINE": "live-video-to-video", "MODEL_ID": MODEL, "MODEL_DIR": str(tiny_models),
         "AUTH_TOKEN": RUNNER_TOKEN, "LIVE_INPUT_TIMEOUT_SECONDS": "5", "OMP_NUM_THREADS": "1",
         "LIVE_STATUS_INTERVAL_SECONDS": "2",
         # Never drop a frame: a backlog that holds the whole clip, so the count is exact
         # however slowly this CPU runs the model (the output just comes later).
         "LIVE_MAX_QUEUED_FRAMES": "100000"},
        workdir / "runner.log",
    )  # fmt: skip
    live = {"aimodel": "live", "pipeline": "live-video-to-video", "model_id": MODEL,
            "runner": "runner-live"}  # fmt: skip
    (workdir / "bearer").write_text("unused-by-the-sdk")
    proxy = start_proxy(
        workdir / "proxy", redis_server, models=models_json("1", 1, [live], base=False),
        endpoints={"runner-live": [runner.url]},
        args=["--no-payments", "--bearer-token-file", str(workdir / "bearer"),
              "--offchain-gateways"], recipient=None,
    )  # fmt: skip
    yield proxy, runner.url
    stop_runner(runner)  # first: its trickle readers would hold the proxy's graceful stop
    stop_proxy(proxy)


def sdk_gateway(proxy: ProxyServer, *args: str, timeout: float = 180) -> dict:
    done = subprocess.run(
        [str(SDK_PYTHON), str(DRIVER), proxy.url, MODEL, *args],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


def test_a_stream_through_the_sdk_is_transformed_steered_reported_and_stopped(live_stack):
    proxy, runner_url = live_stack
    report = sdk_gateway(
        proxy, "--seconds", "9", "--fps", "12", "--params", json.dumps(SIZE),
        "--update", json.dumps({"seed": 987654, "strength": 0.9}),
    )  # fmt: skip
    assert "start_error" not in report, report
    assert report["start_seconds"] < 5  # the gateway's budget for the start call
    mid = report["manifest_id"]
    assert report["urls"][0] == f"{proxy.url}/ai/trickle/{mid}"
    # Every frame published came back once, in order, none dropped on either side: the
    # SDK dropped none, and the output went past the last of them (tail frames follow).
    assert report["sdk_dropped"] == 0, report
    assert report["past_total"], (report["tail_frames"], report["errors"])
    total = report["frames_in"]
    frames = [f for f in report["frames"] if f["index"] < total]
    assert [f["index"] for f in frames] == list(range(total)), report["errors"]
    assert total >= 9 * 12
    # At the size asked for, and not the input passed through.
    assert {(f["width"], f["height"]) for f in report["frames"]} == {(64, 64)}
    assert min(f["diff_from_input"] for f in frames) > 5
    # The control message changed the output: frames out before it was sent differ from
    # the tail, published well after it.
    before = [f["mean"] for f in frames if not f["after_update"]]
    after = [f["mean"] for f in report["frames"] if f["index"] >= total]
    assert before
    assert after
    assert abs(sum(after) / len(after) - sum(before) / len(before)) > 1
    # Status events arrived on the events channel.
    kinds = [e.get("event", e).get("type") for e in report["events"]]
    assert "status" in kinds, report["events"]
    # Stopped: the runner goes back to IDLE and the proxy frees the slot.
    wait_for(lambda: httpx.get(f"{runner_url}/health").json()["status"] == "IDLE",
             timeout=30, what="the runner to report IDLE")  # fmt: skip


def test_an_offchain_gateway_keeps_the_proxy_after_discovery(live_stack):
    """With offchain gateways admitted and no address configured, discovery answers the
    zero address, as an offchain go-livepeer does: an empty one would match a default
    gateway's blocklist and drop the proxy (gateway-wire 1.5)."""
    proxy, _ = live_stack
    request = Gateway().request(35, MODEL)
    request.ignore_capacity_check = True  # the stream slot may still be taken: not tested here
    info = get_orchestrator(proxy, request)
    assert info.address == bytes(20)
    assert gateway_accepts(info, 35, MODEL)
    assert selectable(info, has_sender=False) == ""
