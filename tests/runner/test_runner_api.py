"""The runner over real HTTP: a uvicorn process per server, tiny real models, loopback only."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import os
import struct
import subprocess
import sys
import time
import wave
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from conftest import REPO
from runners import RunnerProcess, start_runner, stop

TOKEN = "runner-test-token"


@pytest.fixture(scope="module")
def fleet_runner(tiny_models, tmp_path_factory) -> Iterator[RunnerProcess]:
    """One runner in share-group mode serving four pipelines, as the operator configures it."""
    models = [
        {"pipeline": "text-to-image", "model_id": "kubepeer-tiny/stable-diffusion"},
        {"pipeline": "image-to-image", "model_id": "kubepeer-tiny/stable-diffusion"},
        {"pipeline": "llm", "model_id": "kubepeer-tiny/llama"},
        {"pipeline": "image-to-text", "model_id": "kubepeer-tiny/blip"},
        {"pipeline": "audio-to-text", "model_id": "kubepeer-tiny/wav2vec2"},
        {"pipeline": "text-to-speech", "model_id": "kubepeer-tiny/vits"},
        {"pipeline": "upscale", "model_id": "kubepeer-tiny/x4-upscaler"},
        {"pipeline": "segment-anything-2", "model_id": "kubepeer-tiny/sam2"},
        {"pipeline": "image-to-video", "model_id": "kubepeer-tiny/svd"},
        {"pipeline": "live-video-to-video", "model_id": "noop"},
    ]
    env = {"MODELS": json.dumps(models), "MODEL_DIR": str(tiny_models), "MAX_QUEUE": "0"}
    runner = start_runner(env, tmp_path_factory.mktemp("runner") / "runner.log")
    yield runner
    stop(runner)


@pytest.fixture
def api(fleet_runner) -> Iterator[httpx.Client]:
    with fleet_runner.client() as client:
        yield client


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (30, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def decode(data_url: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert data_url.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(data_url[len(prefix) :])))


def error(response: httpx.Response) -> str:
    return response.json()["detail"]["msg"]


JSON = {"content-type": "application/json"}
T2I = {"prompt": "a cat", "height": 64, "width": 48, "num_inference_steps": 2, "seed": 7}


def test_health_goes_from_loading_to_ok(fleet_runner):
    assert fleet_runner.statuses[0] == "LOADING"
    assert fleet_runner.statuses[-1] == "OK"


def test_text_to_image_returns_pngs_of_the_asked_size(api):
    response = api.post("/text-to-image", json={**T2I, "num_images_per_prompt": 2})
    assert response.status_code == 200, response.text
    images = response.json()["images"]
    assert [i["seed"] for i in images] == [7, 8]
    assert all(i["nsfw"] is False for i in images)
    assert [decode(i["url"]).size for i in images] == [(48, 64), (48, 64)]


def test_same_seed_same_image(api):
    first = api.post("/text-to-image/", json=T2I).json()["images"][0]["url"]
    again = api.post("/text-to-image", json=T2I).json()["images"][0]["url"]
    assert first == again


def test_image_to_image_keeps_the_input_size(api):
    response = api.post(
        "/image-to-image",
        data={"prompt": "make it red", "num_inference_steps": "2", "strength": "0.5"},
        files={"image": ("in.png", png(40, 32), "image/png")},
    )
    assert response.status_code == 200, response.text
    assert decode(response.json()["images"][0]["url"]).size == (40, 32)


def test_upscale_returns_an_image_four_times_larger(api):
    response = api.post(
        "/upscale",
        data={"prompt": "sharper", "num_inference_steps": "2", "seed": "5"},
        files={"image": ("in.png", png(24, 16), "image/png")},
    )
    assert response.status_code == 200, response.text
    [image] = response.json()["images"]
    assert image["seed"] == 5
    assert decode(image["url"]).size == (96, 64)


def test_segment_anything_2_returns_masks_the_size_of_the_image(api):
    response = api.post(
        "/segment-anything-2",
        data={"point_coords": "[[20, 10], [30, 25]]", "point_labels": "[1, 0]",
              "multimask_output": "true"},
        files={"image": ("in.png", png(60, 40), "image/png")},
    )  # fmt: skip
    assert response.status_code == 200, response.text
    body = response.json()
    masks, scores = json.loads(body["masks"]), json.loads(body["scores"])
    assert len(masks) == len(scores) == 3
    assert (len(masks[0]), len(masks[0][0])) == (40, 60)
    assert {v for row in masks[0] for v in row} <= {0, 1}
    boxed = api.post(
        "/segment-anything-2",
        data={"box": "[5, 5, 50, 30]", "multimask_output": "false", "return_logits": "false"},
        files={"image": ("in.png", png(60, 40), "image/png")},
    ).json()
    assert len(json.loads(boxed["masks"])) == 1
    assert json.loads(boxed["logits"]) == []


def test_image_to_video_returns_frames_of_the_asked_size(api):
    response = api.post(
        "/image-to-video",
        data={"height": "32", "width": "48", "num_inference_steps": "2", "seed": "9"},
        files={"image": ("in.png", png(40, 30), "image/png")},
    )
    assert response.status_code == 200, response.text
    [video] = response.json()["frames"]
    assert len(video) == 3  # the tiny model's frame count
    assert {decode(f["url"]).size for f in video} == {(48, 32)}
    assert {f["seed"] for f in video} == {9}


def test_image_to_text_returns_text(api):
    response = api.post("/image-to-text", files={"image": ("in.png", png(50, 30), "image/png")})
    assert response.status_code == 200, response.text
    assert isinstance(response.json()["text"], str)


def wav(seconds: float, rate: int = 22050) -> bytes:
    samples = (int(8000 * math.sin(i / 10)) for i in range(int(seconds * rate)))
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"".join(struct.pack("<h", s) for s in samples))
    return buffer.getvalue()


def test_audio_to_text_transcribes_with_timestamps(api):
    response = api.post("/audio-to-text", files={"audio": ("a.wav", wav(1.5), "audio/wav")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body["text"], str)
    assert body["chunks"]
    assert all(0 <= c["timestamp"][0] <= 1.5 for c in body["chunks"])
    plain = api.post(
        "/audio-to-text",
        data={"return_timestamps": "false"},
        files={"audio": ("a.wav", wav(0.5), "audio/wav")},
    ).json()
    assert plain["chunks"] == []


def test_text_to_speech_returns_a_wav(api):
    response = api.post("/text-to-speech", json={"text": "hello world", "description": "calm"})
    assert response.status_code == 200, response.text
    url = response.json()["audio"]["url"]
    prefix = "data:audio/wav;base64,"
    assert url.startswith(prefix)
    with wave.open(io.BytesIO(base64.b64decode(url[len(prefix) :]))) as audio:
        assert audio.getframerate() == 16000
        assert audio.getnframes() > 0


LLM = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 6, "temperature": 0}


def test_llm_answers_like_openai(api):
    body = api.post("/llm", json=LLM).json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "kubepeer-tiny/llama"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert 0 < body["usage"]["completion_tokens"] <= 6


def test_llm_streams_server_sent_events_with_the_same_text(api):
    whole = api.post("/llm", json=LLM).json()["choices"][0]["message"]["content"]
    with api.stream("POST", "/llm", json={**LLM, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == whole


def test_live_video_to_video_echoes_the_control_plane_contract(api):
    request = {
        "subscribe_url": "http://127.0.0.1:9/in", "publish_url": "http://127.0.0.1:9/out",
        "control_url": "http://127.0.0.1:9/control", "events_url": "http://127.0.0.1:9/events",
        "model_id": "noop", "gateway_request_id": "req-1", "manifest_id": "m", "stream_id": "s",
    }  # fmt: skip
    body = api.post("/live-video-to-video", json=request).json()
    assert body == {
        "subscribe_url": request["subscribe_url"], "publish_url": request["publish_url"],
        "control_url": request["control_url"], "events_url": request["events_url"],
        "request_id": "req-1", "manifest_id": "m", "stream_id": "s",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("path", "kwargs", "expected"),
    [
        ("/text-to-image", {"json": {"height": 64}}, "prompt"),
        ("/text-to-image", {"json": {**T2I, "prompt": ""}}, "prompt"),
        ("/text-to-image", {"json": {**T2I, "height": 100000, "width": 100000}}, "pixels"),
        ("/text-to-image", {"json": {**T2I, "height": 63}}, "multiple of 8"),
        ("/text-to-image", {"json": {**T2I, "model_id": "other/model"}}, "does not match"),
        ("/text-to-image", {"content": b"{not json", "headers": JSON}, "JSON"),
        ("/image-to-image", {"data": {"prompt": "x"}, "files": {"image": ("a.png", b"junk")}},
         "not an image"),
        ("/image-to-image", {"files": {"image": ("a.png", png(16, 16))}}, "prompt"),
        ("/image-to-text", {"data": {}}, "image"),
        ("/upscale", {"data": {"prompt": "x"}, "files": {"image": ("a.png", png(1024, 1024))}},
         "larger than"),
        ("/audio-to-text", {"files": {"audio": ("a.wav", b"RIFF nonsense")}}, "FFmpeg"),
        ("/audio-to-text", {"data": {}}, "audio"),
        ("/image-to-video", {"data": {"height": "30"}, "files": {"image": ("a.png", png(8, 8))}},
         "multiple of 8"),
        ("/segment-anything-2", {"data": {}, "files": {"image": ("a.png", png(8, 8))}}, "box"),
        ("/segment-anything-2", {"data": {"point_coords": "[[1,2]]", "point_labels": "[1, 1]"},
                                 "files": {"image": ("a.png", png(8, 8))}}, "one label"),
        ("/segment-anything-2", {"data": {"box": "[1,2"}, "files": {"image": ("a.png", png(8, 8))}},
         "must be JSON"),
        ("/llm", {"json": {"messages": []}}, "messages"),
        ("/text-to-speech", {"json": {"text": ""}}, "text"),
        ("/text-to-speech", {"json": {"text": "x" * 5000}}, "text"),
        ("/llm", {"json": {**LLM, "model": "other/model"}}, "does not match"),
        ("/live-video-to-video", {"json": {"subscribe_url": "ftp://x", "publish_url": "http://y"}},
         "http(s)"),
    ],
)  # fmt: skip
def test_bad_input_is_a_400_in_ai_runner_format(api, path, kwargs, expected):
    response = api.post(path, **kwargs)
    assert response.status_code == 400, response.text
    assert expected in error(response)


def test_a_full_device_turns_requests_away_rather_than_queueing_forever(fleet_runner):
    slow = {**T2I, "height": 64, "width": 64, "num_inference_steps": 40}  # a few seconds

    async def both() -> list[int]:
        async with httpx.AsyncClient(base_url=fleet_runner.url, timeout=120) as client:
            first = asyncio.create_task(client.post("/text-to-image", json=slow))
            await asyncio.sleep(0.5)  # the first holds the device
            second = await client.post("/text-to-image", json=T2I)
            return [(await first).status_code, second.status_code]

    started = time.monotonic()
    assert asyncio.run(both()) == [200, 503]
    assert time.monotonic() - started < 120


def test_service_routes(api):
    assert api.get("/version").json()["version"]
    info = api.get("/hardware/info/").json()
    assert info["gpu_info"] == {} or all("memory_total" in g for g in info["gpu_info"].values())
    assert "gpu_stats" in api.get("/hardware/stats").json()
    metrics = api.get("/metrics").text
    assert 'runner_requests_total{route="/text-to-image",status="200"}' in metrics
    assert "runner_model_load_seconds" in metrics
    assert api.get("/readyz").status_code == 200
    assert api.get("/livez").status_code == 200


def test_openapi_documents_the_reference_routes_and_fields(api):
    spec = api.get("/openapi.json").json()
    paths = spec["paths"]
    routes = ("/text-to-image", "/image-to-image", "/image-to-text", "/audio-to-text",
              "/text-to-speech", "/upscale", "/segment-anything-2", "/image-to-video", "/llm",
              "/live-video-to-video", "/health")  # fmt: skip
    for route in routes:
        assert route in paths, route
    schemas = spec["components"]["schemas"]
    t2i = schemas["TextToImageRequest"]["properties"]
    for field, default in [("height", 576), ("width", 1024), ("guidance_scale", 7.5),
                           ("num_inference_steps", 50), ("num_images_per_prompt", 1),
                           ("safety_check", True)]:  # fmt: skip
        assert t2i[field]["default"] == default, field
    assert schemas["TextToImageRequest"]["required"] == ["prompt"]
    i2i = next(s for n, s in schemas.items() if n.startswith("Body_image_to_image"))
    assert set(i2i["required"]) == {"prompt", "image"}
    assert i2i["properties"]["strength"]["default"] == 0.8
    assert i2i["properties"]["num_inference_steps"]["default"] == 100
    llm = schemas["LLMRequest"]["properties"]
    assert (llm["max_tokens"]["default"], llm["temperature"]["default"]) == (256, 0.7)


@pytest.fixture(scope="module")
def guarded_runner(tiny_models, tmp_path_factory) -> Iterator[RunnerProcess]:
    env = {
        "PIPELINE": "llm", "MODEL_ID": "kubepeer-tiny/llama", "MODEL_DIR": str(tiny_models),
        "AUTH_TOKEN": TOKEN,
    }  # fmt: skip
    runner = start_runner(env, tmp_path_factory.mktemp("guarded") / "runner.log", token=TOKEN)
    yield runner
    stop(runner)


def test_auth_token_is_required_on_every_route_but_the_probes(guarded_runner):
    with guarded_runner.client() as anonymous, guarded_runner.client(TOKEN) as member:
        for path in ("/health", "/version", "/hardware/info", "/metrics"):
            assert anonymous.get(path).status_code == 401, path
            assert member.get(path).status_code == 200, path
        assert anonymous.post("/llm", json=LLM).status_code == 401
        assert error(anonymous.post("/llm", json=LLM)) == "invalid bearer token"
        assert member.post("/llm", json=LLM).status_code == 200
        with guarded_runner.client("wrong") as stranger:
            assert stranger.get("/health").status_code == 401
        assert anonymous.get("/readyz").status_code == 200
        assert anonymous.get("/livez").json() == {"status": "OK"}


def test_missing_weights_are_an_error_the_probes_report(tmp_path):
    env = {"PIPELINE": "llm", "MODEL_ID": "nobody/nothing", "MODEL_DIR": str(tmp_path)}
    runner = start_runner(env, tmp_path / "runner.log")
    try:
        with runner.client() as client:
            assert client.get("/health").json() == {"status": "ERROR"}
            assert client.get("/readyz").status_code == 503
            assert client.get("/livez").status_code == 503
            assert client.post("/llm", json=LLM).status_code == 503
        assert "nobody/nothing is not in" in runner.log.read_text()
    finally:
        stop(runner)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "PIPELINE and MODEL_ID must be set"),
        ({"PIPELINE": "text-to-3d", "MODEL_ID": "x"}, "not a Livepeer pipeline"),
        ({"MODELS": "[{]"}, "MODELS is not JSON"),
    ],
)
def test_startup_fails_clearly_without_a_job(env, message):
    clean = {k: v for k, v in os.environ.items() if k not in ("PIPELINE", "MODEL_ID", "MODELS")}
    result = subprocess.run(
        [sys.executable, "-m", "kubepeer_runner"],
        env={**clean, "PYTHONPATH": str(REPO / "runner"), **env},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert message in result.stderr
