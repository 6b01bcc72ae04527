"""GetOrchestrator: what a gateway learns about us (gateway-wire 1.2 to 1.4, 3.2). Pure.

The caller supplies the live facts (which models have a ready replica, their free slots,
utilisation for surge) and the ticket params; this module decides what the reply says.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction

from kubepeer.contracts.price_table import ServedModel, price_info
from kubepeer.livepeer import net_pb2
from kubepeer.livepeer.capabilities import Pipeline
from kubepeer.proxy.catalogue import Catalogue
from kubepeer.proxy.credentials import go_address

# go-livepeer's DefaultCapabilities(): H264, MPEGTS, MP4, FractionalFramerates, storage
# (direct, S3, GCS), four H264 profiles, GOP, AuthToken, MPEG7VideoSignature (0-12, 14),
# SegmentSlicing (26). An AI-only orchestrator sets them all: the AI gateway asks for them.
DEFAULT_CAPABILITIES = (*range(13), 14, 26)
LIVE_VIDEO_CAPABILITY = 35
ORCHESTRATOR_CAPPED = "Invalid orchestrator request: OrchestratorCapped"
RUNNER_VERSION = "0.14.1"  # the ai-runner API our runner implements


@dataclass(frozen=True)
class ModelState:
    ready: bool
    free_slots: int  # live video: free stream slots
    utilization: float
    in_use: int = 0  # live video: streams running (capacityInUse)


def bitstring(capabilities: Iterable[int]) -> list[int]:
    words: list[int] = []
    for cap in capabilities:
        word, bit = divmod(cap, 64)
        words.extend([0] * (word + 1 - len(words)))
        words[word] |= 1 << bit
    return words


def offered_bits(models: Iterable[ServedModel]) -> list[int]:
    """The capability bitstring we advertise: DefaultCapabilities' bits and every model's."""
    return bitstring(sorted({*DEFAULT_CAPABILITIES, *(m.capability for m in models)}))


def served(catalogue: Catalogue) -> list[ServedModel]:
    return catalogue.offered


def capabilities(
    catalogue: Catalogue, state: Callable[[ServedModel], ModelState], version: str
) -> net_pb2.Capabilities:
    models = served(catalogue)
    caps = net_pb2.Capabilities(
        bitstring=offered_bits(models),
        version=version,
    )
    for cap in DEFAULT_CAPABILITIES:
        caps.capacities[cap] = 1
    for model in models:
        caps.capacities[model.capability] = 1
        now = state(model)
        constraint = caps.constraints.per_capability[model.capability].models[model.model_id]
        constraint.warm = now.ready
        constraint.capacity = now.free_slots
        constraint.runner_version = RUNNER_VERSION
        if model.capability == LIVE_VIDEO_CAPABILITY:
            constraint.capacity_in_use = now.in_use
    return caps


def live_capped(
    request: net_pb2.OrchestratorRequest,
    catalogue: Catalogue,
    state: Callable[[ServedModel], ModelState],
) -> bool:
    """checkLiveVideoToVideoCapacity: a request naming live models, without
    ignoreCapacityCheck, is refused unless one of them has a free stream slot on any of
    the AIModels serving it."""
    wanted = request.capabilities.constraints.per_capability
    if request.ignore_capacity_check or LIVE_VIDEO_CAPABILITY not in wanted:
        return False
    for model_id in wanted[LIVE_VIDEO_CAPABILITY].models:
        group = catalogue.serving(Pipeline.LIVE_VIDEO_TO_VIDEO, model_id)
        if any(state(model).free_slots > 0 for model in group):
            return False
    return True


def requested_models(request: net_pb2.OrchestratorRequest) -> list[tuple[int, str]]:
    wanted = request.capabilities.constraints.per_capability
    return [(cap, model) for cap, c in wanted.items() for model in c.models]


def price_for(
    catalogue: Catalogue,
    gateway: bytes,
    request: net_pb2.OrchestratorRequest,
    state: Callable[[ServedModel], ModelState],
) -> Fraction:
    """PriceInfoForCaps: the sum over requested (capability, model) pairs we serve."""
    prices = model_prices(catalogue, gateway, state)
    return sum((prices.get(key, Fraction(0)) for key in requested_models(request)), Fraction(0))


def model_prices(
    catalogue: Catalogue, gateway: bytes, state: Callable[[ServedModel], ModelState]
) -> dict[tuple[int, str], Fraction]:
    """Wei per unit for each (capability, model id) we serve. Where several AIModels serve
    one, a job may land on any of them: the highest of their prices, so none is undersold."""
    prices: dict[tuple[int, str], Fraction] = {}
    for model in served(catalogue):
        if model.price:
            key = (model.capability, model.model_id)
            wei = model.price.for_gateway(gateway, state(model).utilization)
            prices[key] = max(wei, prices.get(key, wei))
    return prices


def auto_adjusted(price: Fraction, tx_cost_share: Fraction) -> Fraction:
    """go-livepeer's AutoAdjustPrice (gateway-wire 3.2): price x (1 + 1/txCostMultiplier),
    where 1/txCostMultiplier = txCost / faceValue of the sender's tickets; then truncated to
    3 decimals (PriceToFixed). A free price stays free."""
    if price <= 0:
        return Fraction(0)
    return Fraction(math.floor(price * (1 + tx_cost_share) * 1000), 1000)


def price_message(wei: Fraction, capability: int = 0, constraint: str = "") -> net_pb2.PriceInfo:
    num, den = price_info(wei) if wei else (0, 1)
    return net_pb2.PriceInfo(
        price_per_unit=num, pixels_per_unit=den, capability=capability, constraint=constraint
    )


def capabilities_prices(
    catalogue: Catalogue, gateway: bytes, state: Callable[[ServedModel], ModelState]
) -> list[net_pb2.PriceInfo]:
    """GetCapabilitiesPrices: floor(wei per unit), pixelsPerUnit 1, per capability and model."""
    return [
        net_pb2.PriceInfo(
            price_per_unit=int(wei), pixels_per_unit=1, capability=cap, constraint=model_id
        )
        for (cap, model_id), wei in model_prices(catalogue, gateway, state).items()
    ]


@dataclass(frozen=True)
class Reply:
    """What goes into OrchestratorInfo besides the ticket params and the auth token."""

    info: net_pb2.OrchestratorInfo
    price: tuple[int, int]  # the price quoted, for the ticket params and the issued record
    # The served (capability, model id) pairs the price was quoted for: a payment at this
    # price pays for a job on one of them, and on nothing else.
    priced_for: tuple[tuple[int, str], ...] = ()


def orchestrator_info(
    request: net_pb2.OrchestratorRequest,
    catalogue: Catalogue,
    state: Callable[[ServedModel], ModelState],
    *,
    transcoder: str,
    address: bytes,
    version: str,
    tx_cost_share: Fraction | None = None,
) -> Reply:
    """`address`: ours, 20 bytes (the ticket recipient, or the zero address offchain).
    `tx_cost_share`: txCost / faceValue of this sender's tickets when AutoAdjustPrice is
    on (go-livepeer's default), None when it is off (prices quoted exactly)."""
    gateway = go_address(request.address)
    info = net_pb2.OrchestratorInfo(
        transcoder=transcoder,
        address=address,
        capabilities=capabilities(catalogue, state, version),
    )
    priced_for: tuple[tuple[int, str], ...] = ()
    if request.HasField("capabilities"):
        wei = price_for(catalogue, gateway, request, state)
        if tx_cost_share is not None:
            wei = auto_adjusted(wei, tx_cost_share)
        price = price_message(wei)
        offered = {(m.capability, m.model_id) for m in served(catalogue)}
        priced_for = tuple(key for key in requested_models(request) if key in offered)
    else:
        price = price_message(Fraction(0))  # the transcoding base price: we transcode nothing
        info.capabilities_prices.extend(capabilities_prices(catalogue, gateway, state))
        for pipeline, model_id in dict.fromkeys(
            (m.pipeline, m.model_id) for m in served(catalogue)
        ):
            info.hardware.append(
                net_pb2.HardwareInformation(pipeline=pipeline.value, model_id=model_id)
            )
    info.price_info.CopyFrom(price)
    return Reply(info=info, price=(price.price_per_unit, price.pixels_per_unit),
                 priced_for=priced_for)  # fmt: skip


@dataclass(frozen=True)
class Offered:
    """What a job's SegData capabilities are checked against: the capability bits we set
    and, per capability, each model we offer and whether it is warm. It changes only with
    the catalogue or the runner endpoints, so the proxy builds it once per change, not per
    job (`capabilities` walks every served model, and asks Redis of each live one)."""

    bitstring: tuple[int, ...]
    warm: Mapping[int, Mapping[str, bool]]  # capability -> model id -> a replica is ready


def offered(catalogue: Catalogue, ready: Callable[[ServedModel], bool]) -> Offered:
    """Several AIModels serving one (pipeline, model id) are one offer, warm if any is."""
    models = served(catalogue)
    warm: dict[int, dict[str, bool]] = {}
    for model in models:
        by_model = warm.setdefault(model.capability, {})
        by_model[model.model_id] = by_model.get(model.model_id, False) or ready(model)
    return Offered(tuple(offered_bits(models)), warm)


def compatible(requested: net_pb2.Capabilities, ours: Offered) -> bool:
    """The gateway's CompatibleWith, applied to a job's SegData capabilities (gateway-wire
    1.4). We set no mandatory capabilities, so the mandatories' check always passes."""
    for i, word in enumerate(requested.bitstring):
        have = ours.bitstring[i] if i < len(ours.bitstring) else 0
        if word & ~have:
            return False
    for cap, wanted in requested.constraints.per_capability.items():
        offered_models = ours.warm.get(cap)
        for model, constraint in wanted.models.items():
            if offered_models is None or model not in offered_models:
                return False
            if constraint.warm and not offered_models[model]:
                return False
    return True
