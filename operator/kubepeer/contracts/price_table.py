"""One row of the price table: an AIModel as the proxy serves and charges it.

The operator writes each row (a `model.json` in the AIModel's table ConfigMap, or every
row in one `models.json`), and the proxy reads it; `row_json` and `parse_row` are the one
writer and the one reader of that shape (DESIGN.md, "The proxy's inputs"). Prices are exact
rationals in wei per wire unit (pixels for pixel-priced pipelines); `price_info` is where
the wire's two int64s are made. Pure.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any

from kubepeer.livepeer.capabilities import Pipeline

INT64_MAX = 2**63 - 1


class PricingProblem(ValueError):
    """No price applies to a model, or the wire cannot carry it, and why."""


class CatalogueError(ValueError):
    """A row does not say what the proxy needs; the message names the entry and field."""


@dataclass(frozen=True)
class Surge:
    """Surge pricing: the price rises as the free capacity of a model falls."""

    utilization_threshold: float
    max_multiplier: float

    def multiplier(self, utilization: float) -> Fraction:
        """1 up to the threshold, then linear to max_multiplier at full use."""
        if utilization <= self.utilization_threshold:
            return Fraction(1)
        rise = (utilization - self.utilization_threshold) / (1 - self.utilization_threshold)
        return Fraction(1) + Fraction(self.max_multiplier - 1) * Fraction(min(rise, 1.0))


@dataclass(frozen=True)
class ModelPrice:
    """What a model's jobs cost, in wei per wire unit: by default, and per gateway."""

    wei_per_unit: Fraction
    gateways: dict[bytes, Fraction] = field(default_factory=dict)
    surge: Surge | None = None
    unit: str = "pixel"  # the wire unit the price is per (pixel, ms, character, token)

    def for_gateway(self, gateway: bytes, utilization: float = 0.0) -> Fraction:
        base = self.gateways.get(gateway, self.wei_per_unit)
        return base * (self.surge.multiplier(utilization) if self.surge else 1)


@dataclass(frozen=True)
class ServedModel:
    """One AIModel as the proxy serves it."""

    aimodel: str
    pipeline: Pipeline
    model_id: str
    runner: str  # the runner Service's name
    port: int
    capacity: int  # concurrent jobs per replica
    on_demand: bool
    max_replicas: int
    price: ModelPrice | None  # None: not offered to gateways

    @property
    def capability(self) -> int:
        return self.pipeline.capability

    def charges(self, gateway: bytes) -> bool:
        """Whether this model's jobs cost `gateway` anything: then a zero price pays none."""
        return self.price is not None and self.price.for_gateway(gateway) > 0


def price_info(wei: Fraction) -> tuple[int, int]:
    """(pricePerUnit, pixelsPerUnit) as int64s, the closest the wire can say `wei`."""
    if wei > INT64_MAX:
        raise PricingProblem(f"{float(wei):.3g} wei per unit is more than the wire can carry")
    max_denominator = INT64_MAX if wei < 1 else INT64_MAX // math.ceil(wei)
    best = wei.limit_denominator(max_denominator)
    while best.numerator > INT64_MAX:  # rounding up may overshoot by a hair
        max_denominator //= 2
        best = wei.limit_denominator(max_denominator)
    return best.numerator, best.denominator


def exact_text(value: Fraction) -> str:
    """A rational as the table writes it: '3' or '1/4'."""
    if value.denominator == 1:
        return str(value.numerator)
    return f"{value.numerator}/{value.denominator}"


def row_json(model: ServedModel) -> dict[str, Any]:
    """The row as the table holds it (the writer: the operator)."""
    entry: dict[str, Any] = {
        "aimodel": model.aimodel,
        "pipeline": model.pipeline.value,
        "modelId": model.model_id,
        "capability": model.capability,
        "runner": model.runner,
        "port": model.port,
        "capacity": model.capacity,
        "warm": "OnDemand" if model.on_demand else "Always",
        "maxReplicas": model.max_replicas,
        "price": None,
    }
    if price := model.price:
        num, den = price_info(price.wei_per_unit)
        entry["price"] = {
            "unit": price.unit,
            "weiPerUnit": exact_text(price.wei_per_unit),
            "pricePerUnit": num,  # the wire's pair, for people reading the table
            "pixelsPerUnit": den,
            "gateways": {f"0x{a.hex()}": exact_text(w) for a, w in price.gateways.items()},
            "surge": asdict(price.surge) if price.surge else None,
        }
    return entry


def parse_row(entry: dict[str, Any], where: str) -> ServedModel:
    """The row from the table (the reader: the proxy); a CatalogueError names what is wrong."""
    where = f"{where} ({entry.get('aimodel', '?')})"
    try:
        return ServedModel(
            aimodel=entry["aimodel"],
            pipeline=Pipeline(entry["pipeline"]),
            model_id=entry["modelId"],
            runner=entry["runner"],
            port=int(entry["port"]),
            capacity=int(entry["capacity"]),
            on_demand=entry["warm"] == "OnDemand",
            max_replicas=int(entry["maxReplicas"]),
            price=_parse_price(entry.get("price"), f"{where}.price"),
        )
    except KeyError as exc:
        raise CatalogueError(f"{where}: missing field {exc.args[0]}") from None
    except CatalogueError:
        raise
    except (ValueError, TypeError) as exc:
        raise CatalogueError(f"{where}: {exc}") from None


def _exact(text: str, where: str) -> Fraction:
    try:
        value = Fraction(text)
    except (ValueError, ZeroDivisionError, TypeError):
        raise CatalogueError(
            f"{where}: {text!r} is not an exact number like '3' or '1/4'"
        ) from None
    if value < 0:
        raise CatalogueError(f"{where}: {text!r} is negative")
    return value


def _parse_price(raw: dict[str, Any] | None, where: str) -> ModelPrice | None:
    if raw is None:
        return None
    wei = _exact(raw["weiPerUnit"], f"{where}.weiPerUnit")
    try:
        price_info(wei)
    except PricingProblem as exc:  # what the wire cannot carry is never served
        raise CatalogueError(f"{where}.weiPerUnit: {exc}") from None
    gateways = {
        bytes.fromhex(address.removeprefix("0x")): _exact(text, f"{where}.gateways[{address}]")
        for address, text in (raw.get("gateways") or {}).items()
    }
    surge = raw.get("surge")
    return ModelPrice(
        wei_per_unit=wei,
        gateways=gateways,
        surge=Surge(surge["utilization_threshold"], surge["max_multiplier"]) if surge else None,
        unit=raw.get("unit", "pixel"),
    )
