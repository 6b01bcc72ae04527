"""The Live Runner reverse proxy's pure parts against go-livepeer's rules
(live-runner-wire.md 5.1: the Rewrite hook's path join, query and headers; 3-6: routes)."""

from __future__ import annotations

import pytest

from kubepeer.contracts.apps import ServedApp, parse_row, row_json
from kubepeer.contracts.price_table import CatalogueError
from kubepeer.proxy.liverunner.proxy_urls import BadTemplate, ProxyTemplate
from kubepeer.proxy.liverunner.relay import SessionHeaders, upstream_headers, upstream_url
from kubepeer.proxy.liverunner.service import route_of

SESSION = SessionHeaders("echo", "session_abcdefgh", "t" * 52, "https://o/runner/echo/session/s")


@pytest.mark.parametrize(
    ("base", "path", "query", "expected"),
    [
        ("http://10.0.0.1:8080", "", "", "http://10.0.0.1:8080/"),
        (
            "http://10.0.0.1:8080",
            "/v1/stream",
            "a=1&b=%20",
            "http://10.0.0.1:8080/v1/stream?a=1&b=%20",
        ),
        ("http://10.0.0.1:8080/base/", "/x/", "", "http://10.0.0.1:8080/base/x/"),
        ("http://10.0.0.1:8080", "/a/../../etc", "", "http://10.0.0.1:8080/etc"),  # cleaned
        ("http://10.0.0.1:8080", "/a%20b", "", "http://10.0.0.1:8080/a%20b"),  # decoded, re-encoded
        ("http://[fd00::1]:8080", "//x", "", "http://[fd00::1]:8080/x"),
    ],
)
def test_the_upstream_url_joins_paths_as_go_does(base, path, query, expected):
    assert upstream_url(base, path, query) == expected


def test_upstream_headers_drop_hop_by_hop_and_set_the_session_over_the_clients():
    sent = [("content-type", "application/json"), ("connection", "keep-alive, x-private"),
            ("x-private", "1"), ("x-forwarded-for", "10.1.1.1"), ("forwarded", "for=x"),
            ("livepeer-session-id", "forged"), ("livepeer-payment", "abc"), ("te", "trailers"),
            ("host", "proxy"), ("authorization", "Bearer t")]  # fmt: skip
    headers = upstream_headers(sent, SESSION)
    names = [n.lower() for n, _ in headers]
    assert names.count("livepeer-session-id") == 1
    assert dict((n.lower(), v) for n, v in headers)["livepeer-session-id"] == "session_abcdefgh"
    assert {"content-type", "livepeer-payment", "authorization"} <= set(names)  # as sent
    assert not {"connection", "x-private", "x-forwarded-for", "forwarded", "te", "host"} & set(
        names
    )


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/discovery", ("discovery", ())),
        ("/apps/echo/session", ("reserve", ("echo",))),
        ("/apps/echo/session/s1/stop", ("client_stop", ("echo", "s1"))),
        ("/apps/echo/session/s1/app", ("session_app", ("echo", "s1", None))),
        ("/apps/echo/session/s1/app/", ("session_app", ("echo", "s1", "/"))),
        ("/apps/echo/session/s1/app/ws/x", ("session_app", ("echo", "s1", "/ws/x"))),
        ("/apps/hello/app", ("single_shot", ("hello", None))),
        ("/apps/hello/app/v1/stream", ("single_shot", ("hello", "/v1/stream"))),
        ("/runner/echo/session/s1/stop", ("runner_stop", ("echo", "s1"))),
        ("/runner/echo/session/s1/channels", ("channels", ("echo", "s1"))),
        ("/apps/echo", None),
        ("/runner/echo/session/s1/proxy", ("create_proxy", ("echo", "s1"))),
        ("/runners/heartbeat", ("heartbeat", ())),
        ("/runners/runner_x/unregister", ("unregister", ("runner_x",))),
    ],
)
def test_routes(path, expected):
    assert route_of(path) == expected


ROW = ServedApp(route="echo", app="kubepeer/echo", mode="persistent", runner="live-echo",
                port=8080, capacity=2, on_demand=True, max_replicas=3, proxy=False,
                metadata=None, version="1", price=None)  # fmt: skip


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"mode": "single_shot"}, "mode"),
        ({"capacity": 0}, "capacity"),
        ({"route": " echo"}, "route"),
        ({"warm": "Sometimes"}, "warm"),
        ({"price": {"wei": 5, "unit": "seconds"}}, "price.wei"),
        ({"price": {"wei": "0", "unit": "seconds"}}, "price.wei"),
        ({"price": {"wei": "5", "unit": "hour"}}, "price.unit"),
    ],
)
def test_a_bad_app_row_is_refused_naming_the_field(change, field):
    with pytest.raises(CatalogueError, match=field.replace(".", r"\.")):
        parse_row({**row_json(ROW), **change}, "app.json")


def test_an_app_row_reads_back_as_written():
    assert parse_row(row_json(ROW), "app.json") == ROW
    row = row_json(ROW)
    del row["runner"]
    with pytest.raises(CatalogueError, match="missing field runner"):
        parse_row(row, "app.json")


@pytest.mark.parametrize(
    ("template", "host", "path", "found"),
    [
        ("https://o.example:8935/run/{proxy}", "O.example:8935", "/run/AbC/x/y", ("abc", "/x/y")),
        ("https://o.example:8935/run/{proxy}", "o.example:8935", "/run/abc", ("abc", "")),
        ("https://o.example:8935/run/{proxy}", "other:8935", "/run/abc", None),
        ("https://o.example:8935/run/{proxy}", "o.example:8935", "/apps/abc", None),
        ("https://{proxy}.apps.example", "Abc.apps.example:443", "/x", ("abc", "/x")),
        ("https://{proxy}.apps.example", "apps.example", "/x", None),
        ("https://p-{proxy}.apps.example", "p-abc.apps.example", "/", ("abc", "/")),
    ],
)
def test_a_generated_url_is_found_by_its_template(template, host, path, found):
    assert ProxyTemplate.parse(template).find(host, path) == found


@pytest.mark.parametrize(
    "template",
    [
        "/run/{proxy}",
        "https://o/run/{proxy}/x",
        "https://o/{proxy}/{proxy}",
        "https://o/run",
        "https://{proxy}.o/run",
    ],
)
def test_a_bad_template_is_refused(template):
    with pytest.raises(BadTemplate):
        ProxyTemplate.parse(template)
