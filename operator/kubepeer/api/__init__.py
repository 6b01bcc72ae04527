"""The AIModel and Pricing custom resources, as pydantic models: the single source of truth."""

from kubepeer.api.aimodel import (
    AIModel,
    AIModelSpec,
    AIModelStatus,
    Gpu,
    Phase,
    PricingChoice,
    Warm,
    WarmPolicy,
)
from kubepeer.api.common import API_VERSION, GROUP, VERSION, Condition, ConditionStatus
from kubepeer.api.pricing import Currency, Price, PriceEntry, Pricing, PricingSpec, Surge
from kubepeer.livepeer.capabilities import OptimizationFlag, Pipeline, Unit

__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "AIModel",
    "AIModelSpec",
    "AIModelStatus",
    "Condition",
    "ConditionStatus",
    "Currency",
    "Gpu",
    "OptimizationFlag",
    "Phase",
    "Pipeline",
    "Price",
    "PriceEntry",
    "Pricing",
    "PricingChoice",
    "PricingSpec",
    "Surge",
    "Unit",
    "Warm",
    "WarmPolicy",
]
