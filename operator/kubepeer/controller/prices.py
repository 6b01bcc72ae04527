"""Pure price compilation: AIModels and Pricings in, the proxy's table and aiModels.json out.

Prices are exact rationals in wei per billed unit until the very edge, where the
Livepeer wire wants two int64s (pricePerUnit / pixelsPerUnit).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from kubepeer.api import AIModelSpec, Currency, Price, PriceEntry, PricingSpec, WarmPolicy
from kubepeer.api.pricing import ANY
from kubepeer.contracts.price_table import (
    ModelPrice,
    PricingProblem,
    ServedModel,
    Surge,
    price_info,
    row_json,
)
from kubepeer.livepeer.capabilities import BILLING_UNIT, PIXELS_PER_UNIT, Unit, unit_fits

WEI_PER_ETH = 10**18


@dataclass(frozen=True)
class CompiledPrice:
    """What one model costs as its Pricing says it: wei per billed unit (per second of live
    video, say), by default and per gateway; `table_price` is what the proxy serves."""

    unit: Unit
    wei_per_unit: Fraction
    gateways: dict[str, Fraction] = field(default_factory=dict)
    source: Price | None = None  # the price as the user wrote it, for aiModels.json
    surge: Surge | None = None

    # What gateways see: a price per second of live video is per 1280x720x30 pixels.
    @property
    def pixels_per_unit(self) -> int:
        return PIXELS_PER_UNIT.get(self.unit, 1)

    @property
    def wire_unit(self) -> Unit:
        return Unit.PIXEL if self.unit in PIXELS_PER_UNIT else self.unit

    @property
    def wire_wei(self) -> Fraction:
        return self.wei_per_unit / self.pixels_per_unit

    @property
    def wire_gateways(self) -> dict[str, Fraction]:
        return {a: w / self.pixels_per_unit for a, w in self.gateways.items()}

    def table_price(self) -> CompiledPrice:
        """The price table's price: wei per wire unit, gateways by address bytes."""
        gateways = {bytes.fromhex(a.removeprefix("0x")): w for a, w in self.wire_gateways.items()}
        return ModelPrice(wei_per_unit=self.wire_wei, gateways=gateways, surge=self.surge,
                          unit=self.wire_unit.value)  # fmt: skip


def wei_per_unit(price: Price, usd_per_eth: Fraction | None) -> Fraction:
    amount = Fraction(price.price_per_unit)
    match price.currency:
        case Currency.WEI:
            wei = amount
        case Currency.ETH:
            wei = amount * WEI_PER_ETH
        case Currency.USD:
            rate = Fraction(price.usd_per_eth) if price.usd_per_eth is not None else usd_per_eth
            if not rate:
                raise PricingProblem("a USD price needs a usdPerEth conversion rate above 0")
            wei = amount * WEI_PER_ETH / rate
    return wei / price.pixels_per_unit


def _matches(entry: PriceEntry, spec: AIModelSpec) -> int | None:
    """How specifically `entry` prices `spec` (higher wins), or None when it does not."""
    if entry.pipeline not in (ANY, spec.pipeline.value):
        return None
    if entry.model_id not in (ANY, spec.model_id):
        return None
    if entry.unit is not None and not unit_fits(spec.pipeline, entry.unit):
        return None
    return (2 if entry.pipeline != ANY else 0) + (1 if entry.model_id != ANY else 0)


def _best(entries: list[PriceEntry], spec: AIModelSpec) -> PriceEntry | None:
    scored = [(s, i, e) for i, e in enumerate(entries) if (s := _matches(e, spec)) is not None]
    # Most specific first; among equals, the one written first.
    return min(scored, key=lambda t: (-t[0], t[1]))[2] if scored else None


def price_from_pricing(spec: AIModelSpec, pricing_name: str, pricing: PricingSpec) -> CompiledPrice:
    rate = Fraction(pricing.usd_per_eth) if pricing.usd_per_eth is not None else None
    default = _best([e for e in pricing.prices if e.gateway is None], spec)
    if default is None:
        raise PricingProblem(
            f"Pricing '{pricing_name}' has no price for {spec.pipeline.value} {spec.model_id}"
        )
    gateways: dict[str, Fraction] = {}
    for address in sorted({e.gateway.lower() for e in pricing.prices if e.gateway}):
        entries = [e for e in pricing.prices if e.gateway and e.gateway.lower() == address]
        if best := _best(entries, spec):
            gateways[address] = wei_per_unit(best, rate)
    return CompiledPrice(
        unit=default.unit or BILLING_UNIT[spec.pipeline],
        wei_per_unit=wei_per_unit(default, rate),
        gateways=gateways,
        source=default.model_copy(
            update={"usd_per_eth": default.usd_per_eth or pricing.usd_per_eth}
        ),
        surge=_surge(pricing),
    )


def _surge(pricing: PricingSpec) -> Surge | None:
    if pricing.surge is None:
        return None
    return Surge(pricing.surge.utilization_threshold, pricing.surge.max_multiplier)


def resolve_price(spec: AIModelSpec, pricings: dict[str, PricingSpec]) -> CompiledPrice:
    """The price of one AIModel: inline, from the Pricing it names, or from any in its namespace.

    Raises PricingProblem when none applies or it cannot be advertised on the wire."""
    price = _resolve(spec, pricings)
    for wei in (price.wire_wei, *price.wire_gateways.values()):
        price_info(wei)
    return price


def _resolve(spec: AIModelSpec, pricings: dict[str, PricingSpec]) -> CompiledPrice:
    choice = spec.pricing
    if choice and choice.price:
        return CompiledPrice(
            unit=choice.price.unit or BILLING_UNIT[spec.pipeline],
            wei_per_unit=wei_per_unit(choice.price, None),
            source=choice.price,
        )
    if choice and choice.ref:
        if choice.ref not in pricings:
            raise PricingProblem(f"Pricing '{choice.ref}' not found in this namespace")
        return price_from_pricing(spec, choice.ref, pricings[choice.ref])
    problems = []
    for name in sorted(pricings):
        try:
            return price_from_pricing(spec, name, pricings[name])
        except PricingProblem as exc:
            problems.append(str(exc))
    raise PricingProblem(
        "; ".join(problems) if problems else "no Pricing in this namespace and no inline price"
    )


@dataclass(frozen=True)
class TableRow:
    aimodel: str
    spec: AIModelSpec
    runner: str
    price: CompiledPrice | None


def model_entry(row: TableRow, runner_port: int) -> dict[str, Any]:
    """One model's row of the proxy's table (see DESIGN.md, "The proxy's inputs")."""
    return row_json(
        ServedModel(
            aimodel=row.aimodel,
            pipeline=row.spec.pipeline,
            model_id=row.spec.model_id,
            runner=row.runner,
            port=runner_port,
            capacity=row.spec.capacity,
            on_demand=row.spec.warm.on_demand,
            max_replicas=row.spec.warm.max_replicas,
            price=row.price.table_price() if row.price else None,
        )
    )


def models_table(rows: list[TableRow], runner_port: int) -> dict[str, Any]:
    """Every row together, as `kubepeer table` prints it."""
    ordered = sorted(rows, key=lambda r: r.aimodel)
    return {"version": 1, "models": [model_entry(r, runner_port) for r in ordered]}


def ai_models_json(rows: list[TableRow], proxy_url: str) -> list[dict[str, Any]]:
    """go-livepeer's aiModels.json: every priced model as an external container at the proxy."""
    return [
        e for row in sorted(rows, key=lambda r: r.aimodel) for e in ai_model_entries(row, proxy_url)
    ]


def ai_model_entries(row: TableRow, proxy_url: str) -> list[dict[str, Any]]:
    """One model's aiModels.json entries: none if unpriced, one more per gateway price."""
    if row.price is None:
        return []  # unpriced models are not offered to gateways
    entry: dict[str, Any] = {
        "pipeline": row.spec.pipeline.value,
        "model_id": row.spec.model_id,
        "warm": row.spec.warm.policy is WarmPolicy.ALWAYS,
        "capacity": row.spec.capacity * row.spec.warm.max_replicas,
        "url": proxy_url,
    }
    if row.spec.optimizations:
        entry["optimization_flags"] = {f.value: True for f in row.spec.optimizations}
    source = row.price.source
    if source is not None and source.currency is Currency.USD:
        entry["price_per_unit"] = f"{format(source.price_per_unit, 'f')}USD"
        entry["pixels_per_unit"] = source.pixels_per_unit * row.price.pixels_per_unit
        entry["currency"] = "USD"
    else:
        num, den = price_info(row.price.wire_wei)
        entry["price_per_unit"] = num
        entry["pixels_per_unit"] = den
        entry["currency"] = "WEI"
    entries = [entry]
    for address, wei in row.price.wire_gateways.items():
        num, den = price_info(wei)
        entries.append(
            {**entry, "price_per_unit": num, "pixels_per_unit": den, "currency": "WEI",
             "gateway": address}
        )  # fmt: skip
    return entries
