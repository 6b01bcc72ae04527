"""The custom resources' models: samples round-trip, nonsense is refused with the field named."""

from __future__ import annotations

import copy
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from kubepeer.api import AIModel, LiveRunner, Pipeline, Pricing, WarmPolicy
from kubepeer.api.common import duration_seconds, quantity_bytes
from kubepeer.api.crd import crd_files, stale_crds, structural_schema
from tests.conftest import REPO

MANIFESTS = REPO / "manifests"
KINDS = {"AIModel": AIModel, "LiveRunner": LiveRunner, "Pricing": Pricing}


def sample_documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted([*MANIFESTS.glob("*.yaml"), *MANIFESTS.glob("demo/*.yaml")]):
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


SAMPLES = sample_documents()


def minimal_aimodel(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubepeer.io/v1alpha1",
        "kind": "AIModel",
        "metadata": {"name": "m"},
        "spec": {"pipeline": "text-to-image", "modelId": "org/model", **spec},
    }


def test_there_is_a_sample_aimodel_for_every_pipeline_and_policy():
    models = [AIModel.model_validate(doc) for _, doc in SAMPLES if doc["kind"] == "AIModel"]
    assert {m.spec.pipeline for m in models} == set(Pipeline)
    assert {m.spec.warm.policy for m in models} == set(WarmPolicy)
    assert any(m.spec.gpu.share_group for m in models)
    assert any(doc["kind"] == "Pricing" for _, doc in SAMPLES)


@pytest.mark.parametrize(("name", "doc"), SAMPLES, ids=[name for name, _ in SAMPLES])
def test_every_sample_round_trips_through_its_model(name, doc):
    model = KINDS[doc["kind"]].model_validate(doc)
    wire = model.to_wire()
    assert KINDS[doc["kind"]].model_validate(wire) == model
    # Nothing the user wrote is lost or renamed on the way through.
    assert _subset(doc, wire), f"{name}: {doc} is not contained in {wire}"


def _subset(small: Any, big: Any) -> bool:
    if isinstance(small, dict):
        return isinstance(big, dict) and all(
            k in big and _subset(v, big[k]) for k, v in small.items()
        )
    if isinstance(small, list):
        return isinstance(big, list) and len(small) == len(big) and all(map(_subset, small, big))
    if isinstance(small, float | int) and not isinstance(small, bool):
        return Decimal(str(small)) == Decimal(str(big))
    return small == big


def test_defaults_follow_the_warm_policy():
    always = AIModel.model_validate(minimal_aimodel())
    assert always.spec.warm.policy is WarmPolicy.ALWAYS
    assert always.spec.desired_replicas == 1
    cold = AIModel.model_validate(minimal_aimodel(warm={"policy": "OnDemand", "maxReplicas": 3}))
    assert cold.spec.desired_replicas == 0
    scaled = AIModel.model_validate(
        minimal_aimodel(warm={"policy": "OnDemand", "maxReplicas": 3}, replicas=2)
    )
    assert scaled.spec.desired_replicas == 2


def test_price_is_kept_exactly_as_a_decimal():
    doc = copy.deepcopy(dict(SAMPLES)["pricing.yaml"])
    pricing = Pricing.model_validate(doc)
    assert pricing.spec.prices[0].price_per_unit == Decimal("0.004")
    assert pricing.to_wire()["spec"]["prices"][0]["pricePerUnit"] == "0.004"


INVALID_SPECS = [
    ({"pipeline": "text-to-3d"}, "pipeline"),
    ({"modelId": ""}, "modelId"),
    ({"capacity": -1}, "capacity"),
    ({"warm": {"minReplicas": 3, "maxReplicas": 2}}, "minReplicas"),
    ({"warm": {"policy": "OnDemand", "minReplicas": 1}}, "OnDemand"),
    ({"warm": {"policy": "Sometimes"}}, "policy"),
    ({"warm": {"idleTimeout": "ten minutes"}}, "idleTimeout"),
    ({"gpu": {"minMemory": "lots"}}, "minMemory"),
    ({"gpu": {"count": 2, "shareGroup": "small"}}, "gpu.count"),
    ({"optimizations": ["WARP_DRIVE"]}, "optimizations"),
    ({"replicas": 5, "warm": {"maxReplicas": 2}}, "replicas"),
    ({"pricing": {}}, "pricing"),
    ({"pricing": {"price": {"pricePerUnit": "1", "unit": "furlong"}}}, "unit"),
    ({"pricing": {"price": {"pricePerUnit": "1", "unit": "token"}}}, "unit"),
    ({"pricing": {"price": {"pricePerUnit": "0.1", "currency": "USD"}}}, "usdPerEth"),
    ({"pricing": {"price": {"pricePerUnit": "-1"}}}, "pricePerUnit"),
    ({"colour": "blue"}, "colour"),
]


@pytest.mark.parametrize(("spec", "field"), INVALID_SPECS, ids=[f for _, f in INVALID_SPECS])
def test_invalid_aimodel_is_refused_naming_the_field(spec, field):
    with pytest.raises(ValidationError) as caught:
        AIModel.model_validate(minimal_aimodel(**spec))
    assert field in str(caught.value)


def test_usd_pricing_needs_a_conversion_rate():
    doc = {
        "apiVersion": "kubepeer.io/v1alpha1",
        "kind": "Pricing",
        "metadata": {"name": "p"},
        "spec": {"prices": [{"pipeline": "llm", "pricePerUnit": "0.0001", "currency": "USD"}]},
    }
    with pytest.raises(ValidationError, match="usdPerEth"):
        Pricing.model_validate(doc)
    doc["spec"]["usdPerEth"] = "3000"
    assert Pricing.model_validate(doc).spec.usd_per_eth == Decimal(3000)


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [("24Gi", 24 * 2**30), ("80G", 80 * 10**9), ("1.5Gi", 3 * 2**29), ("512", 512)],
)
def test_memory_quantities(quantity, expected):
    assert quantity_bytes(quantity) == expected


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("10m", 600), ("1h30m", 5400)])
def test_durations(text, seconds):
    assert duration_seconds(text) == seconds


def test_structural_schema_has_no_constructs_the_api_server_refuses():
    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for banned in ("$ref", "anyOf", "oneOf", "allOf", "title", "const", "$defs"):
                assert banned not in node, f"{banned} at {path}"
            if "properties" in node:
                assert node.get("type") == "object", f"untyped object at {path}"
                for name, sub in node["properties"].items():
                    if name != "metadata":
                        assert sub.get("description"), f"no description at {path}.{name}"
            for key, value in node.items():
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for item in node:
                walk(item, path)

    for model in (AIModel, Pricing):
        walk(structural_schema(model), model.KIND)


def test_committed_crds_are_current():
    result = subprocess.run(
        [sys.executable, "-m", "kubepeer.cli", "crds", "--check"],
        cwd=REPO,
        env={},  # no KUBEPEER_* setting of this shell
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_crds_check_notices_a_stale_file(tmp_path: Path):
    for name, text in crd_files().items():
        (tmp_path / name).write_text(text)
    assert stale_crds(tmp_path) == []
    victim = next(iter(crd_files()))
    (tmp_path / victim).write_text(
        (tmp_path / victim).read_text().replace("minimum: 1", "minimum: 0")
    )
    assert stale_crds(tmp_path) == [victim]
