"""The example Live Runner apps (issue 26, item 7) as processes on loopback, called as the
orchestrator's reverse proxy calls them (live-runner-wire.md 5.1): any path, the session
headers set, SSE read as it is written."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from tests.runners import serve_app

SESSION = {
    "Livepeer-Runner-Route": "runner_abcdefgh",
    "Livepeer-Session-Id": "session_12345678",
    "Livepeer-Session-Token": "never-echoed",
    "Livepeer-Session-Control": "https://o.example:8935/runner/runner_abcdefgh/session/s",
}


@pytest.fixture(scope="module")
def hello(tmp_path_factory) -> Iterator[str]:
    yield from serve_app("hello-world", tmp_path_factory.mktemp("hello") / "app.log")


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Iterator[str]:
    yield from serve_app("tokens", tmp_path_factory.mktemp("tokens") / "app.log")


def test_hello_world_answers_any_call_with_what_the_orchestrator_said(hello):
    answer = httpx.post(f"{hello}/greet/me?x=1", content=b"12345", headers=SESSION)
    assert answer.status_code == 200
    body = answer.json()
    assert (body["message"], body["method"], body["path"], body["bytes"]) == (
        "hello, world", "POST", "/greet/me", 5)  # fmt: skip
    assert body["session"] == {"runner-route": "runner_abcdefgh",
                               "session-id": "session_12345678",
                               "session-control": SESSION["Livepeer-Session-Control"]}  # fmt: skip
    assert "never-echoed" not in answer.text  # the session token stays with the app
    assert httpx.get(f"{hello}/").json()["session"]["session-id"] is None


def test_tokens_streams_each_event_as_it_is_made(tokens):
    request = {"prompt": "the quick brown fox", "max_tokens": 6, "delay_ms": 300}
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", f"{tokens}/v1/stream", json=request) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = response.iter_raw()
        first = next(chunks)
        rest = b"".join(chunks)
    # The first token came on its own, the other five (1.5 s of them) after: not buffered.
    assert first.count(b"data: ") == 1
    events = [e for e in (first + rest).decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    tokens_seen = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert [t["index"] for t in tokens_seen] == list(range(6))
    assert [t["token"] for t in tokens_seen] == ["the", "quick", "brown", "fox", "the", "quick"]


@pytest.mark.parametrize(
    ("request_body", "field"),
    [({"prompt": ""}, "prompt"), ({"prompt": "x", "max_tokens": 0}, "max_tokens")],
)
def test_tokens_refuses_a_bad_request_naming_the_field(tokens, request_body, field):
    refused = httpx.post(f"{tokens}/v1/stream", json=request_body)
    assert refused.status_code == 422
    assert field in refused.text
