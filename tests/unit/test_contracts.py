"""What the operator and the proxy exchange is typed once (kubepeer.contracts), and neither
imports the other."""

from __future__ import annotations

import ast
from fractions import Fraction
from pathlib import Path

import pytest

from kubepeer.api import AIModelSpec, PricingSpec
from kubepeer.contracts.price_table import (
    CatalogueError,
    ModelPrice,
    ServedModel,
    Surge,
    parse_row,
    row_json,
)
from kubepeer.controller.prices import TableRow, model_entry, resolve_price
from kubepeer.livepeer.capabilities import Pipeline

PACKAGE = Path(__file__).resolve().parents[2] / "operator" / "kubepeer"


def imported(package: str) -> set[str]:
    """Every kubepeer module a package's files import."""
    names: set[str] = set()
    for path in (PACKAGE / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
    return {n for n in names if n.startswith("kubepeer")}


@pytest.mark.parametrize(("package", "peer"), [("proxy", "controller"), ("controller", "proxy")])
def test_operator_and_proxy_are_peers(package, peer):
    crossing = {n for n in imported(package) if n.startswith(f"kubepeer.{peer}")}
    assert not crossing, f"kubepeer.{package} imports {sorted(crossing)}"


def test_a_row_reads_back_as_it_was_written():
    model = ServedModel(
        aimodel="sd", pipeline=Pipeline.TEXT_TO_IMAGE, model_id="org/sd", runner="runner-sd",
        port=8000, capacity=2, on_demand=True, max_replicas=3,
        price=ModelPrice(Fraction(3, 7), gateways={b"\x11" * 20: Fraction(1, 2)},
                         surge=Surge(0.5, 2.0)),
    )  # fmt: skip
    assert parse_row(row_json(model), "t") == model
    unpriced = ServedModel("x", Pipeline.LLM, "org/llm", "runner-x", 8000, 1, False, 1, None)
    assert parse_row(row_json(unpriced), "t") == unpriced


def test_the_operators_row_is_what_the_proxy_serves_and_charges():
    spec = AIModelSpec.model_validate(
        {"pipeline": "live-video-to-video", "modelId": "org/live", "capacity": 2,
         "warm": {"policy": "OnDemand", "maxReplicas": 4}, "pricing": {"ref": "p"}}
    )  # fmt: skip
    pricing = PricingSpec.model_validate(
        {"prices": [{"pipeline": "*", "pricePerUnit": "1200", "unit": "second",
                     "currency": "wei"}],
         "surge": {"utilizationThreshold": 0.5, "maxMultiplier": 2}}
    )  # fmt: skip
    price = resolve_price(spec, {"p": pricing})
    served = parse_row(model_entry(TableRow("live", spec, "runner-live", price), 8000), "t")
    assert (served.pipeline, served.on_demand, served.max_replicas) == (spec.pipeline, True, 4)
    # A second of live video is 1280 x 720 x 30 pixels on the wire (gateway-wire 3.3).
    assert served.price == ModelPrice(Fraction(1200, 1280 * 720 * 30), surge=Surge(0.5, 2.0))
    assert served.price.for_gateway(b"\x22" * 20, utilization=1.0) == Fraction(2400, 27648000)


def test_a_row_that_says_too_little_is_refused_naming_the_field():
    entry = row_json(ServedModel("sd", Pipeline.TEXT_TO_IMAGE, "org/sd", "r", 8000, 1, False, 1,
                                 ModelPrice(Fraction(1))))  # fmt: skip
    del entry["runner"]
    with pytest.raises(CatalogueError, match=r"models\[0\] \(sd\): missing field runner"):
        parse_row(entry, "models[0]")
    entry = row_json(ServedModel("sd", Pipeline.TEXT_TO_IMAGE, "org/sd", "r", 8000, 1, False, 1,
                                 ModelPrice(Fraction(1))))  # fmt: skip
    entry["price"]["weiPerUnit"] = "-1"
    with pytest.raises(CatalogueError, match=r"price.weiPerUnit: '-1' is negative"):
        parse_row(entry, "m")
