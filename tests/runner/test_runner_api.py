"""The runner over real HTTP, checked against ai-runner's published OpenAPI document: a
uvicorn process serving every pipeline with tiny real models, loopback only."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import wave
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.runners import (
    TOKEN,
    RunnerProcess,
    ai_runner_spec,
    assert_valid,
    decode,
    error,
    png,
    shared_dir,
    start_runner,
    stop,
    wav,
)

MODELS = [
    {"pipeline": "text-to-image", "model_id": "kubepeer-tiny/stable-diffusion", "capacity": 16},
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


@pytest.fixture(scope="module")
def fleet_runner(tiny_models, tmp_path_factory) -> Iterator[RunnerProcess]:
    """One runner in share-group mode serving every pipeline, as the operator configures it,
    with a bearer token and a masks budget small enough to be reached by a photo."""
    env = {"MODELS": json.dumps(MODELS), "MODEL_DIR": str(tiny_models), "AUTH_TOKEN": TOKEN,
           "MAX_MASKS_BYTES": "200000", "VERSION": ""}  # fmt: skip
    runner = start_runner(env, tmp_path_factory.mktemp("runner") / "runner.log")
    yield runner
    stop(runner)


@pytest.fixture
def api(fleet_runner) -> Iterator[httpx.Client]:
    with fleet_runner.client(TOKEN) as client:
        yield client


@pytest.fixture(scope="module")
def conforms() -> Callable[..., None]:
    """Check a response against ai-runner's document: its status is one the route documents
    and its body validates. Without the document, functional tests still run."""
    if shared_dir() is None:
        return lambda *args, **kwargs: None
    spec = ai_runner_spec()
    return lambda path, response, method="post": assert_valid(spec, path, response, method)


T2I = {"prompt": "a cat", "height": 64, "width": 48, "num_inference_steps": 2, "seed": 7}
LLM = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 6, "temperature": 0}


def test_health_goes_from_loading_to_ok(fleet_runner):
    assert fleet_runner.statuses[0] == "LOADING"
    assert fleet_runner.statuses[-1] == "OK"


def test_text_to_image_returns_pngs_of_the_asked_size(api, conforms):
    response = api.post("/text-to-image", json={**T2I, "num_images_per_prompt": 2})
    assert response.status_code == 200, response.text
    conforms("/text-to-image", response)
    images = response.json()["images"]
    assert [i["seed"] for i in images] == [7, 8]
    assert all(i["nsfw"] is False for i in images)
    assert [decode(i["url"]).size for i in images] == [(48, 64), (48, 64)]


def test_same_seed_same_image(api):
    first = api.post("/text-to-image/", json=T2I).json()["images"][0]["url"]
    again = api.post("/text-to-image", json=T2I).json()["images"][0]["url"]
    assert first == again


def test_image_to_image_keeps_the_input_size(api, conforms):
    response = api.post(
        "/image-to-image",
        data={"prompt": "make it red", "num_inference_steps": "2", "strength": "0.5"},
        files={"image": ("in.png", png(40, 32), "image/png")},
    )
    assert response.status_code == 200, response.text
    conforms("/image-to-image", response)
    assert decode(response.json()["images"][0]["url"]).size == (40, 32)


def test_upscale_returns_an_image_four_times_larger(api, conforms):
    response = api.post(
        "/upscale",
        data={"prompt": "sharper", "num_inference_steps": "2", "seed": "5"},
        files={"image": ("in.png", png(24, 16), "image/png")},
    )
    assert response.status_code == 200, response.text
    conforms("/upscale", response)
    [image] = response.json()["images"]
    assert image["seed"] == 5
    assert decode(image["url"]).size == (96, 64)


def unrle(rle: dict[str, Any]) -> list[list[int]]:
    """COCO's uncompressed RLE back to rows (column-major runs, zeros first)."""
    height, width = rle["size"]
    flat: list[int] = []
    for i, count in enumerate(rle["counts"]):
        flat += [i % 2] * count
    assert len(flat) == height * width
    return [[flat[x * height + y] for x in range(width)] for y in range(height)]


SAM_IMAGE = {"image": ("in.png", png(60, 40), "image/png")}


def test_segment_anything_2_returns_masks_the_size_of_the_image(api, conforms):
    response = api.post(
        "/segment-anything-2",
        data={"point_coords": "[[20, 10], [30, 25]]", "point_labels": "[1, 0]",
              "multimask_output": "true"},
        files=SAM_IMAGE,
    )  # fmt: skip
    assert response.status_code == 200, response.text
    conforms("/segment-anything-2", response)
    body = response.json()
    masks, scores = json.loads(body["masks"]), json.loads(body["scores"])
    assert len(masks) == len(scores) == 3
    assert all(m["size"] == [40, 60] for m in masks)
    grid = unrle(masks[0])
    assert {v for row in grid for v in row} <= {0, 1}
    logits = json.loads(body["logits"])  # low resolution: 256x256 in SAM2, less in the tiny one
    assert len(logits) == 3
    assert len(logits[0]) == len(logits[0][0]) < 60
    boxed = api.post(
        "/segment-anything-2",
        data={"box": "[5, 5, 50, 30]", "multimask_output": "false", "return_logits": "false"},
        files=SAM_IMAGE,
    ).json()
    assert len(json.loads(boxed["masks"])) == 1
    assert json.loads(boxed["logits"]) == []


def test_segment_anything_2_refines_with_a_mask_input_and_takes_normalized_coords(api):
    first = api.post(
        "/segment-anything-2",
        data={"point_coords": "[[30, 20]]", "point_labels": "[1]", "multimask_output": "false"},
        files=SAM_IMAGE,
    ).json()
    low_res = json.loads(first["logits"])[0]  # what mask_input takes back
    refined = api.post(
        "/segment-anything-2",
        data={"point_coords": "[[30, 20]]", "point_labels": "[1]", "multimask_output": "false",
              "mask_input": json.dumps([low_res])},
        files=SAM_IMAGE,
    )  # fmt: skip
    assert refined.status_code == 200, refined.text
    assert json.loads(refined.json()["masks"])[0]["size"] == [40, 60]
    # The same point as fractions of the image's width and height gives the same masks.
    normalized = api.post(
        "/segment-anything-2",
        data={"point_coords": "[[0.5, 0.5]]", "point_labels": "[1]", "multimask_output": "false",
              "normalize_coords": "false"},
        files=SAM_IMAGE,
    )  # fmt: skip
    assert normalized.json()["masks"] == first["masks"]


def test_segment_anything_2_keeps_the_body_of_a_full_size_photo_bounded(api, conforms):
    photo = png(1920, 1080, noisy=True)
    response = api.post(
        "/segment-anything-2",
        data={"point_coords": "[[900, 500]]", "point_labels": "[1]", "return_logits": "false"},
        files={"image": ("photo.png", photo, "image/png")},
    )
    assert response.status_code == 200, response.text
    conforms("/segment-anything-2", response)
    # As nested lists the three masks alone would be about 12 MB; MAX_MASKS_BYTES is 200 kB.
    assert len(response.json()["masks"]) <= 200_000
    assert len(response.content) < 250_000
    sizes = {tuple(m["size"]) for m in json.loads(response.json()["masks"])}
    [(height, width)] = sizes
    assert (1080 / height, 1920 / width) in {(2**k, 2**k) for k in range(12)} or (
        height <= 1080 and width <= 1920 and abs(1080 / height - 1920 / width) < 0.1
    )


def test_image_to_video_returns_frames_of_the_asked_size(api, conforms):
    response = api.post(
        "/image-to-video",
        data={"height": "32", "width": "48", "num_inference_steps": "2", "seed": "9"},
        files={"image": ("in.png", png(40, 30), "image/png")},
    )
    assert response.status_code == 200, response.text
    conforms("/image-to-video", response)
    [video] = response.json()["frames"]
    assert len(video) == 3  # the tiny model's frame count
    assert {decode(f["url"]).size for f in video} == {(48, 32)}
    assert {f["seed"] for f in video} == {9}


def test_image_to_text_returns_text(api, conforms):
    response = api.post("/image-to-text", files={"image": ("in.png", png(50, 30), "image/png")})
    assert response.status_code == 200, response.text
    conforms("/image-to-text", response)
    assert isinstance(response.json()["text"], str)


def test_audio_to_text_transcribes_with_timestamps(api, conforms):
    response = api.post("/audio-to-text", files={"audio": ("a.wav", wav(1.5), "audio/wav")})
    assert response.status_code == 200, response.text
    conforms("/audio-to-text", response)
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


def test_audio_to_text_gives_word_timestamps_when_asked(api, conforms):
    response = api.post(
        "/audio-to-text",
        data={"return_timestamps": "word"},
        files={"audio": ("a.wav", wav(1.5), "audio/wav")},
    )
    assert response.status_code == 200, response.text
    conforms("/audio-to-text", response)
    chunks = response.json()["chunks"]
    # One chunk per word: no chunk's text has a space inside it.
    assert all(" " not in c["text"].strip() for c in chunks)
    assert all(c["timestamp"][0] <= c["timestamp"][1] for c in chunks)


def test_text_to_speech_returns_a_wav(api, conforms):
    response = api.post("/text-to-speech", json={"text": "hello world", "description": "calm"})
    assert response.status_code == 200, response.text
    conforms("/text-to-speech", response)
    url = response.json()["audio"]["url"]
    prefix = "data:audio/wav;base64,"
    assert url.startswith(prefix)
    import base64
    import io

    with wave.open(io.BytesIO(base64.b64decode(url[len(prefix) :]))) as audio:
        assert audio.getframerate() == 16000
        assert audio.getnframes() > 0


def test_text_to_speech_needs_only_text(api):
    assert api.post("/text-to-speech", json={"text": "hi"}).status_code == 200
    empty = api.post("/text-to-speech", json={})
    assert empty.status_code == 400
    assert error(empty) == "Text input must be provided."


def test_llm_answers_like_openai(api, conforms):
    response = api.post("/llm", json=LLM)
    conforms("/llm", response)
    body = response.json()
    assert body["model"] == "kubepeer-tiny/llama"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert 0 < body["usage"]["completion_tokens"] <= 6


def test_llm_streams_chunks_that_each_validate_and_add_up(api):
    whole = api.post("/llm", json=LLM).json()
    with api.stream("POST", "/llm", json={**LLM, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    if shared_dir() is not None:
        spec = ai_runner_spec()
        for chunk in chunks:
            assert_valid(spec, "/llm", FakeResponse(200, chunk))
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "stop"
    assert all(c["choices"][0]["finish_reason"] == "" for c in chunks[:-1])
    streamed = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
    assert streamed == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["usage"] == whole["usage"]


class FakeResponse:
    """A stream chunk in the shape assert_valid reads (status and JSON body)."""

    def __init__(self, status_code: int, body: Any) -> None:
        self.status_code, self._body = status_code, body

    def json(self) -> Any:
        return self._body


def test_live_video_to_video_echoes_the_control_plane_contract(api, conforms):
    request = {
        "subscribe_url": "http://127.0.0.1:9/in", "publish_url": "http://127.0.0.1:9/out",
        "control_url": "http://127.0.0.1:9/control", "events_url": "http://127.0.0.1:9/events",
        "model_id": "noop", "gateway_request_id": "req-1", "manifest_id": "m", "stream_id": "s",
    }  # fmt: skip
    response = api.post("/live-video-to-video", json=request)
    conforms("/live-video-to-video", response)
    assert response.json() == {
        "subscribe_url": request["subscribe_url"], "publish_url": request["publish_url"],
        "control_url": request["control_url"], "events_url": request["events_url"],
        "request_id": "req-1", "manifest_id": "m", "stream_id": "s",
    }  # fmt: skip


JSON = {"content-type": "application/json"}
IMAGE = {"image": ("a.png", png(16, 16), "image/png")}

# (path, request, status, a word the error names): one row per way a request can be wrong.
BAD_REQUESTS = [
    ("/text-to-image", {"json": {"height": 64}}, 422, "prompt"),
    ("/text-to-image", {"content": b"{not json", "headers": JSON}, 422, "JSON"),
    ("/text-to-image", {"json": {**T2I, "seed": "x"}}, 422, "seed"),
    ("/text-to-image", {"json": {**T2I, "num_inference_steps": 0}}, 422, "num_inference_steps"),
    ("/llm", {"json": {"messages": []}}, 422, "messages"),
    ("/image-to-image", {"files": IMAGE}, 422, "prompt"),
    ("/image-to-text", {"data": {}}, 422, "image"),
    ("/audio-to-text", {"data": {}}, 422, "audio"),
    ("/live-video-to-video", {"json": {"subscribe_url": "ftp://x", "publish_url": "http://y"}},
     422, "http(s)"),
    ("/text-to-image", {"json": {**T2I, "prompt": " "}}, 400, "prompt"),
    ("/text-to-image", {"json": {**T2I, "height": 100000, "width": 100000}}, 400,
     "MAX_OUTPUT_PIXELS"),
    ("/text-to-image", {"json": {**T2I, "height": 63}}, 400, "multiple of 8"),
    ("/text-to-image", {"json": {**T2I, "model_id": "other/model"}}, 400, "other/model"),
    ("/text-to-image", {"json": {**T2I, "num_inference_steps": 5000}}, 400,
     "MAX_INFERENCE_STEPS"),
    ("/image-to-image", {"data": {"prompt": "x"}, "files": {"image": ("a.png", b"junk")}}, 400,
     "not an image"),
    ("/image-to-image", {"data": {"prompt": "x", "strength": "2"}, "files": IMAGE}, 400,
     "strength"),
    ("/upscale", {"data": {"prompt": "x"}, "files": {"image": ("a.png", png(2048, 2048))}}, 400,
     "MAX_OUTPUT_PIXELS"),
    ("/audio-to-text", {"data": {"return_timestamps": "often"},
                        "files": {"audio": ("a.wav", wav(0.2))}}, 400, "return_timestamps"),
    ("/audio-to-text", {"data": {"metadata": "{"}, "files": {"audio": ("a.wav", wav(0.2))}}, 400,
     "metadata"),
    ("/image-to-video", {"data": {"height": "30"}, "files": IMAGE}, 400, "multiple of 8"),
    ("/segment-anything-2", {"data": {}, "files": IMAGE}, 400, "box"),
    ("/segment-anything-2", {"data": {"point_coords": "[[1,2]]", "point_labels": "[1, 1]"},
                             "files": IMAGE}, 400, "one label"),
    ("/segment-anything-2", {"data": {"box": "[1,2"}, "files": IMAGE}, 400, "must be JSON"),
    ("/segment-anything-2", {"data": {"mask_input": "[[[1, 2], [3]]]"}, "files": IMAGE}, 400,
     "mask_input"),
    ("/text-to-speech", {"json": {"text": "x" * 10001}}, 400, "MAX_SPEECH_CHARACTERS"),
    ("/llm", {"json": {**LLM, "model": "other/model"}}, 400, "other/model"),
    ("/llm", {"json": {**LLM, "max_tokens": 10**6}}, 400, "MAX_NEW_TOKENS"),
    ("/audio-to-text", {"files": {"audio": ("a.wav", b"RIFF nonsense")}}, 415,
     "Unsupported audio format"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "kwargs", "status", "named"), BAD_REQUESTS)
def test_bad_input_gets_the_status_and_body_ai_runner_documents(api, conforms, path, kwargs,
                                                                 status, named):  # fmt: skip
    response = api.post(path, **kwargs)
    assert response.status_code == status, response.text
    conforms(path, response)
    assert named in response.text


# Values ai-runner accepts that an earlier runner refused (its limits were stricter).
GENEROUS = [
    {"guidance_scale": 60.0},
    {"num_inference_steps": 3, "num_images_per_prompt": 9},
    {"seed": 2**63 + 5},
]


@pytest.mark.parametrize("fields", GENEROUS)
def test_values_ai_runner_accepts_are_accepted(api, fields):
    response = api.post("/text-to-image", json={**T2I, "height": 16, "width": 16, **fields})
    assert response.status_code == 200, response.text


def test_llm_accepts_a_high_temperature_and_any_role(api):
    body = {**LLM, "temperature": 3.5, "messages": [{"role": "developer", "content": "hi"}]}
    assert api.post("/llm", json=body).status_code == 200


def test_a_request_without_the_token_is_refused_before_its_body_is_read(fleet_runner, conforms):
    with fleet_runner.client() as anonymous, fleet_runner.client("wrong") as stranger:
        for client in (anonymous, stranger):
            response = client.post("/llm", json=LLM)
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == "Bearer"
            conforms("/llm", response)
            assert client.get("/metrics").status_code == 401


def test_health_version_and_hardware_need_no_token(fleet_runner, conforms):
    with fleet_runner.client() as anonymous:
        for path in ("/health", "/version", "/hardware/info", "/hardware/stats"):
            response = anonymous.get(path)
            assert response.status_code == 200, path
            conforms(path, response, "get")
        assert anonymous.get("/health/").json() == {"status": "OK"}
        assert anonymous.get("/readyz").status_code == 200
        assert anonymous.get("/livez").json() == {"status": "OK"}


def test_version_is_the_ai_runner_api_version_for_each_pipeline(fleet_runner):
    expected = ai_runner_spec()["info"]["version"] if shared_dir() else "0.14.1"
    with fleet_runner.client() as client:
        first = client.get("/version").json()
        t2i = MODELS[0]
        assert first == {"pipeline": t2i["pipeline"], "model_id": t2i["model_id"],
                         "version": expected}  # fmt: skip
        for model in MODELS:
            answer = client.get("/version", params={"pipeline": model["pipeline"]}).json()
            assert answer == {"pipeline": model["pipeline"], "model_id": model["model_id"],
                              "version": expected}  # fmt: skip
            stats = client.get("/hardware/stats", params={"pipeline": model["pipeline"]})
            assert stats.json()["model_id"] == model["model_id"]
        assert client.get("/version", params={"pipeline": "text-to-3d"}).status_code == 422


def test_version_comes_from_the_environment(tiny_models, tmp_path):
    env = {"PIPELINE": "live-video-to-video", "MODEL_ID": "noop", "VERSION": "0.15.2"}
    runner = start_runner(env, tmp_path / "runner.log")
    try:
        with runner.client() as client:
            assert client.get("/version").json()["version"] == "0.15.2"
    finally:
        stop(runner)


def test_sixteen_concurrent_requests_within_capacity_all_succeed(fleet_runner, conforms):
    async def sixteen() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(base_url=fleet_runner.url, headers=headers,
                                     timeout=300) as client:  # fmt: skip
            return await asyncio.gather(
                *(client.post("/text-to-image", json={**T2I, "seed": i}) for i in range(16))
            )

    responses = asyncio.run(sixteen())
    assert [r.status_code for r in responses] == [200] * 16, [r.text for r in responses]
    for response in responses:
        conforms("/text-to-image", response)
    assert [r.json()["images"][0]["seed"] for r in responses] == list(range(16))


def test_a_request_beyond_capacity_is_refused_with_a_documented_status(fleet_runner, conforms):
    slow = {**T2I, "height": 32, "width": 32, "num_inference_steps": 8}

    async def seventeen() -> tuple[list[int], httpx.Response]:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(base_url=fleet_runner.url, headers=headers,
                                     timeout=300) as client:  # fmt: skip
            held = [asyncio.create_task(client.post("/text-to-image", json=slow))
                    for _ in range(16)]  # fmt: skip
            while (
                'runner_in_flight{pipeline="text-to-image"} 16.0'
                not in (await client.get("/metrics")).text
            ):
                await asyncio.sleep(0.05)
            extra = await client.post("/text-to-image", json=T2I)
            return [(await t).status_code for t in held], extra

    held, extra = asyncio.run(seventeen())
    assert held == [200] * 16
    assert extra.status_code == 500
    conforms("/text-to-image", extra)
    assert "capacity" in error(extra)


def test_metrics_are_labelled_by_route_template(api):
    api.post("/text-to-image/", json=T2I)
    for i in range(5):
        api.get(f"/scan/{i}.php")
    metrics = api.get("/metrics").text
    assert 'runner_requests_total{route="/text-to-image",status="200"}' in metrics
    assert 'route="/text-to-image/"' not in metrics
    assert "/scan/" not in metrics
    assert 'runner_requests_total{route="other",status="404"}' in metrics
    assert "runner_model_load_seconds" in metrics


def test_our_openapi_declares_what_we_serve(api):
    ours = api.get("/openapi.json").json()
    assert ours["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http", "scheme": "bearer"}  # fmt: skip
    llm = ours["paths"]["/llm"]["post"]["responses"]
    assert llm["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/LLMResponse"}  # fmt: skip
    assert "text/event-stream" in llm["200"]["content"]
    assert ours["paths"]["/health"]["get"]["responses"]["200"]["content"]["application/json"][
        "schema"] == {"$ref": "#/components/schemas/HealthCheck"}  # fmt: skip


def _request_schema(doc: dict[str, Any], operation: dict[str, Any]) -> tuple[str, dict]:
    [(media, content)] = operation["requestBody"]["content"].items()
    schema = content["schema"]
    if "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return media, schema


def _type(prop: dict[str, Any]) -> Any:
    """A property's JSON type, ignoring how optional it is (ours says anyOf [T, null])."""
    if "anyOf" in prop:
        types = [_type(p) for p in prop["anyOf"] if p.get("type") != "null"]
        return types[0] if len(types) == 1 else types
    if "$ref" in prop:
        return prop["$ref"].rsplit("/", 1)[1]
    return prop.get("type")


def test_every_route_takes_ai_runners_fields_types_defaults_and_required(api):
    spec, ours = ai_runner_spec(), api.get("/openapi.json").json()
    for path, item in spec["paths"].items():
        for method, theirs in item.items():
            mine = ours["paths"][path][method]
            assert mine.get("operationId") == theirs["operationId"], path
            # Our one extension, `?pipeline=` on the service routes of a share group, can be
            # a 422; a client that does not send it (go-livepeer) never sees one.
            extension = {"422"} if mine.get("parameters") and "parameters" not in theirs else set()
            assert set(theirs["responses"]) <= set(mine["responses"]), path
            assert set(mine["responses"]) - set(theirs["responses"]) <= extension, path
            if "security" in theirs:
                assert mine["security"] == theirs["security"], path
            if "requestBody" not in theirs:
                continue
            their_media, their_schema = _request_schema(spec, theirs)
            my_media, my_schema = _request_schema(ours, mine)
            assert my_media == their_media, path
            assert set(my_schema.get("required", [])) == set(their_schema.get("required", [])), path
            their_props, my_props = their_schema["properties"], my_schema["properties"]
            assert set(their_props) <= set(my_props), (path, set(their_props) - set(my_props))
            for name, prop in their_props.items():
                assert _type(my_props[name]) == _type(prop), (path, name)
                if "default" in prop:
                    assert my_props[name].get("default") == prop["default"], (path, name)


def test_startup_fails_clearly_without_a_job_or_with_a_bad_limit():
    cases = [
        ({}, "PIPELINE and MODEL_ID must be set"),
        ({"PIPELINE": "text-to-3d", "MODEL_ID": "x"}, "not a Livepeer pipeline"),
        ({"MODELS": "[{]"}, "MODELS is not JSON"),
        ({"PIPELINE": "llm", "MODEL_ID": "x", "CAPACITY": "many"}, "CAPACITY 'many'"),
        ({"PIPELINE": "llm", "MODEL_ID": "x", "MAX_UPLOAD_BYTES": "0"}, "must be positive"),
    ]
    clean = {k: v for k, v in os.environ.items() if k not in ("PIPELINE", "MODEL_ID", "MODELS")}
    for env, message in cases:
        result = subprocess.run(
            [sys.executable, "-m", "kubepeer_runner"],
            env={**clean, **env},
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 2, env
        assert message in result.stderr, (env, result.stderr)


def test_missing_weights_are_an_error_the_probes_report(tmp_path):
    env = {"PIPELINE": "llm", "MODEL_ID": "nobody/nothing", "MODEL_DIR": str(tmp_path)}
    runner = start_runner(env, tmp_path / "runner.log")
    try:
        with runner.client() as client:
            assert client.get("/health").json() == {"status": "ERROR"}
            assert client.get("/readyz").status_code == 503
            assert client.get("/livez").status_code == 503
            refused = client.post("/llm", json=LLM)
            assert refused.status_code == 500
            assert "nobody/nothing" in error(refused)
        assert "nobody/nothing is not in" in runner.log.read_text()
    finally:
        stop(runner)
