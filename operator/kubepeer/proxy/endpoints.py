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

from kubepeer.contracts.labels import RUNNER

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


class ListWatch:
    """list + watch one kind in one namespace on a thread; `apply(event, obj) -> changed`
    and `replace(objects) -> changed` keep a table, `on_change()` hears about changes."""

    def __init__(
        self,
        list_call: Callable[..., Any],
        namespace: str,
        label_selector: str,
        replace: Callable[[list[Any]], bool],
        apply: Callable[[str, Any], bool],
        on_change: Callable[[], None],
        name: str,
    ) -> None:
        self.list_call = list_call
        self.namespace = namespace
        self.label_selector = label_selector
        self.replace, self.apply, self.on_change = replace, apply, on_change
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._watch: Any = None
        self.synced = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()

    def _run(self) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        while not self._stop.is_set():
            try:
                listed = self.list_call(self.namespace, label_selector=self.label_selector)
                if self.replace(listed.items) or not self.synced.is_set():
                    self.on_change()
                self.synced.set()
                self._watch = watch.Watch()
                for event in self._watch.stream(
                    self.list_call,
                    self.namespace,
                    label_selector=self.label_selector,
                    resource_version=listed.metadata.resource_version,
                    timeout_seconds=300,
                ):
                    if self._stop.is_set():
                        return
                    if self.apply(event["type"], event["object"]):
                        self.on_change()
            except ApiException as exc:
                if exc.status != 410:  # 410 Gone: our resourceVersion expired; list again
                    log.warning("%s failed: %s; listing again", self._thread.name, exc.reason)
                    self._stop.wait(1)
            except Exception:
                log.exception("%s failed; listing again", self._thread.name)
                self._stop.wait(1)


def endpoint_slice_watch(
    api_client: Any, namespace: str, on_change: Changed, selector: str = RUNNER
) -> ListWatch:
    """Workload EndpointSlices: they carry their Service's labels, `kubepeer.io/runner` for
    runners (the default) or `kubepeer.io/live-runner` for Live Runner apps."""
    from kubernetes import client

    table = EndpointTable()
    return ListWatch(
        client.DiscoveryV1Api(api_client).list_namespaced_endpoint_slice,
        namespace,
        selector,
        replace=lambda items: bool(table.replace(items)),
        apply=lambda event, obj: bool(table.apply(event, obj)),
        on_change=lambda: on_change(table.snapshot()),
        name=f"endpointslice-watch-{selector.rpartition('/')[2]}",
    )
