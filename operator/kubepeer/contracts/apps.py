"""One row of the app table: a LiveRunner as the proxy offers it (live-runner-wire.md 3).

The operator writes each row (an `app.json` in the LiveRunner's table ConfigMap, or every
row in one `apps.json`, `{"version": 1, "apps": [...]}`), and the proxy reads it;
`row_json` and `parse_row` are the one writer and the one reader of that shape (DESIGN.md,
"The proxy's inputs"). The price is already in wei, in the unit discovery advertises:
the operator converts USD at the ETH/USD reading it records in the LiveRunner's status.
Pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubepeer.contracts.price_table import CatalogueError

APP_ROW_KEY = "app.json"  # the data key of a LiveRunner's table ConfigMap
PRICE_UNITS = frozenset({"seconds", "720p-pixel-seconds", "fixed"})
MODES = frozenset({"persistent", "single-shot"})


@dataclass(frozen=True)
class AppPrice:
    """Wei per unit, as discovery advertises it: per second, per pixel of nominal 720p30, or
    per session (`fixed`)."""

    wei: int
    unit: str

    @property
    def fixed(self) -> bool:
        return self.unit == "fixed"


@dataclass(frozen=True)
class ServedApp:
    """One LiveRunner as the proxy serves it. Its `route` (the LiveRunner's name) is the
    path segment of its URLs: `/apps/<route>/session`, `/apps/<route>/app`."""

    route: str  # the LiveRunner's name
    app: str  # discovery's `app`, e.g. streamdiffusion/sdxl-turbo
    mode: str  # persistent | single-shot
    runner: str  # the app's headless Service, whose EndpointSlices list its ready pods
    port: int
    capacity: int  # sessions (or calls) one replica takes at once
    on_demand: bool
    max_replicas: int
    proxy: bool  # the app asks for proxy URLs
    metadata: str | None
    version: str | None
    price: AppPrice | None  # None: free (a private proxy), or not priced yet

    @property
    def persistent(self) -> bool:
        return self.mode == "persistent"


def row_json(app: ServedApp) -> dict[str, Any]:
    """The row as the table holds it (the writer: the operator)."""
    return {
        "route": app.route,
        "app": app.app,
        "mode": app.mode,
        "runner": app.runner,
        "port": app.port,
        "capacity": app.capacity,
        "warm": "OnDemand" if app.on_demand else "Always",
        "maxReplicas": app.max_replicas,
        "proxy": app.proxy,
        "metadata": app.metadata,
        "version": app.version,
        # wei as a decimal string: JSON readers that hold numbers as doubles lose digits
        "price": None if app.price is None else {"wei": str(app.price.wei), "unit": app.price.unit},
    }


def parse_row(entry: dict[str, Any], where: str) -> ServedApp:
    """The row from the table (the reader: the proxy); a CatalogueError names what is wrong."""
    where = f"{where} ({entry.get('route', '?')})"
    try:
        app = ServedApp(
            route=_text(entry["route"], "route"),
            app=_text(entry["app"], "app"),
            mode=_one_of(entry["mode"], MODES, "mode"),
            runner=_text(entry["runner"], "runner"),
            port=_int(entry["port"], "port", 1),
            capacity=_int(entry["capacity"], "capacity", 1),
            on_demand=_one_of(entry["warm"], {"Always", "OnDemand"}, "warm") == "OnDemand",
            max_replicas=_int(entry["maxReplicas"], "maxReplicas", 0),
            proxy=bool(entry.get("proxy", False)),
            metadata=entry.get("metadata"),
            version=entry.get("version"),
            price=_price(entry.get("price")),
        )
    except KeyError as exc:
        raise CatalogueError(f"{where}: missing field {exc.args[0]}") from None
    except (ValueError, TypeError) as exc:
        raise CatalogueError(f"{where}: {exc}") from None
    return app


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value or value != value.strip():
        raise ValueError(f"{field} must be a non-empty string without surrounding spaces, "
                         f"not {value!r}")  # fmt: skip
    return value


def _int(value: Any, field: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{field} must be an integer of at least {least}, not {value!r}")
    return value


def _one_of(value: Any, allowed: frozenset[str] | set[str], field: str) -> str:
    if value not in allowed:
        raise ValueError(f"{field} must be one of {sorted(allowed)}, not {value!r}")
    return str(value)


def _price(raw: dict[str, Any] | None) -> AppPrice | None:
    if raw is None:
        return None
    wei = raw["wei"]
    if not isinstance(wei, str) or not wei.isdigit() or int(wei) < 1:
        raise ValueError(f"price.wei must be a whole number of wei of at least 1, as a "
                         f"string, not {wei!r}")  # fmt: skip
    return AppPrice(wei=int(wei), unit=_one_of(raw["unit"], PRICE_UNITS, "price.unit"))
