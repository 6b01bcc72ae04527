"""The app table: each LiveRunner's row, in its own ConfigMap, as the operator writes it and
the proxy reads it (contracts/apps.py), written only when what it says changes."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from kubepeer.api import LiveRunnerSpec
from kubepeer.api.live_runner import AdvertisedPrice
from kubepeer.contracts import labels as L
from kubepeer.contracts.apps import APP_ROW_KEY, AppPrice, ServedApp, parse_row, row_json
from kubepeer.controller.fleet import View
from kubepeer.controller.handlers import INDICES, build_registry
from kubepeer.controller.live_runners import (
    LiveRunners,
    NoAppPrice,
    advertised_price,
    app_row,
    build_app_table,
    resolve_app_price,
)
from kubepeer.controller.settings import OperatorSettings
from kubepeer.livepeer.price_feed import EthUsd

SETTINGS = OperatorSettings(runner_image="runner:default")
NOW = datetime(2025, 1, 1, tzinfo=UTC)
AT_3000 = EthUsd(answer=3000 * 10**8, decimals=8, round_id=7, updated_at=1, feed="0xfeed",
                 read_at=NOW.timestamp())  # fmt: skip
HOURLY_USD = {"price": {"amount": "3.50", "currency": "USD", "unit": "hour"}}
HOURLY_WEI = {"price": {"amount": "36000", "currency": "wei", "unit": "hour"}}  # 10 a second


def spec(**fields: Any) -> LiveRunnerSpec:
    return LiveRunnerSpec.model_validate({"app": "examples/echo", "image": "apps:1", **fields})


def priced(s: LiveRunnerSpec, eth_usd: EthUsd | None = None) -> AdvertisedPrice:
    return advertised_price(resolve_app_price(s, {}), eth_usd)


def table_row(table: dict[str, Any]) -> ServedApp:
    return parse_row(json.loads(table["data"][APP_ROW_KEY]), "test")


def test_the_row_is_the_app_as_the_proxy_serves_it():
    s = spec(mode="single-shot", port=9000, capacity=3, metadata="a demo", version="v2",
             proxy=True, warm={"policy": "OnDemand", "maxReplicas": 4},
             pricing=HOURLY_WEI)  # fmt: skip
    row = app_row("echo", s, priced(s))
    assert row == ServedApp(
        route="echo", app="examples/echo", mode="single-shot", runner="live-echo", port=9000,
        capacity=3, on_demand=True, max_replicas=4, proxy=True, metadata="a demo",
        version="v2", price=AppPrice(wei=10, unit="seconds"),
    )  # fmt: skip
    defaults = app_row("a.b", spec(), None)
    assert (defaults.mode, defaults.port, defaults.capacity) == ("persistent", 8080, 1)
    assert (defaults.on_demand, defaults.max_replicas, defaults.proxy) == (False, 1, False)
    assert defaults.runner == L.live_runner_name("a.b")  # the app's headless Service
    assert (defaults.metadata, defaults.version, defaults.price) == (None, None, None)


def test_the_table_configmap_is_labelled_named_and_owned_by_its_live_runner():
    s = spec(pricing=HOURLY_WEI)
    table = build_app_table("ns", "echo", "uid-1", app_row("echo", s, priced(s)))
    meta = table["metadata"]
    assert (table["apiVersion"], table["kind"]) == ("v1", "ConfigMap")
    assert (meta["name"], meta["namespace"]) == ("kubepeer-app-echo", "ns")
    assert meta["labels"] == {L.PART_OF: "kubepeer", L.MANAGED_BY: L.MANAGER, L.TABLE: "app"}
    assert meta["annotations"][L.LIVE_RUNNER_ANNOTATION] == "echo"
    assert meta["annotations"][L.CONTENT_HASH]
    assert meta["ownerReferences"] == [{
        "apiVersion": "kubepeer.io/v1alpha1", "kind": "LiveRunner", "name": "echo",
        "uid": "uid-1", "controller": True, "blockOwnerDeletion": False,
    }]  # fmt: skip
    assert list(table["data"]) == [APP_ROW_KEY]
    assert json.loads(table["data"][APP_ROW_KEY])["price"] == {"wei": "10", "unit": "seconds"}
    long = "x" * 250  # a LiveRunner name may be 253 characters: the table's name stays valid
    long_table = build_app_table("ns", long, "u", app_row(long, spec(), None))
    assert len(long_table["metadata"]["name"]) <= 253


@pytest.mark.parametrize(
    ("fields", "eth_usd", "price"),
    [
        ({"pricing": HOURLY_USD}, AT_3000, AppPrice(324074074074, "seconds")),  # 3.50 USD/h
        ({"pricing": HOURLY_WEI}, None, AppPrice(10, "seconds")),
        (
            {"pricing": {"price": {"amount": "0.01", "unit": "fixed"}}},
            AT_3000,
            AppPrice(3333333333333, "fixed"),
        ),  # 0.01 USD a session
        ({"pricing": HOURLY_USD}, None, None),  # no ETH/USD reading yet: null, not dropped
        ({}, None, None),  # no Pricing at all
    ],
)
def test_the_row_round_trips_through_the_proxys_reader_priced_or_not(fields, eth_usd, price):
    s = spec(**fields)
    try:
        advertised = priced(s, eth_usd)
    except NoAppPrice:  # the status says why; the row carries no price
        advertised = None
    row = app_row("echo", s, advertised)
    assert row.price == price
    assert parse_row(row_json(row), "test") == row
    assert table_row(build_app_table("ns", "echo", "u", row)) == row


def test_the_content_hash_changes_with_the_row_and_only_with_it():
    def hash_of(name: str = "echo", uid: str = "u", price: Any = None, **fields: Any) -> str:
        table = build_app_table("ns", name, uid, app_row(name, spec(**fields), price))
        return table["metadata"]["annotations"][L.CONTENT_HASH]

    same = hash_of(capacity=2)
    assert hash_of(capacity=2) == same
    assert hash_of(capacity=2, image="apps:2", gpu={"count": 2}) == same  # not in the row
    assert hash_of(capacity=2, uid="another") == same  # the row, not the owner
    assert hash_of(capacity=3) != same
    assert hash_of(capacity=2, warm={"maxReplicas": 2}) != same
    assert hash_of(capacity=2, metadata="new") != same
    assert hash_of("other", capacity=2) != same
    assert hash_of(capacity=2, price=AdvertisedPrice(wei="10", unit="seconds")) != same
    # A new ETH/USD reading at which the wei price comes out the same writes nothing.
    reread = AdvertisedPrice(wei="10", unit="seconds", usd_per_eth="3001", round_id="8")
    assert hash_of(price=reread) == hash_of(price=AdvertisedPrice(wei="10", unit="seconds"))


# --- the operator writes the row when, and only when, it changes ---


class FakeKube:
    def __init__(self) -> None:
        self.applied: list[dict[str, Any]] = []
        self.statuses: list[dict[str, Any]] = []
        self.fail = False

    def apply(self, manifest: dict[str, Any]) -> None:
        if self.fail:
            raise ConnectionError("the API server is away")
        self.applied.append(manifest)

    def patch_status(self, namespace: str, name: str, status: dict[str, Any], plural: str) -> None:
        self.statuses.append(status)


def live_runner(**fields: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubepeer.io/v1alpha1",
        "kind": "LiveRunner",
        "metadata": {"name": "echo", "namespace": "ns", "uid": "uid-1", "generation": 1},
        "spec": {"app": "examples/echo", "image": "apps:1", **fields},
    }


def operator(body: dict[str, Any]) -> tuple[LiveRunners, FakeKube, dict[Any, list[Any]]]:
    kube, tables = FakeKube(), {}
    view = View(live_runners={("ns", "live-echo"): [body]}, app_tables=tables)
    live = LiveRunners(SETTINGS, kube, view)
    return live, kube, tables


def watched(live: LiveRunners, tables: dict[Any, list[Any]], table: dict[str, Any]) -> None:
    """The watch shows the operator's write back (the index), a minute later (`applied`)."""
    tables[("ns", "echo")] = [table["metadata"]["annotations"][L.CONTENT_HASH]]
    live.view.applied.clear()


def test_the_operator_writes_the_row_once_and_again_when_it_changes():
    body = live_runner(capacity=2, pricing=HOURLY_WEI)
    live, kube, tables = operator(body)
    live.refresh_status("ns", "live-echo")
    [table] = kube.applied
    assert table_row(table).capacity == 2
    assert table_row(table).price == AppPrice(10, "seconds")
    live.refresh_status("ns", "live-echo")  # before the watch shows it: written, not again
    watched(live, tables, table)
    live.refresh_status("ns", "live-echo")  # shown by the watch: nothing to write
    assert len(kube.applied) == 1

    body["spec"]["capacity"] = 4
    live.refresh_status("ns", "live-echo")
    assert [table_row(t).capacity for t in kube.applied] == [2, 4]


def test_a_price_that_goes_away_leaves_the_row_with_a_null_price():
    body = live_runner(pricing=HOURLY_USD)
    live, kube, tables = operator(body)
    live.eth_usd = AT_3000
    live.refresh_status("ns", "live-echo")
    assert table_row(kube.applied[-1]).price == AppPrice(324074074074, "seconds")
    watched(live, tables, kube.applied[-1])
    live.eth_usd = None  # no ETH/USD reading: no price in wei
    live.refresh_status("ns", "live-echo")
    assert len(kube.applied) == 2
    assert table_row(kube.applied[-1]).price is None
    assert kube.statuses[-1]["price"] is None


def test_a_failed_write_is_retried_and_an_invalid_spec_gets_no_row():
    live, kube, _ = operator(live_runner(pricing=HOURLY_WEI))
    kube.fail = True
    live.refresh_status("ns", "live-echo")
    assert live.retry == {("ns", "live-echo")}
    kube.fail = False
    live.sweep()  # the app's Service and Deployment, then its row
    assert [m["kind"] for m in kube.applied] == ["Service", "Deployment", "ConfigMap"]
    assert not live.retry

    invalid, kube, _ = operator(live_runner(capacity=0))  # an older CRD let it through
    invalid.refresh_status("ns", "live-echo")
    assert not [m for m in kube.applied if m["kind"] == "ConfigMap"]
    assert kube.statuses[-1]["phase"] == "Failed"


def test_the_operator_watches_app_tables_apart_from_model_tables():
    assert "app_tables" in INDICES
    registry = build_registry(SETTINGS, None, None)  # type: ignore[arg-type]
    ids = {h.id for h in registry._indexing.get_all_handlers()}
    assert {"tables", "app_tables"} <= ids
    watching = {h.id for h in registry._watching.get_all_handlers()}
    assert any("app_table_event" in i for i in watching)
