"""The runner under hostile or unlucky conditions: huge uploads, a full device, a model
still loading, a failing GPU.

No GPU here, so a device fault is simulated where it starts: the pipeline's inference
raises the very exception torch raises for it (torch.AcceleratorError carrying "CUDA
error: device-side assert triggered", torch.OutOfMemoryError). Everything around it (the
app, the device thread, the queue, health and the probes) is the real runner, in-process.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from kubepeer_runner.app import create_app
from kubepeer_runner.config import ModelSpec, RunnerConfig
from kubepeer_runner.pipelines import text_to_image
from kubepeer_runner.serving import Device
from tests.runners import RunnerProcess, error, png, start_runner, stop

MIB = 1024 * 1024
T2I = {"prompt": "a cat", "height": 64, "width": 64, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def upload_runner(tiny_models, tmp_path_factory) -> Iterator[RunnerProcess]:
    env = {"PIPELINE": "image-to-text", "MODEL_ID": "kubepeer-tiny/blip",
           "MODEL_DIR": str(tiny_models)}  # fmt: skip
    runner = start_runner(env, tmp_path_factory.mktemp("uploads") / "runner.log")
    yield runner
    stop(runner)


def probe_while(runner: RunnerProcess, request: Callable[[httpx.AsyncClient], Any]) -> tuple:
    """Run request against the runner while /readyz is polled; (its result, slowest probe)."""

    async def both() -> tuple[Any, float]:
        async with httpx.AsyncClient(base_url=runner.url, timeout=120) as client:
            task = asyncio.create_task(request(client))
            slowest = 0.0
            async with httpx.AsyncClient(base_url=runner.url, timeout=10) as prober:
                while not task.done():
                    started = time.monotonic()
                    assert (await prober.get("/readyz")).status_code == 200
                    slowest = max(slowest, time.monotonic() - started)
                    await asyncio.sleep(0.05)
            return await task, slowest

    return asyncio.run(both())


def test_a_100_mb_upload_is_refused_with_413_while_the_probes_keep_answering(upload_runner):
    async def streamed(client: httpx.AsyncClient) -> httpx.Response:
        async def body() -> Any:  # no Content-Length: the size is only known as it arrives
            yield (b'--x\r\nContent-Disposition: form-data; name="image"; filename="big.png"'
                   b"\r\nContent-Type: image/png\r\n\r\n")  # fmt: skip
            for _ in range(100):
                yield b"\0" * MIB
                await asyncio.sleep(0)
            yield b"\r\n--x--\r\n"

        headers = {"content-type": "multipart/form-data; boundary=x"}
        return await client.post("/image-to-text", content=body(), headers=headers)

    response, slowest = probe_while(upload_runner, streamed)
    assert response.status_code == 413
    assert "52428800 bytes" in error(response)  # MAX_UPLOAD_BYTES's default, 50 MiB
    assert slowest < 1.0


def test_a_declared_100_mb_upload_is_refused_without_reading_it_into_memory(upload_runner):
    photo = png(16, 16)
    huge = {"image": ("big.png", photo + b"\0" * (100 * MIB), "image/png")}
    with upload_runner.client() as client:
        response = client.post("/image-to-text", files=huge)
        assert response.status_code == 413
        # The runner still serves the next request on a fresh connection.
        ok = client.post("/image-to-text", files={"image": ("a.png", photo, "image/png")})
        assert ok.status_code == 200, ok.text
    metrics = httpx.get(f"{upload_runner.url}/metrics").text
    assert 'runner_refused_total{reason="too_large",route="/image-to-text"}' in metrics


def test_an_image_too_large_to_decode_is_refused_from_its_header(upload_runner):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("1", (10000, 10000)).save(buffer, format="PNG")  # 100 MP in a few kB
    with upload_runner.client() as client:
        response = client.post(
            "/image-to-text", files={"image": ("wide.png", buffer.getvalue(), "image/png")}
        )
    assert response.status_code == 400
    assert "MAX_INPUT_PIXELS" in error(response)


# In-process runners with a simulated device.


class FakeDevice:
    """Stands in for the GPU's work: each call runs `behaviour` (raise, sleep, answer)."""

    def __init__(self) -> None:
        self.behaviour: Callable[[], Any] = lambda: None
        self.calls = 0

    def generate(self, model: Any, req: Any) -> Any:
        self.calls += 1
        self.behaviour()
        return text_to_image.ImageResponse(images=[])


@pytest.fixture
def fake_device(monkeypatch) -> FakeDevice:
    device = FakeDevice()
    monkeypatch.setattr(text_to_image, "load", lambda spec, model_dir, dev: "simulated GPU model")
    monkeypatch.setattr(text_to_image, "generate", device.generate)
    return device


def in_process(**limits: Any) -> TestClient:
    config = RunnerConfig(models=(ModelSpec("text-to-image", "kubepeer-tiny/simulated"),))
    return TestClient(create_app(config.with_limits(**limits), Device("cpu", torch.float32)))


def raising(exc: BaseException) -> Callable[[], None]:
    def fail() -> None:
        raise exc

    return fail


def test_a_cuda_error_turns_health_to_error_and_liveness_fails(fake_device):
    fake_device.behaviour = raising(
        torch.AcceleratorError("CUDA error: device-side assert triggered")
    )
    with in_process() as client:
        assert client.get("/health").json() == {"status": "OK"}
        response = client.post("/text-to-image", json=T2I)
        assert response.status_code == 500
        assert "device-side assert" in error(response)
        assert client.get("/health").json() == {"status": "ERROR"}
        assert client.get("/livez").status_code == 503  # the kubelet restarts the pod
        assert client.get("/readyz").status_code == 503
        # Later requests are not sent to the broken device.
        assert client.post("/text-to-image", json=T2I).status_code == 500
        assert fake_device.calls == 1


def test_repeated_out_of_memory_turns_health_to_error(fake_device):
    fake_device.behaviour = raising(torch.OutOfMemoryError("CUDA out of memory."))
    with in_process(max_consecutive_oom=3) as client:
        for _ in range(2):
            response = client.post("/text-to-image", json=T2I)
            assert response.status_code == 500
            assert "out of memory" in error(response)
            assert client.get("/health").json() == {"status": "OK"}
        assert client.post("/text-to-image", json=T2I).status_code == 500
        assert client.get("/health").json() == {"status": "ERROR"}


def test_an_out_of_memory_followed_by_a_success_is_forgotten(fake_device):
    outcomes = iter([torch.OutOfMemoryError("CUDA out of memory."), None] * 3)

    def next_outcome() -> None:
        if (exc := next(outcomes)) is not None:
            raise exc

    fake_device.behaviour = next_outcome
    with in_process(max_consecutive_oom=2) as client:
        statuses = [client.post("/text-to-image", json=T2I).status_code for _ in range(6)]
        assert statuses == [500, 200] * 3
        assert client.get("/health").json() == {"status": "OK"}


def test_bad_input_the_pipeline_rejects_is_a_400_and_health_stays_ok(fake_device):
    fake_device.behaviour = raising(ValueError("`height` must be divisible by 8"))
    with in_process() as client:
        response = client.post("/text-to-image", json=T2I)
        assert response.status_code == 400
        assert "divisible by 8" in error(response)
        assert client.get("/health").json() == {"status": "OK"}


def test_a_request_waits_for_the_device_at_most_the_wait_timeout(fake_device):
    release = threading.Event()
    fake_device.behaviour = lambda: release.wait(10)
    with in_process(wait_timeout_seconds=0.5) as client, ThreadPoolExecutor(2) as pool:
        holding = pool.submit(client.post, "/text-to-image", json=T2I)
        while fake_device.calls == 0:
            time.sleep(0.01)
        waiting = client.post("/text-to-image", json=T2I)
        release.set()
        assert holding.result().status_code == 200
    assert waiting.status_code == 500
    assert "waiting for the device" in error(waiting)


def test_requests_sent_while_loading_wait_for_the_model(monkeypatch):
    loaded = threading.Event()

    def slow_load(spec: Any, model_dir: Any, device: Any) -> str:
        loaded.wait(10)
        return "simulated GPU model"

    monkeypatch.setattr(text_to_image, "load", slow_load)
    monkeypatch.setattr(text_to_image, "generate", lambda model, req: {"images": []})
    with in_process() as client, ThreadPoolExecutor(1) as pool:
        assert client.get("/health").json() == {"status": "LOADING"}
        early = pool.submit(client.post, "/text-to-image", json=T2I)
        time.sleep(0.3)
        assert not early.done()  # waiting, not turned away
        loaded.set()
        assert early.result().status_code == 200
        assert client.get("/health").json() == {"status": "OK"}
