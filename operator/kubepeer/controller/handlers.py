"""kopf wiring: indices kept by the watches, and one small handler per kind of change.

Each handler touches one thing: the runner an AIModel belongs in, that AIModel's table
row and its status. What a handler knows about other objects comes from kopf indices
(`View`), never from listing the API server. No handler needs a finalizer, so AIModels
never outlive the operator (see `kubepeer uninstall` for ones an older version marked).

Registered on an explicit registry built from the settings, so nothing happens at import.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from kubepeer.api import (
    GROUP,
    VERSION,
    AIModel,
    AIModelStatus,
    LiveRunner,
    LiveRunnerSpec,
    Phase,
    WarmPolicy,
)
from kubepeer.api.aimodel import Earnings
from kubepeer.api.live_runner import LiveRunnerStatus
from kubepeer.api.workload import WorkloadSpec
from kubepeer.contracts import labels as L
from kubepeer.contracts.demand import claim_idle, idle_for, live_runner_subject, read_demand
from kubepeer.contracts.earnings import HOUR_SECONDS, Hour, hour_of, read_hours
from kubepeer.controller.builders import build_priority_classes
from kubepeer.controller.fleet import (
    Key,
    RunnerOutcome,
    View,
    model_status,
    publish_table,
    reconcile_runner,
    runners_of,
    status_changes,
    target_runner,
)
from kubepeer.controller.kube import Kube
from kubepeer.controller.live_runners import LiveRunners
from kubepeer.controller.registration import Registrar, node_labels, read_orchestrator_secret
from kubepeer.controller.revenue import Decision, decide, forecast
from kubepeer.controller.settings import OperatorSettings

log = logging.getLogger(__name__)
DEFAULT_COLD_START = 60.0  # seconds: a Revenue model's cold start before one is measured
AIMODELS = (GROUP, VERSION, "aimodels")
LIVE_RUNNERS = (GROUP, VERSION, LiveRunner.PLURAL)
PRICINGS = (GROUP, VERSION, "pricings")
DEPLOYMENTS = ("apps", "v1", "deployments")
PODS = ("", "v1", "pods")
CONFIGMAPS = ("", "v1", "configmaps")
OURS = {L.MANAGED_BY: L.MANAGER, L.COMPONENT: L.RUNNER_COMPONENT}  # AIModel runners
LIVE_OURS = {L.MANAGED_BY: L.MANAGER, L.COMPONENT: L.LIVE_RUNNER_COMPONENT}  # LiveRunner apps
INDICES = ("aimodels", "members", "runners", "listed_in", "pods", "pricings", "tables",
           "live_runners", "live_deployments", "live_pods", "app_tables")  # fmt: skip


class Fleet:
    """The operator's state between events: the indices, what it wrote, what to retry."""

    def __init__(self, settings: OperatorSettings, kube: Kube, redis: Any | None) -> None:
        self.settings, self.kube, self.redis = settings, kube, redis
        self.view = View()
        self.live = LiveRunners(settings, kube, self.view, redis)
        self.live.registrar = self.registrar = Registrar(
            self.view, functools.partial(read_orchestrator_secret, kube, settings),
            functools.partial(node_labels, kube), self.live.app_price, self._live_status_soon,
            store=redis,
        )  # fmt: skip
        self.written: dict[Key, dict[str, Any]] = {}  # status last written, until watched back
        self.retry: set[Key] = set()  # AIModels whose last reconcile failed
        self.decisions: dict[Key, Decision] = {}  # Revenue models: the last decision
        self.earned: dict[Key, Earnings] = {}  # every model's last complete hour on record
        self._decided_at = float("-inf")
        self._locks: dict[Key, threading.Lock] = {}
        self._guard = threading.Lock()

    def _live_status_soon(self, key: Key) -> None:
        """A LiveRunner's registrations changed (on the event loop): its status is written
        off the loop."""
        asyncio.get_running_loop().run_in_executor(None, self.live.refresh_status, *key)

    def bind(self, indices: Mapping[str, Any]) -> None:
        """Point the view at kopf's live indices (the same objects for the operator's life)."""
        if not isinstance(self.view.aimodels, dict):
            return  # bound already
        self.view = View(**{name: indices[name] for name in INDICES}, applied=self.view.applied)
        self.live.view = self.registrar.view = self.view

    def lock(self, key: Key) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    # --- one AIModel ---

    def model_changed(self, namespace: str, name: str) -> None:
        """Reconcile the runners an AIModel is or wants to be in, its table row, its status."""
        key = (namespace, name)
        body = self.view.one(self.view.aimodels, key)
        gone = body is None or bool(body["metadata"].get("deletionTimestamp"))
        try:
            for runner in runners_of(self.view, namespace, name, None if gone else body):
                outcome = reconcile_runner(self.kube, self.settings, self.view, namespace, runner)
                self.runner_changed(namespace, runner, outcome, skip=name)
            if not gone:
                publish_table(self.kube, self.settings, self.view, body)
        except Exception as exc:  # an API error, or the network: retried alone, by the sweep
            self.retry.add(key)
            log.warning("AIModel %s/%s: reconcile failed, will retry: %s", namespace, name, exc)
            return
        self.retry.discard(key)
        if gone:
            self.written.pop(key, None)
        else:
            self.refresh_status(namespace, name)

    def runner_changed(
        self, namespace: str, runner: str, outcome: RunnerOutcome | None = None, skip: str = ""
    ) -> None:
        """Refresh the status of every AIModel that wants this runner."""
        for name in sorted(set(self.view.many(self.view.members, (namespace, runner)))):
            if name != skip:
                self.refresh_status(namespace, name, outcome)

    def refresh_status(
        self, namespace: str, name: str, outcome: RunnerOutcome | None = None
    ) -> None:
        key = (namespace, name)
        with self.lock(key):
            body = self.view.one(self.view.aimodels, key)
            if body is None or body["metadata"].get("deletionTimestamp"):
                return
            # What we wrote last is newer than what the watch has shown back so far.
            known = {**body, "status": self.written.get(key) or body.get("status")}
            decision = self.decisions.get(key)
            status = model_status(
                self.settings,
                self.view,
                known,
                outcome,
                earnings=self.earned.get(key),
                warm=None if decision is None else (decision.warm, decision.reason),
            )
            changes = status_changes(known, status)
            if changes is None:
                return
            try:
                self.kube.patch_status(namespace, name, changes)
            except ApiException as exc:
                if exc.status != 404:
                    log.warning("AIModel %s/%s: status not written: %s", namespace, name, exc)
                    self.retry.add(key)
                return
            self.written[key] = changes
        _post_transition(body, known.get("status"), status)

    # --- what needs time: idle OnDemand models, and retries ---

    def sweep(self, now: float | None = None) -> None:
        for key in sorted(self.retry):
            self.model_changed(*key)
        try:
            self._sweep_revenue(now)
            self._sweep_idle(now)
        finally:
            self.live.sweep()  # after the idle pass, which one app's failure must not stop

    def _sweep_idle(self, now: float | None) -> None:
        if self.redis is None:
            return
        now = time.time() if now is None else now
        for key in snapshot(self.view.aimodels):
            body = self.view.one(self.view.aimodels, key)
            try:
                model = AIModel.model_validate(body)
            except (ValidationError, TypeError):  # gone, or invalid: status says why
                continue
            if model.spec.warm.policy is WarmPolicy.REVENUE:
                continue  # _sweep_revenue decides it, with its decision's timeout
            timeout = model.spec.warm.idle_timeout_seconds
            if idle_past_timeout(self.redis, *key, model.spec, model.status, now, timeout):
                scale_to_zero(self.kube, self.redis, body, key[1], timeout, now, AIModel.PLURAL)
        for key in snapshot(self.view.live_runners):
            body = self.view.one(self.view.live_runners, key)
            try:
                spec = LiveRunnerSpec.model_validate(body["spec"])
                status = LiveRunnerStatus.model_validate(body.get("status") or {})
            except (TypeError, KeyError, ValidationError):  # gone, or invalid: status says why
                continue
            meta = body["metadata"]
            subject = live_runner_subject(meta["name"])
            # (no earnings are recorded for sessions yet: a Revenue LiveRunner is OnDemand)
            timeout = spec.warm.idle_timeout_seconds
            if idle_past_timeout(
                self.redis, meta["namespace"], subject, spec, status, now, timeout
            ):
                scale_to_zero(self.kube, self.redis, body, subject, timeout, now,
                              LiveRunner.PLURAL)  # fmt: skip

    def _sweep_revenue(self, now: float | None) -> None:
        """Every revenue_interval_seconds, from the earnings records: each model's last hour
        into its status, and each Revenue model decided again: woken when it should be
        warm, scaled to zero when it should not and has been idle for the decision's
        timeout. A changed decision is an event and the Warm condition."""
        now = time.time() if now is None else now
        if self.redis is None or now - self._decided_at < self.settings.revenue_interval_seconds:
            return
        self._decided_at = now
        for key in snapshot(self.view.aimodels):
            body = self.view.one(self.view.aimodels, key)
            try:
                model = AIModel.model_validate(body)
            except (ValidationError, TypeError):  # gone, or invalid: status says why
                continue
            hours = read_hours(self.redis, *key)
            earned = last_hour(hours, hour_of(now))
            changed = earned != self.earned.get(key)
            if earned is None:
                self.earned.pop(key, None)
            else:
                self.earned[key] = earned
            if model.spec.warm.policy is not WarmPolicy.REVENUE:
                self.decisions.pop(key, None)
                if changed:
                    self.refresh_status(*key)
                continue
            decision = self._decision(model, hours, now)
            before, self.decisions[key] = self.decisions.get(key), decision
            if before is None or before.warm != decision.warm:
                log.info("AIModel %s/%s %s", *key, decision.reason)
                self.kube.post_event(dict(body), "KeptWarm" if decision.warm else "OnDemand",
                                     decision.reason)  # fmt: skip
                changed = True
            if changed:
                self.refresh_status(*key)
            if decision.warm and model.spec.desired_replicas == 0:
                self._wake(body, max(1, model.spec.warm.floor))
            elif not decision.warm and idle_past_timeout(
                self.redis, *key, model.spec, model.status, now, decision.idle_timeout
            ):
                scale_to_zero(self.kube, self.redis, body, key[1], decision.idle_timeout, now,
                              AIModel.PLURAL, why=decision.reason)  # fmt: skip

    def _wake(self, body: Mapping[str, Any], replicas: int) -> None:
        meta = body["metadata"]
        try:
            self.kube.scale(meta["namespace"], meta["name"], replicas,
                            resource_version=meta["resourceVersion"])  # fmt: skip
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise
            self._decided_at = float("-inf")  # changed since we read it: decided again next

    def _decision(self, model: AIModel, hours: Mapping[int, Hour], now: float) -> Decision:
        spec, status = model.spec, model.status
        prices = self.settings.gpu_prices_eth_per_hour
        product = next((p for p in spec.gpu.products if p in prices), None)
        per_gpu = prices[product] if product else self.settings.gpu_price_eth_per_hour
        cold_start = status.last_cold_start_seconds if status else None
        return decide(
            forecast(hours, hour_of(now)),
            gpu_cost_wei_per_hour=max(spec.gpu.count, 1) * per_gpu * 1e18,
            cold_start_seconds=DEFAULT_COLD_START if cold_start is None else cold_start,
            patience_seconds=self.settings.gateway_patience_seconds,
            idle_timeout_seconds=spec.warm.idle_timeout_seconds,
        )


def last_hour(hours: Mapping[int, Hour], hour: int) -> Earnings | None:
    """The complete hour before `hour`, for the status (None: nothing on record)."""
    last = hours.get(hour - 1)
    if last is None:
        return None
    return Earnings(hour=datetime.fromtimestamp((hour - 1) * HOUR_SECONDS, UTC),
                    earned_wei=str(last.earned_wei), jobs=last.jobs,
                    cold_waits=last.cold_waits, refused=last.refused)  # fmt: skip


def idle_past_timeout(
    redis: Any, namespace: str, subject: str, spec: WorkloadSpec,
    status: AIModelStatus | None, now: float, timeout: float,
) -> bool:  # fmt: skip
    """A workload that scales to zero, running replicas with no demand for longer than
    `timeout` (its idleTimeout, or a Revenue model's decision), counted from its demand
    records (`subject`) and from when it turned Ready."""
    if not spec.warm.on_demand or spec.warm.floor > 0 or spec.desired_replicas == 0:
        return False
    status = status or AIModelStatus()
    ready_at = None
    if status.ready_replicas > 0 and status.last_scale_up_time is not None:
        ready_at = status.last_scale_up_time.timestamp() + (status.last_cold_start_seconds or 0)
    idle = idle_for(read_demand(redis, namespace, subject, now), ready_at, now)
    return idle is not None and idle > timeout


def scale_to_zero(
    kube: Kube, redis: Any, body: Mapping[str, Any], subject: str, timeout: float, now: float,
    plural: str, why: str = "idle past warm.idleTimeout",
) -> None:  # fmt: skip
    """Claim the workload idle in Redis, then scale it to zero only if the object is
    unchanged since we read it (resourceVersion): a job or session arriving in between wins."""
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    if not claim_idle(redis, namespace, subject, idle_since=now - timeout, now=now):
        return
    try:
        kube.scale(namespace, name, 0, resource_version=meta["resourceVersion"], plural=plural)
    except ApiException as exc:
        if exc.status in (404, 409):
            return  # it changed (a wake-up, an edit): the next sweep decides again
        raise
    log.info("scaled %s %s/%s to zero: %s", plural, namespace, name, why)
    kube.post_event(dict(body), "ScaledToZero", why)


class NoDiffBase(kopf.DiffBaseStorage):
    """No "last handled" copy of each object: kopf keeps one to give change handlers
    (on.create/update) a diff, and this operator has none, only event handlers and indices.
    kopf's default deep-copies every object on every event for it: a tenth of the
    operator's CPU while a fleet is created (py-spy, 1,000 AIModels)."""

    def build(self, *, body: Any, extra_fields: Any = None) -> Any:
        return {}

    def fetch(self, *, body: Any) -> None:
        return None

    def store(self, *, body: Any, patch: Any, essence: Any) -> None:
        pass


def snapshot(index: Mapping[Key, Any]) -> list[Key]:
    """The keys of an index, read from a worker thread while the watch may be changing it."""
    while True:
        try:
            return list(index)
        except RuntimeError:  # changed size during iteration: read again
            continue


def _slim(body: kopf.Body) -> dict[str, Any]:
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": dict(body.metadata),
        "spec": dict(body.spec),
        "status": dict(body.status),
    }


def _deployment_summary(body: kopf.Body) -> dict[str, Any]:
    annotations = body.metadata.annotations
    return {
        "hash": annotations.get(L.CONTENT_HASH),
        "metadata": {"name": body.metadata.name, "generation": body.metadata.get("generation")},
        "spec": {"replicas": body.spec.get("replicas")},
        "status": dict(body.status),
    }


def _served(body: kopf.Body) -> list[str]:
    try:
        return [m["aimodel"] for m in json.loads(body.metadata.annotations[L.MODELS_ANNOTATION])]
    except (KeyError, ValueError, TypeError):
        return []


def _pod_summary(body: kopf.Body) -> dict[str, Any]:
    status = body.status
    return {
        "metadata": {
            "name": body.metadata.name,
            "deletionTimestamp": body.metadata.get("deletionTimestamp"),
        },
        "spec": {"nodeName": body.spec.get("nodeName")},
        "status": {
            "podIP": status.get("podIP"),
            "conditions": status.get("conditions") or [],
            "containerStatuses": status.get("containerStatuses") or [],
        },
    }


def build_registry(
    operator_settings: OperatorSettings, kube: Kube, redis: Any | None
) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    fleet = Fleet(operator_settings, kube, redis)

    def on(fn: Callable[..., None]) -> Callable[..., None]:
        """Give a handler the view of kopf's indices before it runs."""

        @functools.wraps(fn)  # kopf names the handler after fn
        def handler(**kwargs: Any) -> None:
            fleet.bind(kwargs)
            fn(**kwargs)

        return handler

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.level = logging.INFO
        settings.watching.server_timeout = 300
        settings.execution.max_workers = operator_settings.workers
        settings.persistence.diffbase_storage = NoDiffBase()

    @kopf.on.startup(registry=registry)
    def create_priority_classes(**_: Any) -> None:
        for priority_class in build_priority_classes(operator_settings):
            kube.apply(priority_class)

    # --- indices: the operator's memory of the cluster, kept by the watches ---

    @kopf.index(*AIMODELS, registry=registry, id="aimodels")
    def aimodels(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[Key, Any]:
        return {(namespace, name): _slim(body)}

    @kopf.index(*AIMODELS, registry=registry, id="members")
    def members(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[Key, str]:
        return {(namespace, target_runner(body)): name}

    @kopf.index(*PRICINGS, registry=registry, id="pricings")
    def pricings(namespace: str, name: str, spec: kopf.Spec, **_: Any) -> dict[str, Any]:
        return {namespace: (name, dict(spec))}

    @kopf.index(*DEPLOYMENTS, labels=OURS, registry=registry, id="runners")
    def runners(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[Key, Any]:
        return {(namespace, name): _deployment_summary(body)}

    @kopf.index(*DEPLOYMENTS, labels=OURS, registry=registry, id="listed_in")
    def listed_in(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[Key, str]:
        return {(namespace, model): name for model in _served(body)}

    @kopf.index(*PODS, labels={L.RUNNER: kopf.PRESENT}, registry=registry, id="pods")
    def pods(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Key, Any]:
        return {(namespace, labels[L.RUNNER]): _pod_summary(body)}

    @kopf.index(*LIVE_RUNNERS, registry=registry, id="live_runners")
    def live_runners(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[Key, Any]:
        return {(namespace, L.live_runner_name(name)): _slim(body)}

    @kopf.index(*DEPLOYMENTS, labels=LIVE_OURS, registry=registry, id="live_deployments")
    def live_deployments(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[Key, Any]:
        return {(namespace, name): _deployment_summary(body)}

    @kopf.index(*PODS, labels={L.LIVE_RUNNER: kopf.PRESENT}, registry=registry, id="live_pods")
    def live_pods(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Key, Any]:
        return {(namespace, labels[L.LIVE_RUNNER]): _pod_summary(body)}

    @kopf.index(*CONFIGMAPS, labels={L.TABLE: "model"}, registry=registry, id="tables")
    def tables(namespace: str, annotations: kopf.Annotations, **_: Any) -> dict[Key, Any]:
        return {
            (namespace, annotations.get(L.AIMODEL_ANNOTATION, "")): annotations.get(L.CONTENT_HASH)
        }

    @kopf.index(*CONFIGMAPS, labels={L.TABLE: "app"}, registry=registry, id="app_tables")
    def app_tables(namespace: str, annotations: kopf.Annotations, **_: Any) -> dict[Key, Any]:
        return {
            (namespace, annotations.get(L.LIVE_RUNNER_ANNOTATION, "")): annotations.get(
                L.CONTENT_HASH
            )
        }

    # --- handlers: one change, one thing reconciled ---

    @kopf.on.event(*AIMODELS, registry=registry)
    @on
    def aimodel_event(namespace: str, name: str, **_: Any) -> None:
        fleet.model_changed(namespace, name)

    @kopf.on.event(*DEPLOYMENTS, labels=OURS, registry=registry)
    @on
    def runner_event(type: str | None, namespace: str, name: str, **_: Any) -> None:
        wanted = sorted(set(fleet.view.many(fleet.view.members, (namespace, name))))
        if not wanted:  # an orphan (its AIModels went while the operator was away)
            if type != "DELETED":
                reconcile_runner(kube, operator_settings, fleet.view, namespace, name)
        elif type == "DELETED":  # deleted by hand while still wanted: restore it
            fleet.view.applied.pop((namespace, name), None)
            fleet.model_changed(namespace, wanted[0])
        else:
            fleet.runner_changed(namespace, name)

    @kopf.on.event(*PODS, labels={L.RUNNER: kopf.PRESENT}, registry=registry)
    @on
    def runner_pod_event(namespace: str, labels: kopf.Labels, **_: Any) -> None:
        fleet.runner_changed(namespace, labels[L.RUNNER])

    @kopf.on.event(*PRICINGS, registry=registry)
    @on
    def pricing_event(namespace: str, **_: Any) -> None:
        for ns, name in snapshot(fleet.view.aimodels):
            if ns == namespace:
                fleet.model_changed(ns, name)
        for ns, deployment in snapshot(fleet.view.live_runners):
            if ns == namespace:
                fleet.live.refresh_status(ns, deployment)  # its Priced condition

    @kopf.on.event(*LIVE_RUNNERS, registry=registry)
    @on
    def live_runner_event(namespace: str, name: str, **_: Any) -> None:
        fleet.live.changed(namespace, L.live_runner_name(name))

    @kopf.on.event(*DEPLOYMENTS, labels=LIVE_OURS, registry=registry)
    @on
    def live_deployment_event(type: str | None, namespace: str, name: str, **_: Any) -> None:
        if type == "DELETED":  # by hand, or with its LiveRunner: restored if still wanted
            fleet.view.applied.pop((namespace, name), None)
            fleet.live.changed(namespace, name)
        else:
            fleet.live.refresh_status(namespace, name)

    @kopf.on.event(*PODS, labels={L.LIVE_RUNNER: kopf.PRESENT}, registry=registry)
    @on
    def live_pod_event(namespace: str, labels: kopf.Labels, **_: Any) -> None:
        fleet.live.refresh_status(namespace, labels[L.LIVE_RUNNER])

    @kopf.on.event(*CONFIGMAPS, labels={L.TABLE: "model"}, registry=registry)
    @on
    def table_event(
        type: str | None, namespace: str, name: str, annotations: kopf.Annotations, **_: Any
    ) -> None:
        if type == "DELETED":  # deleted by hand: the model (if it is still here) rewrites it
            fleet.view.applied.pop((namespace, name), None)
            fleet.model_changed(namespace, annotations.get(L.AIMODEL_ANNOTATION, ""))

    @kopf.on.event(*CONFIGMAPS, labels={L.TABLE: "app"}, registry=registry)
    @on
    def app_table_event(
        type: str | None, namespace: str, name: str, annotations: kopf.Annotations, **_: Any
    ) -> None:
        if type == "DELETED":  # deleted by hand: the LiveRunner (if it is still here) rewrites it
            fleet.view.applied.pop((namespace, name), None)
            live_runner = annotations.get(L.LIVE_RUNNER_ANNOTATION, "")
            fleet.live.changed(namespace, L.live_runner_name(live_runner))

    # --- what needs time ---

    @kopf.on.startup(registry=registry)
    async def start_sweeps(memo: kopf.Memo, **kwargs: Any) -> None:
        fleet.bind(kwargs)
        memo["sweeper"] = asyncio.create_task(_sweep_forever(fleet))
        memo["registrar"] = asyncio.create_task(fleet.registrar.run_forever())

    @kopf.on.cleanup(registry=registry)
    async def stop_sweeps(memo: kopf.Memo, **_: Any) -> None:
        for name in ("sweeper", "registrar"):
            task = memo.get(name)
            if task is not None:
                task.cancel()

    return registry


async def _sweep_forever(fleet: Fleet) -> None:
    """Idle OnDemand models and failed reconciles: the only work done on a clock."""
    while True:
        await asyncio.sleep(fleet.settings.status_interval_seconds)
        try:
            await asyncio.to_thread(fleet.sweep)
        except Exception:  # keep sweeping: one bad pass must not stop scale-to-zero
            log.exception("sweep failed")


def _post_transition(
    body: Mapping[str, Any], before: Mapping[str, Any] | None, after: AIModelStatus
) -> None:
    """A Warning Event when the phase turns bad. Good news is in the status only: at fleet
    scale an Event per transition is a write per model per step, as many as the runner's."""
    was = (before or {}).get("phase")
    if was == after.phase.value or after.phase not in (Phase.FAILED, Phase.DEGRADED):
        return
    ready = next((c for c in after.conditions if c.type == "Ready"), None)
    message = f"{was or 'new'} -> {after.phase.value}"
    if ready and ready.message:
        message += f": {ready.message}"
    try:
        kopf.warn(dict(body), reason=ready.reason if ready else after.phase.value, message=message)
    except LookupError:  # outside a kopf handler (the sweep's retries): the status says it
        log.info("%s/%s: %s", body["metadata"]["namespace"], body["metadata"]["name"], message)
