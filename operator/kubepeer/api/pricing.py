"""Pricing: what the orchestrator charges, per pipeline and model, optionally per gateway."""

from __future__ import annotations

from decimal import Decimal
from enum import StrEnum
from typing import ClassVar, Literal, Self

from pydantic import Field, field_validator, model_validator

from kubepeer.api.common import Condition, DecimalString, DnsLabel, KubeModel, KubeResource, cel
from kubepeer.livepeer.capabilities import BILLING_UNIT, Pipeline, Unit, unit_fits

ETH_ADDRESS_PATTERN = r"^0x[0-9a-fA-F]{40}$"
ANY = "*"
ANY_APP = "*"
APP_NAME_PATTERN = r"^\S(.*\S)?$"  # go-livepeer: required, no surrounding spaces
_ZERO = r"^0+(\.0+)?([eE][-+]?[0-9]+)?$"
APP_AMOUNT_EXPONENT = 30  # an app's price is between 1e-30 and 1e30 of its currency


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
NEEDS_A_PRICE = "a Pricing needs at least one entry in spec.prices or spec.apps"


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


class AppUnit(StrEnum):
    """What an app's price is per, as runners.json's `price_info.unit` has it."""

    HOUR = "hour"  # per hour of a session; advertised per second
    P720 = "720p"  # per hour of nominal 720p30 video; advertised per pixel
    FIXED = "fixed"  # per session or call


class AppCurrency(StrEnum):
    USD = "USD"  # converted to wei at the Chainlink ETH/USD rate
    WEI = "wei"


class AppPrice(KubeModel):
    """A Live Runner app's price: `amount` of `currency` per `unit`."""

    model_config = KubeModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel(f"!self.amount.matches(r'{_ZERO}')", "amount must be above zero", ".amount"),
            ]
        }
    }

    amount: DecimalString = Field(description="The price of one unit, as a decimal string.")
    currency: AppCurrency = Field(
        default=AppCurrency.USD,
        description="USD (converted to wei from the Chainlink ETH/USD feed) or wei.",
    )
    unit: AppUnit = Field(
        default=AppUnit.HOUR,
        description=(
            "hour: per hour of a session, billed per second. 720p: per hour of 720p30 video, "
            "billed per pixel. fixed: per session or single-shot call."
        ),
    )

    @field_validator("amount")
    @classmethod
    def _a_price(cls, amount: Decimal) -> Decimal:
        if amount == 0:
            raise ValueError("amount must be above zero")
        if not -APP_AMOUNT_EXPONENT <= amount.adjusted() <= APP_AMOUNT_EXPONENT:
            raise ValueError(
                f"amount {amount} is out of range: between 1e-{APP_AMOUNT_EXPONENT} and "
                f"1e{APP_AMOUNT_EXPONENT}"
            )
        return amount


class AppPriceEntry(AppPrice):
    """A Pricing's price for one Live Runner app, or for every app."""

    app: str = Field(
        min_length=1,
        max_length=256,
        pattern=APP_NAME_PATTERN,
        description="The app this price applies to (as LiveRunner spec.app), or '*' for every app.",
    )


def match_app_price(entries: list[AppPriceEntry], app: str) -> AppPrice | None:
    """The price a Pricing's `apps` give an app: its own entry, else the '*' entry."""
    for wanted in (app, ANY_APP):
        for entry in entries:
            if entry.app == wanted:
                return AppPrice(amount=entry.amount, currency=entry.currency, unit=entry.unit)
    return None


EXACTLY_ONE_PRICING = (
    "set exactly one of pricing.ref (a Pricing in this namespace) "
    "and pricing.price (an inline price)"
)
REF_OR_PRICE = cel("has(self.ref) != has(self.price)", EXACTLY_ONE_PRICING)


class RefOrPrice(KubeModel):
    """A workload's `pricing`: a Pricing by name, or a price of its own (a subclass
    declares `price` and lists REF_OR_PRICE among its CEL rules)."""

    ref: DnsLabel | None = Field(
        default=None, description="Name of a Pricing in this namespace whose prices apply."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if (self.ref is None) == (getattr(self, "price", None) is None):
            raise ValueError(EXACTLY_ONE_PRICING)
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
                    "!has(self.prices) || self.prices.all(p, p.currency != 'USD' "
                    "|| has(p.usdPerEth) || has(self.usdPerEth))",
                    USD_NEEDS_RATE + " (set spec.usdPerEth or the entry's usdPerEth)",
                    ".prices",
                ),
                cel(
                    "(has(self.prices) && size(self.prices) > 0) "
                    "|| (has(self.apps) && size(self.apps) > 0)",
                    NEEDS_A_PRICE,
                ),
            ]
        }
    }

    prices: list[PriceEntry] = Field(
        default_factory=list,
        max_length=256,
        description=(
            "Prices of AI jobs by pipeline, model and gateway. The most specific entry wins: "
            "a model beats '*', a gateway's price beats the default."
        ),
    )
    apps: list[AppPriceEntry] = Field(
        default_factory=list,
        max_length=256,
        description="Prices of Live Runner apps by app name; an app's own entry beats '*'.",
    )
    usd_per_eth: DecimalString | None = Field(
        default=None, description="USD per ETH for every USD entry that does not set its own."
    )
    surge: Surge | None = Field(default=None, description="Surge pricing. Omitted: none.")

    @model_validator(mode="after")
    def _usd_entries_have_a_rate(self) -> Self:
        if not self.prices and not self.apps:
            raise ValueError(NEEDS_A_PRICE)
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
