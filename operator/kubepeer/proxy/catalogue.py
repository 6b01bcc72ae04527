"""What the proxy serves and charges: the operator's table (DESIGN.md, "The proxy's inputs"),
its rows read by the contract's reader (`contracts.price_table.parse_row`), gathered into
the catalogue jobs and discovery look models up in. Pure.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from kubepeer.contracts.price_table import CatalogueError, ServedModel, parse_row
from kubepeer.livepeer.capabilities import Pipeline

SUPPORTED_VERSION = 1
Row = TypeVar("Row")
log = logging.getLogger("kubepeer.proxy.catalogue")


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


def parse_catalogue(document: dict[str, Any], namespace: str) -> Catalogue:
    """A whole table in one document (`--models-file`): {"version": 1, "models": [...]}."""
    if document.get("version") != SUPPORTED_VERSION:
        raise CatalogueError(
            f"models.json version {document.get('version')!r} is not {SUPPORTED_VERSION}"
        )
    models = [parse_row(e, f"models[{i}]") for i, e in enumerate(document.get("models", []))]
    return Catalogue(namespace=namespace, models=tuple(models))


class ConfigMapRows(Generic[Row]):
    """One row per ConfigMap of a table the operator writes (its `key` in the data, read by
    `parse`), kept from their watch: a row that does not parse is left out, and logged.
    `apply` and `replace` are what `endpoints.ListWatch` calls: True when the rows changed."""

    def __init__(self, key: str, parse: Callable[[dict[str, Any], str], Row]) -> None:
        self.key, self.parse = key, parse
        self.rows: dict[str, Row] = {}  # ConfigMap name -> row

    def apply(self, event: str, config_map: Any) -> bool:
        meta = config_map.metadata if hasattr(config_map, "metadata") else None
        name = meta.name if meta else config_map["metadata"]["name"]
        data = (config_map.data if meta else config_map.get("data")) or {}
        before = self.rows.get(name)
        if event == "DELETED":
            self.rows.pop(name, None)
        else:
            try:
                self.rows[name] = self.parse(json.loads(data.get(self.key, "{}")), name)
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


class TableRows(ConfigMapRows[ServedModel]):
    """The operator's per-AIModel table ConfigMaps (label kubepeer.io/table=model)."""

    def __init__(self, namespace: str) -> None:
        super().__init__("model.json", parse_row)
        self.namespace = namespace

    def catalogue(self) -> Catalogue:
        models = sorted(self.rows.values(), key=lambda m: m.aimodel)
        return Catalogue(namespace=self.namespace, models=tuple(models))


def load_catalogue(path: Path, namespace: str) -> Catalogue:
    return parse_catalogue(json.loads(path.read_text()), namespace)
