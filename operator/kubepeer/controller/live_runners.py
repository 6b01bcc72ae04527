"""LiveRunners: each app one Deployment and one headless Service, kept as AIModel runners are.

The builders here are pure (a LiveRunner in, manifests out: its app, and its row of the
app table the proxy serves from); `LiveRunners` is the small stateful part between kopf's
events and the API server, reading only kopf indices (the `View`), writing only when what
it would write differs from what is there. The status is `status.compute_status`, the same
truth an AIModel's status tells.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from kubepeer.api import API_VERSION, LiveRunner, LiveRunnerSpec, WarmPolicy
from kubepeer.api.live_runner import AdvertisedPrice, LiveRunnerStatus, Registration
from kubepeer.api.pricing import AppCurrency, AppPrice, PricingSpec, match_app_price
from kubepeer.contracts import labels as L
from kubepeer.contracts.apps import APP_ROW_KEY, ServedApp, row_json
from kubepeer.contracts.apps import AppPrice as WeiPrice
from kubepeer.controller.builders import (
    GPU_RESOURCE,
    content_hash,
    gpu_node_affinity,
    gpu_tolerations,
    restricted_container,
)
from kubepeer.controller.fleet import validation_message
from kubepeer.controller.settings import OperatorSettings
from kubepeer.controller.status import Observed, compute_status
from kubepeer.livepeer.price_feed import EthUsd, published, to_wei

log = logging.getLogger(__name__)
Key = tuple[str, str]  # (namespace, Deployment name)
WEI_DIGITS = 40  # the most an advertised price has (AdvertisedPrice.wei): 1e40 wei is 1e22 ETH


class NoAppPrice(ValueError):
    """Why no price applies to an app."""


def resolve_app_price(spec: LiveRunnerSpec, pricings: Mapping[str, PricingSpec]) -> AppPrice:
    """The app's price: inline, from the Pricing it names, or from the Pricings in the
    namespace (an entry for the app, else one for '*'). Raises NoAppPrice, saying why."""
    choice = spec.pricing
    if choice is not None and choice.price is not None:
        return choice.price
    if choice is not None and choice.ref is not None:
        pricing = pricings.get(choice.ref)
        if pricing is None:
            raise NoAppPrice(
                f"pricing.ref names Pricing '{choice.ref}', which is not in this namespace"
            )
        found = match_app_price(pricing.apps, spec.app)
        if found is None:
            raise NoAppPrice(
                f"Pricing '{choice.ref}' has no spec.apps entry for app '{spec.app}' or '*'"
            )
        return found
    # An app's own entry in any Pricing beats a '*' in any (Pricings in name order).
    found = match_app_price([e for n in sorted(pricings) for e in pricings[n].apps], spec.app)
    if found is not None:
        return found
    raise NoAppPrice(
        f"no Pricing in this namespace has a spec.apps entry for app '{spec.app}' or '*'"
    )


def advertised_price(price: AppPrice, eth_usd: EthUsd | None) -> AdvertisedPrice:
    """The app's price in wei as discovery advertises it. Raises NoAppPrice when there is
    none (a USD price with no ETH/USD reading yet, or one under 1 wei)."""
    usd = price.currency is AppCurrency.USD
    wei = to_wei(price.amount, price.currency.value, price.unit.value, eth_usd)
    if wei is not None and wei.price >= 10**WEI_DIGITS:
        raise NoAppPrice(f"{price.amount} {price.currency.value} per {price.unit.value} is "
                         f"{len(str(wei.price))} digits of wei: no price has more than "
                         f"{WEI_DIGITS}")  # fmt: skip
    if wei is None and usd and eth_usd is None:
        raise NoAppPrice(
            "the price is in USD and no ETH/USD rate has been read yet (the payments "
            "controller reads the Chainlink feed and publishes it)"
        )
    if wei is None:
        raise NoAppPrice(f"{price.amount} {price.currency.value} per {price.unit.value} is "
                         "under 1 wei: no price, as go-livepeer advertises none")  # fmt: skip
    if not usd or eth_usd is None:
        return AdvertisedPrice(wei=str(wei.price), unit=wei.unit)
    return AdvertisedPrice(
        wei=str(wei.price),
        unit=wei.unit,
        usd_per_eth=Decimal(eth_usd.answer) / 10**eth_usd.decimals,
        feed=eth_usd.feed,
        round_id=str(eth_usd.round_id),
        read_at=datetime.fromtimestamp(eth_usd.read_at, UTC),
    )


def build_live_runner(
    namespace: str, name: str, uid: str, spec: LiveRunnerSpec, settings: OperatorSettings
) -> list[dict[str, Any]]:
    """The app's Service and Deployment, the Deployment stamped with the hash of both."""
    deployment_name = L.live_runner_name(name)
    labels = L.live_runner_labels(deployment_name)
    owner = [{"apiVersion": API_VERSION, "kind": "LiveRunner", "name": name, "uid": uid,
              "controller": True, "blockOwnerDeletion": True}]  # fmt: skip
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": deployment_name,
            "namespace": namespace,
            "labels": labels,
            "ownerReferences": owner,
        },
        "spec": {
            "clusterIP": "None",  # headless: the proxy picks the app's endpoints itself
            "selector": {L.LIVE_RUNNER: deployment_name},
            "ports": [{"name": "http", "port": spec.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": deployment_name,
            "namespace": namespace,
            "labels": labels,
            "annotations": {L.LIVE_RUNNER_ANNOTATION: name},
            "ownerReferences": owner,
        },
        "spec": {
            "replicas": spec.desired_replicas,
            "progressDeadlineSeconds": settings.startup_timeout_seconds + 60,
            "selector": {"matchLabels": {L.LIVE_RUNNER: deployment_name}},
            # Sessions keep being served while rolling: the new replica comes up first.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": {"metadata": {"labels": labels}, "spec": _pod_spec(spec, settings)},
        },
    }
    deployment["metadata"]["annotations"][L.CONTENT_HASH] = content_hash(service, deployment)
    return [service, deployment]


def app_row(name: str, spec: LiveRunnerSpec, price: AdvertisedPrice | None) -> ServedApp:
    """The LiveRunner's row of the app table: its app as the proxy offers it, at the price
    in wei its status advertises (None while there is none: the proxy decides)."""
    return ServedApp(
        route=name,
        app=spec.app,
        mode=spec.mode.value,
        runner=L.live_runner_name(name),  # the headless Service
        port=spec.port,
        capacity=spec.capacity,
        on_demand=spec.warm.on_demand,
        max_replicas=spec.warm.max_replicas,
        proxy=spec.proxy,
        metadata=spec.metadata,
        version=spec.version,
        price=None if price is None else WeiPrice(wei=int(price.wei), unit=price.unit),
    )


def build_app_table(namespace: str, name: str, uid: str, row: ServedApp) -> dict[str, Any]:
    """The ConfigMap holding one LiveRunner's row: owned by it, so it goes when the app goes."""
    data = {APP_ROW_KEY: json.dumps(row_json(row), sort_keys=True)}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": L.app_table_name(name),
            "namespace": namespace,
            "labels": {L.PART_OF: "kubepeer", L.MANAGED_BY: L.MANAGER, L.TABLE: "app"},
            "annotations": {L.LIVE_RUNNER_ANNOTATION: name, L.CONTENT_HASH: content_hash(data)},
            "ownerReferences": [
                {
                    "apiVersion": API_VERSION,
                    "kind": "LiveRunner",
                    "name": name,
                    "uid": uid,
                    "controller": True,
                    "blockOwnerDeletion": False,
                }
            ],
        },
        "data": data,
    }


def _pod_spec(spec: LiveRunnerSpec, settings: OperatorSettings) -> dict[str, Any]:
    limits, requests = dict(spec.resources.limits), dict(spec.resources.requests)
    if spec.gpu.count:
        limits[GPU_RESOURCE] = str(spec.gpu.count)
    container: dict[str, Any] = {
        "name": "app",
        "image": spec.image,
        "ports": [{"name": "http", "containerPort": spec.port, "protocol": "TCP"}],
        "env": [var.to_wire() for var in spec.env],
        "resources": {k: v for k, v in (("limits", limits), ("requests", requests)) if v},
        # Ready while the health path answers: go-livepeer hides an unhealthy runner and
        # restarts nothing, so there is no liveness probe either (a crash still restarts).
        "readinessProbe": {
            "httpGet": {"path": spec.health_path, "port": "http"},
            "periodSeconds": settings.probe_period_seconds,
            "timeoutSeconds": min(settings.probe_period_seconds, 3),  # go-livepeer's 3 s
            "failureThreshold": 1,
        },
        # The image's own non-root user: an app image is anyone's, so no UID is imposed.
        "securityContext": restricted_container(),
    }
    if spec.command:
        container["command"] = list(spec.command)
    if spec.args:
        container["args"] = list(spec.args)
    pod: dict[str, Any] = {
        "priorityClassName": (
            settings.warm_priority_class
            if spec.warm.policy is WarmPolicy.ALWAYS
            else settings.cold_priority_class
        ),
        "containers": [container],
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,  # apps never call the API server
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "terminationGracePeriodSeconds": 30,
    }
    affinity = gpu_node_affinity(sorted(spec.gpu.products), spec.gpu.min_memory_mib)
    if affinity:
        pod["affinity"] = affinity
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    tolerations = gpu_tolerations([t.to_wire() for t in spec.tolerations], spec.gpu.count)
    if tolerations:
        pod["tolerations"] = tolerations
    return pod


def live_runner_status(
    settings: OperatorSettings,
    body: Mapping[str, Any],
    deployment: Mapping[str, Any] | None,
    pods: list[dict[str, Any]],
    pricings: Mapping[str, PricingSpec],
    now: datetime | None = None,
    eth_usd: EthUsd | None = None,
    registrations: Callable[[LiveRunnerSpec], list[Registration]] | None = None,
) -> LiveRunnerStatus:
    """A LiveRunner's status from its Deployment's summary and pods, as the index keeps
    them (`deployment["hash"]` is the content hash the operator stamped on it), and its
    price in wei at the ETH/USD reading given."""
    meta = body["metadata"]
    try:
        previous = LiveRunnerStatus.model_validate(body.get("status") or {})
    except ValidationError:  # written by another version, or by hand: start afresh
        previous = LiveRunnerStatus()
    invalid = pricing_problem = price = None
    desired, current = 0, False
    try:
        spec = LiveRunnerSpec.model_validate(body.get("spec") or {})
    except ValidationError as exc:
        invalid = validation_message(exc)
    else:
        desired = spec.desired_replicas
        try:
            price = advertised_price(resolve_app_price(spec, pricings), eth_usd)
        except NoAppPrice as exc:
            pricing_problem = str(exc)
        wanted = build_live_runner(meta["namespace"], meta["name"], meta.get("uid", ""),
                                   spec, settings)[1]  # fmt: skip
        current = bool(deployment) and deployment["hash"] == _hash_of(wanted)
    deployment_name = L.live_runner_name(meta["name"])
    observed = Observed(
        desired=desired,
        generation=meta.get("generation", 0),
        deployment=dict(deployment) if deployment and not invalid else None,
        pods=pods if not invalid else [],
        selector=f"{L.LIVE_RUNNER}={deployment_name}" if not invalid else "",
        invalid=invalid,
        pricing_problem=pricing_problem,
        current=current,
        nodes_fixed=settings.nodes_fixed,
    )
    status = compute_status(observed, previous, now or datetime.now(UTC))
    registered = registrations(spec) if registrations and not invalid else []
    return LiveRunnerStatus(**dict(status), price=price, registrations=registered)


def _without_nulls(value: Any) -> Any:
    """A status value as the API server keeps it after a merge patch: no null fields."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return value


def _hash_of(deployment: Mapping[str, Any]) -> str:
    return str(deployment["metadata"]["annotations"][L.CONTENT_HASH])


class LiveRunners:
    """Makes each LiveRunner's app match its spec and writes its status.

    `view` holds kopf's indices: `live_runners` ((ns, Deployment name) -> LiveRunner body),
    `live_deployments` ((ns, name) -> Deployment summary with its `hash`), `live_pods`
    ((ns, Deployment name) -> pod summaries), `app_tables` ((ns, LiveRunner name) -> the
    content hash of its app table ConfigMap) and `pricings` (ns -> (name, spec))."""

    def __init__(self, settings: OperatorSettings, kube: Any, view: Any, redis: Any = None) -> None:
        self.settings, self.kube, self.view, self.redis = settings, kube, view, redis
        self.retry: set[Key] = set()  # apps whose last reconcile failed: the sweep retries
        self.written: dict[Key, dict[str, Any]] = {}  # status last written, until seen
        self.eth_usd: EthUsd | None = None  # the payments controller's last feed reading
        self.registrar: Any = None  # registration.Registrar, when the operator runs one
        self._rate_read = False
        self._lock = threading.Lock()

    def read_rate(self) -> bool:
        """Read the ETH/USD reading the payments controller published; True when it changed
        (then every app's price in wei is computed again)."""
        self._rate_read = True
        if self.redis is None:
            return False
        try:
            reading = published(self.redis)
        except Exception as exc:  # Redis away: the prices stay at the last reading
            log.warning("ETH/USD reading not read from Redis: %s", exc)
            return False
        changed, self.eth_usd = reading != self.eth_usd, reading
        return changed

    def changed(self, namespace: str, deployment: str) -> None:
        """Apply the app's manifests when they differ from what is there; then its status."""
        key = (namespace, deployment)
        body = self.view.one(self.view.live_runners, key)
        if body is None or body["metadata"].get("deletionTimestamp"):
            self.retry.discard(key)
            self.written.pop(key, None)
            return  # its Deployment and Service are owned by it: garbage-collected with it
        try:
            spec = LiveRunnerSpec.model_validate(body.get("spec") or {})
        except ValidationError:
            self.refresh_status(namespace, deployment)  # says why, in its conditions
            return
        meta = body["metadata"]
        manifests = build_live_runner(namespace, meta["name"], meta["uid"], spec, self.settings)
        wanted = _hash_of(manifests[1])
        existing = self.view.one(self.view.live_deployments, key)
        try:
            if not self.view.shows(key, existing["hash"] if existing else None, wanted):
                for manifest in manifests:
                    self.kube.apply(manifest)
                self.view.wrote(key, wanted)
                log.info("%s app %s/%s for LiveRunner %s", "updated" if existing else "created",
                         namespace, deployment, meta["name"])  # fmt: skip
        except Exception as exc:  # an API error, or the network: retried by the sweep
            self.retry.add(key)
            log.warning("LiveRunner %s/%s: reconcile failed, will retry: %s",
                        namespace, meta["name"], exc)  # fmt: skip
            return
        self.retry.discard(key)
        self.refresh_status(namespace, deployment)

    def refresh_status(self, namespace: str, deployment: str) -> None:
        key = (namespace, deployment)
        with self._lock:
            body = self.view.one(self.view.live_runners, key)
            if body is None or body["metadata"].get("deletionTimestamp"):
                return
            known = {**body, "status": self.written.get(key) or body.get("status")}
            if not self._rate_read:
                self.read_rate()
            status = live_runner_status(
                self.settings, known, self.view.one(self.view.live_deployments, key),
                self.view.many(self.view.live_pods, key), self.view.pricings_in(namespace),
                eth_usd=self.eth_usd,
                registrations=(functools.partial(self.registrar.registrations, key)
                               if self.registrar else None),
            )  # fmt: skip
            self.publish_row(body, status.price)
            wire = status.to_wire()
            # A merge patch keeps what it does not name: the price is always named, whole
            # (its null fields remove what an earlier price had), or null when there is none.
            wire["price"] = (
                status.price.model_dump(by_alias=True, mode="json") if status.price else None
            )
            have = known.get("status") or {}
            if all(_without_nulls(have.get(k)) == _without_nulls(v) for k, v in wire.items()):
                return
            name = body["metadata"]["name"]
            try:
                self.kube.patch_status(namespace, name, wire, LiveRunner.PLURAL)
            except ApiException as exc:
                if exc.status != 404:
                    log.warning("LiveRunner %s/%s: status not written: %s", namespace, name, exc)
                    self.retry.add(key)
                return
            except Exception as exc:  # the network: the sweep tries again
                log.warning("LiveRunner %s/%s: status not written: %s", namespace, name, exc)
                self.retry.add(key)
                return
            self.written[key] = wire

    def publish_row(self, body: Mapping[str, Any], price: AdvertisedPrice | None) -> None:
        """Write the LiveRunner's row of the app table when it differs from what is there,
        priced or not (with no price the proxy decides). An invalid spec gets no row (its
        status says why); a failed write is retried by the sweep."""
        try:
            spec = LiveRunnerSpec.model_validate(body.get("spec") or {})
        except ValidationError:
            return
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        table = build_app_table(namespace, name, meta["uid"], app_row(name, spec, price))
        wanted = table["metadata"]["annotations"][L.CONTENT_HASH]
        written = (namespace, table["metadata"]["name"])  # the view's memory: by object name
        if self.view.shows(written, self.view.one(self.view.app_tables, (namespace, name)),
                           wanted):  # fmt: skip
            return
        try:
            self.kube.apply(table)
        except Exception as exc:  # an API error, or the network: retried by the sweep
            self.retry.add((namespace, L.live_runner_name(name)))
            log.warning("LiveRunner %s/%s: app table row not written, will retry: %s",
                        namespace, name, exc)  # fmt: skip
            return
        self.view.wrote(written, wanted)
        log.info("wrote the app table row of LiveRunner %s/%s", namespace, name)

    def app_price(self, key: Key) -> tuple[AppPrice | None, EthUsd | None]:
        """The app's price as configured (inline or a Pricing), and the ETH/USD reading."""
        body = self.view.one(self.view.live_runners, key)
        try:
            spec = LiveRunnerSpec.model_validate((body or {}).get("spec") or {})
            return resolve_app_price(spec, self.view.pricings_in(key[0])), self.eth_usd
        except (ValidationError, NoAppPrice):
            return None, self.eth_usd

    def sweep(self) -> None:
        """Retry what failed; price every app again when the ETH/USD reading changed. One
        app's failure is logged and retried, never the end of the pass."""
        keys = sorted(self.retry)
        if self.read_rate():
            keys += [key for key in list(self.view.live_runners) if key not in self.retry]
        for key in keys:
            try:
                self.changed(*key)
            except Exception:
                log.exception("LiveRunner app %s/%s: reconcile failed, will retry", *key)
                self.retry.add(key)
