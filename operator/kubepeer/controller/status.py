"""Pure status: what the Deployment and its pods say, turned into an AIModel's status.

Nothing here is guessed: unschedulable comes from the scheduler's PodScheduled
condition on the pods, a failed load from the runner's container state.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubepeer.api import AIModelStatus, Condition, ConditionStatus, Phase
from kubepeer.api.aimodel import Earnings

READY, PROGRESSING, DEGRADED, PRICED = "Ready", "Progressing", "Degraded", "Priced"
WARM = "Warm"  # Revenue models: the warm policy's last decision, with its numbers
CRASH_REASONS = {"CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "CreateContainerError"}


@dataclass(frozen=True)
class Observed:
    """What the operator read from the cluster about one AIModel's runner."""

    desired: int
    generation: int
    deployment: dict[str, Any] | None
    pods: list[dict[str, Any]]
    selector: str
    invalid: str | None = None  # why the spec cannot be run, if it cannot
    pricing_problem: str | None = None  # why no price applies, if none does
    current: bool = True  # the Deployment was written from this AIModel's current spec
    nodes_fixed: bool = False  # no node will ever be added (no autoscaler): see _never_fits
    earnings: Earnings | None = None  # the last complete hour on record
    warm: tuple[bool, str] | None = None  # a Revenue model's decision: (warm, why)


def _unschedulable(pods: list[dict[str, Any]]) -> str | None:
    for pod in pods:
        for cond in pod.get("status", {}).get("conditions") or []:
            if (
                cond.get("type") == "PodScheduled"
                and cond.get("status") == "False"
                and cond.get("reason") == "Unschedulable"
            ):
                return cond.get("message") or "the scheduler found no node"
    return None


def _load_failure(pods: list[dict[str, Any]]) -> str | None:
    for pod in pods:
        for cs in pod.get("status", {}).get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in CRASH_REASONS:
                detail = waiting.get("message") or ""
                last = (cs.get("lastState") or {}).get("terminated") or {}
                if last.get("message"):
                    detail = last["message"]
                return f"{waiting['reason']} in pod {pod['metadata']['name']}" + (
                    f": {detail}" if detail else ""
                )
    return None


def _never_fits(scheduler_message: str) -> bool:
    """True when no existing node could take the pod even if empty (affinity, selector,
    taints), rather than every suitable node being full (`Insufficient ...`). Only then,
    and only when the operator is told nodes are fixed (`nodes_fixed`), is a model Failed:
    a GPU pool that scales from zero has no node that fits until the pod asks for one."""
    return "Insufficient" not in scheduler_message


def _rollout(deployment: dict[str, Any] | None, desired: int) -> tuple[bool, str | None]:
    """(finished, stalled): whether every replica runs the Deployment's newest template
    and is available, and the controller's ProgressDeadlineExceeded message if it gave up."""
    if deployment is None:
        return False, None
    status = deployment.get("status") or {}
    stalled = next(
        (
            c.get("message") or "the rollout made no progress in time"
            for c in status.get("conditions") or []
            if c.get("type") == "Progressing" and c.get("reason") == "ProgressDeadlineExceeded"
        ),
        None,
    )
    observed = int(status.get("observedGeneration") or 0)
    generation = int((deployment.get("metadata") or {}).get("generation") or 0)
    finished = (
        observed >= generation
        and int(status.get("updatedReplicas") or 0) >= desired
        and int(status.get("availableReplicas") or 0) >= desired
        and int(status.get("replicas") or 0) == desired
    )
    return finished, stalled


def compute_status(
    observed: Observed, previous: AIModelStatus | None, now: datetime | None = None
) -> AIModelStatus:
    now = now or datetime.now(UTC)
    previous = previous or AIModelStatus()
    deploy_status = (observed.deployment or {}).get("status", {})
    replicas = int(deploy_status.get("replicas") or 0)
    ready = int(deploy_status.get("readyReplicas") or 0)
    desired = observed.desired
    unschedulable = _unschedulable(observed.pods)
    load_failure = _load_failure(observed.pods)
    finished, stalled = _rollout(observed.deployment, desired)
    finished = finished and observed.current

    # (phase, ready condition, progressing, degraded) as (status, reason, message)
    if observed.invalid:
        phase = Phase.FAILED
        ready_c = (ConditionStatus.FALSE, "InvalidSpec", observed.invalid)
        degraded_c = (ConditionStatus.TRUE, "InvalidSpec", observed.invalid)
        progressing_c = (ConditionStatus.FALSE, "InvalidSpec", "nothing to roll out")
    elif desired == 0:
        phase = Phase.IDLE  # Progressing says whether replicas are still stopping
        ready_c = (ConditionStatus.FALSE, "ScaledToZero", "no replicas wanted; wakes on demand")
        degraded_c = (ConditionStatus.FALSE, "AsExpected", "")
        progressing_c = (
            (ConditionStatus.FALSE, "Idle", "scaled to zero")
            if replicas == 0
            else (ConditionStatus.TRUE, "ScalingDown", f"{replicas} replica(s) stopping")
        )
    else:
        counts = f"{ready}/{desired} replicas ready"
        problem: tuple[str, str] | None = None
        if load_failure:
            problem = ("ModelLoadFailed", load_failure)
        elif stalled:
            problem = ("ProgressDeadlineExceeded", stalled)
        elif unschedulable:
            problem = ("Unschedulable", unschedulable)
        if finished:
            phase = Phase.READY
        elif problem and ready == 0:
            reason = problem[0]
            never = reason == "Unschedulable" and observed.nodes_fixed and _never_fits(problem[1])
            phase = Phase.PENDING if reason == "Unschedulable" and not never else Phase.FAILED
        elif problem:
            phase = Phase.DEGRADED  # some replicas serve (maybe the old version), some cannot
        elif ready > 0 and ready >= desired:
            phase = Phase.LOADING  # the old version serves while the new one loads
        elif ready > 0:
            phase = Phase.DEGRADED
        elif replicas > 0 and _all_scheduled(observed.pods):
            phase = Phase.LOADING
        else:
            phase = Phase.PENDING
        rolling = ready >= desired and not finished
        ready_c = (
            (ConditionStatus.TRUE, "AllReplicasReady", counts)
            if finished
            else (
                ConditionStatus.FALSE,
                problem[0] if problem else ("RollingOut" if rolling else phase.value),
                f"{counts}: {problem[1]}"
                if problem
                else (f"{counts}, the current spec is still rolling out" if rolling else counts),
            )
        )
        degraded_c = (
            (ConditionStatus.TRUE, problem[0], problem[1])
            if problem
            else (ConditionStatus.FALSE, "AsExpected", "")
        )
        progressing_c = (
            (ConditionStatus.FALSE, "Stable", counts)
            if finished
            else (ConditionStatus.TRUE, "RollingOut" if rolling else "ScalingUp", counts)
        )

    conditions = [
        _condition(previous, READY, *ready_c, observed.generation, now),
        _condition(previous, PROGRESSING, *progressing_c, observed.generation, now),
        _condition(previous, DEGRADED, *degraded_c, observed.generation, now),
    ]
    if observed.pricing_problem:
        priced = (ConditionStatus.FALSE, "PricingNotFound", observed.pricing_problem)
    else:
        priced = (ConditionStatus.TRUE, "PriceResolved", "")
    conditions.append(_condition(previous, PRICED, *priced, observed.generation, now))
    if observed.warm is not None:
        kept, why = observed.warm
        warm_c = (ConditionStatus.TRUE, "KeptWarm", why) if kept else (
            ConditionStatus.FALSE, "OnDemand", why)  # fmt: skip
        conditions.append(_condition(previous, WARM, *warm_c, observed.generation, now))

    # Cold start: from the scale-up (creation, or a wake from zero, noticed here as the
    # first status asking for replicas after Idle) to the moment the first pod turned Ready.
    scale_up = previous.last_scale_up_time
    if desired > 0 and (scale_up is None or previous.phase is Phase.IDLE):
        scale_up = now
    cold_start = previous.last_cold_start_seconds
    if ready > 0 and previous.ready_replicas == 0 and scale_up is not None:
        ready_at = _first_ready(observed.pods) or now
        cold_start = round(max(0.0, (max(ready_at, scale_up) - scale_up).total_seconds()), 3)

    return AIModelStatus(
        phase=phase,
        replicas=replicas,
        ready_replicas=ready,
        selector=observed.selector,
        conditions=conditions,
        observed_generation=observed.generation,
        last_cold_start_seconds=cold_start,
        last_scale_up_time=scale_up,
        earnings=observed.earnings,
    )


def _first_ready(pods: list[dict[str, Any]]) -> datetime | None:
    """When the earliest of the pods turned Ready (the kubelet's own timestamp)."""
    times = [
        datetime.fromisoformat(c["lastTransitionTime"])
        for pod in pods
        for c in pod.get("status", {}).get("conditions") or []
        if c.get("type") == "Ready" and c.get("status") == "True" and c.get("lastTransitionTime")
    ]
    return min(times) if times else None


def _all_scheduled(pods: list[dict[str, Any]]) -> bool:
    return bool(pods) and all(p.get("spec", {}).get("nodeName") for p in pods)


def _condition(
    previous: AIModelStatus,
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    generation: int,
    now: datetime,
) -> Condition:
    """A condition whose lastTransitionTime moves only when its status changes."""
    before = next((c for c in previous.conditions if c.type == type_), None)
    changed = before is None or before.status != status
    return Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message[:4096],
        observed_generation=generation,
        last_transition_time=now if changed else before.last_transition_time,
    )
