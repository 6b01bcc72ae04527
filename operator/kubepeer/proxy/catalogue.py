"""What the proxy serves and charges: the operator's `models.json` (DESIGN.md, "The proxy's
inputs"), read into typed values. The one module that knows that file's shape. Pure.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from kubepeer.controller.prices import price_info
from kubepeer.livepeer.capabilities import Pipeline

SUPPORTED_VERSION = 1
log = logging.getLogger("kubepeer.proxy.catalogue")


class CatalogueError(ValueError):
    """models.json does not say what the proxy needs; the message names the entry and field."""


@dataclass(frozen=True)
class Surge:
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
    wei_per_unit: Fraction
    gateways: dict[bytes, Fraction] = field(default_factory=dict)
    surge: Surge | None = None

    def for_gateway(self, gateway: bytes, utilization: float = 0.0) -> Fraction:
        base = self.gateways.get(gateway, self.wei_per_unit)
        return base * (self.surge.multiplier(utilization) if self.surge else 1)


@dataclass(frozen=True)
class ServedModel:
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


@dataclass(frozen=True)
class Catalogue:
    namespace: str
    models: tuple[ServedModel, ...] = ()

    def serving(self, pipeline: Pipeline | str, model_id: str) -> tuple[ServedModel, ...]:
        """Every offered AIModel serving (pipeline, model_id): a job may go to any of them."""
        return self._by_job.get((pipeline, model_id), ())

    @functools.cached_property
    def _by_job(self) -> dict[tuple[str, str], tuple[ServedModel, ...]]:
        """`serving`'s answers, made once per catalogue: a job looks its models up, it does
        not scan every AIModel. (Pipeline is a StrEnum: it and its value are one key.)"""
        index: dict[tuple[str, str], tuple[ServedModel, ...]] = {}
        for m in self.models:
            if m.price is not None:
                key = (m.pipeline, m.model_id)
                index[key] = (*index.get(key, ()), m)
        return index

    @property
    def offered(self) -> list[ServedModel]:
        return [m for m in self.models if m.price is not None]


def _fraction(text: str, where: str) -> Fraction:
    try:
        value = Fraction(text)
    except (ValueError, ZeroDivisionError, TypeError):
        raise CatalogueError(
            f"{where}: {text!r} is not an exact number like '3' or '1/4'"
        ) from None
    if value < 0:
        raise CatalogueError(f"{where}: {text!r} is negative")
    return value


def _price(raw: dict[str, Any] | None, where: str) -> ModelPrice | None:
    if raw is None:
        return None
    wei = _fraction(raw["weiPerUnit"], f"{where}.weiPerUnit")
    price_info(wei)  # refuses what the wire cannot carry
    gateways = {}
    for address, text in (raw.get("gateways") or {}).items():
        gateways[bytes.fromhex(address.removeprefix("0x"))] = _fraction(
            text, f"{where}.gateways[{address}]"
        )
    surge = raw.get("surge")
    return ModelPrice(
        wei_per_unit=wei,
        gateways=gateways,
        surge=Surge(surge["utilization_threshold"], surge["max_multiplier"]) if surge else None,
    )


def parse_model(entry: dict[str, Any], where: str) -> ServedModel:
    """One model's row (a `model.json` of the operator's table ConfigMaps)."""
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
            price=_price(entry.get("price"), f"{where}.price"),
        )
    except KeyError as exc:
        raise CatalogueError(f"{where}: missing field {exc.args[0]}") from None
    except CatalogueError:
        raise
    except ValueError as exc:
        raise CatalogueError(f"{where}: {exc}") from None


def parse_catalogue(document: dict[str, Any], namespace: str) -> Catalogue:
    """A whole table in one document (`--models-file`): {"version": 1, "models": [...]}."""
    if document.get("version") != SUPPORTED_VERSION:
        raise CatalogueError(
            f"models.json version {document.get('version')!r} is not {SUPPORTED_VERSION}"
        )
    models = [parse_model(e, f"models[{i}]") for i, e in enumerate(document.get("models", []))]
    return Catalogue(namespace=namespace, models=tuple(models))


class TableRows:
    """The operator's per-AIModel table ConfigMaps (label kubepeer.io/table=model), kept
    from their watch: a row that does not parse is left out, and logged."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.rows: dict[str, ServedModel] = {}  # ConfigMap name -> model

    def apply(self, event: str, config_map: Any) -> bool:
        meta = config_map.metadata if hasattr(config_map, "metadata") else None
        name = meta.name if meta else config_map["metadata"]["name"]
        data = (config_map.data if meta else config_map.get("data")) or {}
        before = self.rows.get(name)
        if event == "DELETED":
            self.rows.pop(name, None)
        else:
            try:
                self.rows[name] = parse_model(json.loads(data.get("model.json", "{}")), name)
            except (CatalogueError, json.JSONDecodeError) as exc:
                log.error("ignoring ConfigMap %s: %s", name, exc)
                self.rows.pop(name, None)
        return self.rows.get(name) != before

    def replace(self, config_maps: list[Any]) -> bool:
        before = dict(self.rows)
        self.rows.clear()
        for config_map in config_maps:
            self.apply("ADDED", config_map)
        return self.rows != before

    def catalogue(self) -> Catalogue:
        models = sorted(self.rows.values(), key=lambda m: m.aimodel)
        return Catalogue(namespace=self.namespace, models=tuple(models))


def load_catalogue(path: Path, namespace: str) -> Catalogue:
    return parse_catalogue(json.loads(path.read_text()), namespace)
