"""kopf handlers: each reads like the sentence that describes it, and does no more.

Registered on an explicit registry built from the settings, so nothing happens at import.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import kopf
from pydantic import ValidationError

from kubepeer.api import GROUP, VERSION, AIModelSpec, AIModelStatus, Phase
from kubepeer.controller.builders import build_priority_classes
from kubepeer.controller.fleet import observe_model, reconcile_namespace
from kubepeer.controller.kube import Kube
from kubepeer.controller.settings import OperatorSettings
from kubepeer.demand import RedisLike

log = logging.getLogger(__name__)
AIMODELS = (GROUP, VERSION, "aimodels")
PRICINGS = (GROUP, VERSION, "pricings")


def build_registry(
    operator_settings: OperatorSettings, kube: Kube, redis: RedisLike | None
) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # Keep kopf's bookkeeping in our annotations; status belongs to the AIModel schema.
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
            prefix="kubepeer.io"
        )
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix="kubepeer.io", key="last-handled-configuration"
        )
        settings.persistence.finalizer = "kubepeer.io/operator"
        settings.posting.level = logging.INFO
        settings.watching.server_timeout = 300

    @kopf.on.startup(registry=registry)
    def create_priority_classes(**_: Any) -> None:
        for priority_class in build_priority_classes(operator_settings):
            kube.apply(priority_class)

    @kopf.on.resume(*AIMODELS, registry=registry)
    @kopf.on.create(*AIMODELS, registry=registry)
    @kopf.on.update(*AIMODELS, registry=registry)
    def aimodel_changed(
        namespace: str,
        old: kopf.BodyEssence | None,
        new: kopf.BodyEssence,
        patch: kopf.Patch,
        **_: Any,
    ) -> None:
        reconcile_namespace(kube, operator_settings, namespace)
        if waking_up(old, new):  # the start of a cold start, timed in status
            patch.status["lastScaleUpTime"] = datetime.now(UTC).isoformat()

    @kopf.on.event(*AIMODELS, registry=registry)
    def aimodel_deleted(type: str, namespace: str, **_: Any) -> None:
        if type == "DELETED":  # its own runner is garbage-collected; a share group shrinks
            reconcile_namespace(kube, operator_settings, namespace)

    @kopf.on.event(*PRICINGS, registry=registry)
    def pricing_changed(namespace: str, **_: Any) -> None:
        # Any event, the initial listing included: prices feed the namespace's table.
        reconcile_namespace(kube, operator_settings, namespace)

    @kopf.timer(*AIMODELS, interval=operator_settings.status_interval_seconds, registry=registry)
    def refresh_status(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        raw = dict(body)
        observation = observe_model(kube, operator_settings, raw, redis)
        status = observation.status.to_wire()
        if status != {k: v for k, v in (raw.get("status") or {}).items() if k in status}:
            patch.status.update(status)
        _post_transition(body, raw.get("status"), observation.status)
        if observation.scale_to_zero:
            meta = raw["metadata"]
            kube.scale_aimodel(meta["namespace"], meta["name"], 0)
            kopf.info(body, reason="ScaledToZero", message="idle past warm.idleTimeout")

    return registry


def waking_up(old: kopf.BodyEssence | None, new: kopf.BodyEssence) -> bool:
    """Whether this change asks for replicas where there were none (or is the creation)."""
    try:
        after = AIModelSpec.model_validate(new.get("spec", {})).desired_replicas
        before = AIModelSpec.model_validate(old["spec"]).desired_replicas if old else 0
    except ValidationError:
        return False
    return before == 0 and after > 0


def _post_transition(body: kopf.Body, before: dict[str, Any] | None, after: AIModelStatus) -> None:
    """A Kubernetes Event when the phase changes, a warning when it turns bad."""
    was = (before or {}).get("phase")
    if was == after.phase.value:
        return
    ready = next((c for c in after.conditions if c.type == "Ready"), None)
    message = f"{was or 'new'} -> {after.phase.value}"
    if ready and ready.message:
        message += f": {ready.message}"
    if after.phase in (Phase.FAILED, Phase.DEGRADED):
        kopf.warn(body, reason=ready.reason if ready else after.phase.value, message=message)
    else:
        kopf.info(body, reason=after.phase.value, message=message)
