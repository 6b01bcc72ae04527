"""A heartbeat's body judged as go-livepeer judges it (live-runner-wire.md 2.1, 2.3 and
section 10 item 10), and the o2r channel's messages (2.4). Pure."""

from __future__ import annotations

import json

import pytest

from kubepeer.proxy.liverunner.registry import Refusal, o2r_event, parse_heartbeat

GOOD = {"runner_url": "https://10.0.0.9:9000/base", "app": "acme/echo"}


def test_defaults_as_go_livepeer_normalizes_them():
    state = parse_heartbeat({**GOOD, "mode": "single_shot", "capacity": 0, "gpu": 1}, False)
    assert (state.mode, state.capacity, state.gpu, state.status) == ("single-shot", 1,
                                                                      {"id": "1"}, "")  # fmt: skip
    assert state.ready
    assert state.price is None  # offchain: price_info is not read
    assert not parse_heartbeat({**GOOD, "status": "draining"}, False).ready


@pytest.mark.parametrize(
    ("price_info", "field"),
    [
        (None, "price_info.price"),
        ({"price": 0}, "price_info.price"),
        ({"price": "-1"}, "price_info.price"),
        ({"price": "cheap"}, "price_info.price"),
        ({"price": True}, "price_info.price"),
        ({"price": 1, "currency": "eur"}, "price_info.currency"),
        ({"price": 1, "unit": "minute"}, "price_info.unit"),
    ],
)
def test_an_on_chain_runner_needs_a_positive_usd_price_per_hour_720p_or_call(price_info, field):
    with pytest.raises(Refusal) as refused:
        parse_heartbeat({**GOOD, "price_info": price_info}, True)
    assert refused.value.status == 400
    assert refused.value.text.startswith(field)


def test_an_on_chain_price_is_kept_as_decimal_text():
    state = parse_heartbeat({**GOOD, "price_info": {"price": "3.50", "unit": "720p"}}, True)
    assert state.price == {"price": "3.50", "currency": "usd", "unit": "720p"}


def test_o2r_events_carry_the_session_and_an_rfc3339_utc_timestamp():
    message = json.loads(o2r_event("reserved", "session_abc", now=1_796_690_038.5))
    assert message == {"event": "reserved", "session": "session_abc",
                       "timestamp": "2026-12-08T00:33:58.5Z"}  # fmt: skip
    whole = json.loads(o2r_event("released", "s", now=1_796_690_038.0))
    assert whole["timestamp"] == "2026-12-08T00:33:58Z"  # trailing zeros trimmed, dot too


@pytest.mark.parametrize(
    ("url", "loopback", "refused"),
    [
        ("http://127.0.0.1:9000", False, True),
        ("http://localhost:9000", False, True),
        ("http://127.0.0.1:9000", True, False),  # --loopback-runners
        ("http://169.254.169.254/", True, True),  # metadata: never
        ("http://[fe80::1]:80/", True, True),
        ("http://metadata.google.internal/", True, True),
        ("http://10.1.2.3:8000", False, False),  # a LAN runner
        ("https://runner.example:443", False, False),
    ],
)
def test_a_runner_url_may_not_reach_the_proxys_host_or_metadata(url, loopback, refused):
    body = {**GOOD, "runner_url": url}
    if refused:
        with pytest.raises(Refusal, match="runner_url must not point at"):
            parse_heartbeat(body, False, loopback)
    else:
        assert parse_heartbeat(body, False, loopback).runner_url == url
