"""Ready runner addresses, from a watch on the EndpointSlices of the operator's runner Services.

The table is pure: EndpointSlice events in, `{service: (url, ...)}` out. The watch is a
thin thread (the Kubernetes client is synchronous) that feeds it and calls back on every
change, so a pod turning ready or unready reaches the router as the API server says so,
without polling. Tests that send real traffic give the router a static source instead:
the API server refuses loopback addresses in EndpointSlices.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from kubepeer.controller.labels import RUNNER

log = logging.getLogger("kubepeer.proxy.endpoints")

SERVICE_NAME = "kubernetes.io/service-name"
Changed = Callable[[dict[str, tuple[str, ...]]], None]


def _get(obj: Any, *names: str) -> Any:
    """A field of a dict (raw JSON) or of a kubernetes client model, by its JSON name."""
    for name in names:
        if obj is None:
            return None
        if isinstance(obj, dict):
            obj = obj.get(name)
        else:
            snake = "".join(f"_{c.lower()}" if c.isupper() else c for c in name)
            obj = getattr(obj, snake, None)
    return obj


def ready_urls(endpoint_slice: Any) -> tuple[str, ...]:
    """http://address:port for each endpoint the slice calls ready (unset means ready)."""
    ports = _get(endpoint_slice, "ports") or []
    port = next((_get(p, "port") for p in ports if _get(p, "name") == "http"), None)
    if port is None and ports:
        port = _get(ports[0], "port")
    if port is None:
        return ()
    urls = []
    for endpoint in _get(endpoint_slice, "endpoints") or []:
        if _get(endpoint, "conditions", "ready") is False:
            continue
        for address in _get(endpoint, "addresses") or []:
            host = f"[{address}]" if ":" in address else address
            urls.append(f"http://{host}:{port}")
    return tuple(sorted(set(urls)))


class EndpointTable:
    """Ready URLs per Service, merged over that Service's slices."""

    def __init__(self) -> None:
        self._slices: dict[str, tuple[str, tuple[str, ...]]] = {}  # slice -> (service, urls)

    def apply(self, event: str, endpoint_slice: Any) -> set[str]:
        """Apply one watch event (ADDED, MODIFIED, DELETED); return the Services it changed."""
        name = _get(endpoint_slice, "metadata", "name")
        service = (_get(endpoint_slice, "metadata", "labels") or {}).get(SERVICE_NAME)
        if not name or not service:
            return set()
        before = self.urls(service)
        if event == "DELETED":
            self._slices.pop(name, None)
        else:
            self._slices[name] = (service, ready_urls(endpoint_slice))
        return {service} if self.urls(service) != before else set()

    def replace(self, slices: list[Any]) -> set[str]:
        """A fresh list (start, or after the watch expired): the Services whose URLs changed."""
        before = self.snapshot()
        self._slices.clear()
        for endpoint_slice in slices:
            self.apply("ADDED", endpoint_slice)
        after = self.snapshot()
        return {s for s in before.keys() | after.keys() if before.get(s) != after.get(s)}

    def urls(self, service: str) -> tuple[str, ...]:
        found = {u for s, urls in self._slices.values() if s == service for u in urls}
        return tuple(sorted(found))

    def snapshot(self) -> dict[str, tuple[str, ...]]:
        services = {s for s, _ in self._slices.values()}
        return {s: self.urls(s) for s in services}


class EndpointSliceWatch:
    """list + watch runner EndpointSlices in one namespace; `on_change` gets the full table."""

    def __init__(self, api_client: Any, namespace: str, on_change: Changed) -> None:
        self.api_client = api_client
        self.namespace = namespace
        self.on_change = on_change
        self.table = EndpointTable()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="endpointslice-watch", daemon=True)
        self._watch: Any = None
        self.synced = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()

    def _run(self) -> None:
        from kubernetes import client, watch
        from kubernetes.client.exceptions import ApiException

        discovery = client.DiscoveryV1Api(self.api_client)
        while not self._stop.is_set():
            try:
                listed = discovery.list_namespaced_endpoint_slice(
                    self.namespace, label_selector=RUNNER
                )
                if self.table.replace(listed.items) or not self.synced.is_set():
                    self.on_change(self.table.snapshot())
                self.synced.set()
                self._watch = watch.Watch()
                for event in self._watch.stream(
                    discovery.list_namespaced_endpoint_slice,
                    self.namespace,
                    label_selector=RUNNER,
                    resource_version=listed.metadata.resource_version,
                    timeout_seconds=300,
                ):
                    if self._stop.is_set():
                        return
                    if self.table.apply(event["type"], event["object"]):
                        self.on_change(self.table.snapshot())
            except ApiException as exc:
                if exc.status != 410:  # 410 Gone: our resourceVersion expired; list again
                    log.warning("EndpointSlice watch failed: %s; listing again", exc.reason)
                    self._stop.wait(1)
            except Exception:
                log.exception("EndpointSlice watch failed; listing again")
                self._stop.wait(1)
