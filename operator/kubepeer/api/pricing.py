"""Pricing: what the orchestrator charges, per pipeline and model, optionally per gateway."""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar, Literal, Self

from pydantic import Field, model_validator

from kubepeer.api.common import Condition, DecimalString, KubeModel, KubeResource, cel
from kubepeer.livepeer.capabilities import BILLING_UNIT, Pipeline, Unit, unit_fits

ETH_ADDRESS_PATTERN = r"^0x[0-9a-fA-F]{40}$"
ANY = "*"


class Currency(StrEnum):
    USD = "USD"
    ETH = "ETH"
    WEI = "wei"


def _pipelines_by_unit() -> dict[Unit, list[str]]:
    by_unit: dict[Unit, list[str]] = {}
    for pipeline, unit in BILLING_UNIT.items():
        by_unit.setdefault(unit, []).append(pipeline.value)
    return by_unit


def cel_unit_fits(pipeline: str, unit: str) -> str:
    """CEL for `unit_fits`, generated from the same table."""
    clauses = [
        f"({unit} == '{u.value}' && {pipeline} in {sorted(ps)})"
        for u, ps in _pipelines_by_unit().items()
    ]
    return f"{unit} == 'request' || " + " || ".join(clauses)


def unit_mismatch(pipeline: Pipeline, unit: Unit) -> str:
    return (
        f"unit '{unit.value}' cannot bill {pipeline.value} jobs: use "
        f"'{BILLING_UNIT[pipeline].value}' or 'request'"
    )


def _unit_table() -> str:
    return "; ".join(f"{u.value} for {', '.join(ps)}" for u, ps in _pipelines_by_unit().items())


UNIT_MUST_FIT = f"unit must be the pipeline's Livepeer billing unit ({_unit_table()}) or request"
USD_NEEDS_RATE = "a price in USD needs usdPerEth, the conversion rate to ETH"


class Price(KubeModel):
    """A price: pricePerUnit per pixelsPerUnit units, in one currency."""

    price_per_unit: DecimalString = Field(
        description="Price of pixelsPerUnit units, as a decimal string (0.004, 1.5e-9)."
    )
    unit: Unit | None = Field(
        default=None,
        description=(
            f"What the price is per: {_unit_table()}; or request. Omitted: the pipeline's own unit."
        ),
    )
    pixels_per_unit: int = Field(
        default=1,
        ge=1,
        le=10**12,
        description=(
            "How many units pricePerUnit buys (go-livepeer's pixels_per_unit), e.g. 1048576 "
            "to price one 1024x1024 frame."
        ),
    )
    currency: Currency = Field(default=Currency.WEI, description="USD, ETH or wei.")
    usd_per_eth: DecimalString | None = Field(
        default=None, description="USD per ETH, to convert a USD price into wei."
    )


class PriceEntry(Price):
    """A price for one pipeline and model, or a wildcard."""

    model_config = Price.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel(
                    "self.pipeline == '*' || !has(self.unit) || "
                    + cel_unit_fits("self.pipeline", "self.unit"),
                    UNIT_MUST_FIT,
                    ".unit",
                ),
            ]
        }
    }

    pipeline: Pipeline | Literal["*"] = Field(
        description="The pipeline this price applies to, or '*' for every pipeline."
    )
    model_id: str = Field(
        default=ANY,
        min_length=1,
        max_length=256,
        description="The model this price applies to, or '*' for every model of the pipeline.",
    )
    gateway: str | None = Field(
        default=None,
        pattern=ETH_ADDRESS_PATTERN,
        description="Only for this gateway's Ethereum address. Omitted: every gateway.",
    )

    @model_validator(mode="after")
    def _unit_fits_pipeline(self) -> Self:
        if (
            self.unit is not None
            and self.pipeline != ANY
            and not unit_fits(Pipeline(self.pipeline), self.unit)
        ):
            raise ValueError(unit_mismatch(Pipeline(self.pipeline), self.unit))
        return self


class Surge(KubeModel):
    """Raise prices as free capacity falls, up to a cap."""

    utilization_threshold: float = Field(
        default=0.5,
        ge=0,
        lt=1,
        description="Fraction of capacity in use at which surge starts (0.5 = half busy).",
    )
    max_multiplier: float = Field(
        default=2.0,
        ge=1,
        le=100,
        description="Multiplier at full use; the price rises linearly to it from the threshold.",
    )


class PricingSpec(KubeModel):
    model_config = KubeModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel(
                    "self.prices.all(p, p.currency != 'USD' || has(p.usdPerEth)"
                    " || has(self.usdPerEth))",
                    USD_NEEDS_RATE + " (set spec.usdPerEth or the entry's usdPerEth)",
                    ".prices",
                ),
            ]
        }
    }

    prices: list[PriceEntry] = Field(
        min_length=1,
        max_length=256,
        description=(
            "Prices by pipeline, model and gateway. The most specific entry wins: a model "
            "beats '*', a gateway's price beats the default."
        ),
    )
    usd_per_eth: DecimalString | None = Field(
        default=None, description="USD per ETH for every USD entry that does not set its own."
    )
    surge: Surge | None = Field(default=None, description="Surge pricing. Omitted: none.")

    @model_validator(mode="after")
    def _usd_entries_have_a_rate(self) -> Self:
        for index, entry in enumerate(self.prices):
            if (
                entry.currency is Currency.USD
                and entry.usd_per_eth is None
                and not self.usd_per_eth
            ):
                raise ValueError(
                    f"spec.prices[{index}] is in USD: {USD_NEEDS_RATE} "
                    "(set spec.usdPerEth or the entry's usdPerEth)"
                )
        return self


class PricingStatus(KubeModel):
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Accepted: whether the operator compiled these prices into the price table.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="The spec generation this status describes."
    )


class Pricing(KubeResource):
    """What this orchestrator charges for AI jobs."""

    KIND: ClassVar[str] = "Pricing"
    PLURAL: ClassVar[str] = "pricings"

    kind: str = Field(default="Pricing", description="Pricing.")
    spec: PricingSpec = Field(description="Prices by pipeline and model.")
    status: PricingStatus | None = Field(default=None, description="What the operator observed.")
