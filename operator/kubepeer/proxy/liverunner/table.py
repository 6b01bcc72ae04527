"""The apps the proxy serves: the operator's app table (one ConfigMap per LiveRunner, label
kubepeer.io/table=app, DESIGN.md "The proxy's inputs"), or one `apps.json` file. Rows are
read by the contract's reader (`contracts.apps.parse_row`); a row that does not parse is
left out, and logged. Pure.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from kubepeer.contracts.apps import APP_ROW_KEY, ServedApp, parse_row
from kubepeer.contracts.price_table import CatalogueError
from kubepeer.proxy.catalogue import ConfigMapRows

SUPPORTED_VERSION = 1
log = logging.getLogger("kubepeer.proxy.liverunner")

Apps = dict[str, ServedApp]  # route -> app


def parse_apps(document: dict[str, Any]) -> Apps:
    """A whole table in one document (`--apps-file`): {"version": 1, "apps": [...]}."""
    if document.get("version") != SUPPORTED_VERSION:
        raise CatalogueError(
            f"apps.json version {document.get('version')!r} is not {SUPPORTED_VERSION}"
        )
    apps = [parse_row(e, f"apps[{i}]") for i, e in enumerate(document.get("apps", []))]
    routes = [a.route for a in apps]
    if len(set(routes)) != len(routes):
        raise CatalogueError(f"apps.json names a route twice: {sorted(routes)}")
    return {a.route: a for a in apps}


def load_apps(path: Path) -> Apps:
    return parse_apps(json.loads(path.read_text()))


class AppRows(ConfigMapRows[ServedApp]):
    """The app table's ConfigMaps (label kubepeer.io/table=app), kept from their watch."""

    def __init__(self) -> None:
        super().__init__(APP_ROW_KEY, parse_row)

    def apps(self) -> Apps:
        return {app.route: app for app in self.rows.values()}
