"""The AIModel, LiveRunner and Pricing custom resources as pydantic models: the one source."""

from kubepeer.api.aimodel import AIModel, AIModelSpec, AIModelStatus, Phase, PricingChoice
from kubepeer.api.common import API_VERSION, GROUP, VERSION, Condition, ConditionStatus
from kubepeer.api.live_runner import AppMode, AppPricingChoice, LiveRunner, LiveRunnerSpec
from kubepeer.api.pricing import (
    AppCurrency,
    AppPrice,
    AppPriceEntry,
    AppUnit,
    Currency,
    Price,
    PriceEntry,
    Pricing,
    PricingSpec,
    Surge,
)
from kubepeer.api.workload import Gpu, Warm, WarmPolicy
from kubepeer.livepeer.capabilities import OptimizationFlag, Pipeline, Unit

__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "AIModel",
    "AIModelSpec",
    "AIModelStatus",
    "AppCurrency",
    "AppMode",
    "AppPrice",
    "AppPriceEntry",
    "AppPricingChoice",
    "AppUnit",
    "Condition",
    "ConditionStatus",
    "Currency",
    "Gpu",
    "LiveRunner",
    "LiveRunnerSpec",
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
