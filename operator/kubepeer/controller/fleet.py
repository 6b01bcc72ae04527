"""The operator's work, between thin kopf handlers and the pure builders.

`reconcile_namespace` makes a namespace's runners and price table match its AIModels
and Pricings; `observe_model` reads one AIModel's runner and says what its status is and
whether it should scale to zero.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from kubepeer.api import AIModel, AIModelStatus, Phase, PricingSpec, WarmPolicy
from kubepeer.controller import labels as L
from kubepeer.controller.builders import (
    InvalidSpec,
    Member,
    RunnerPlan,
    build_runner_deployment,
    build_runner_service,
)
from kubepeer.controller.kube import Kube
from kubepeer.controller.prices import (
    PricingProblem,
    TableRow,
    ai_models_json,
    models_table,
    resolve_price,
)
from kubepeer.controller.settings import OperatorSettings
from kubepeer.controller.status import Observed, compute_status
from kubepeer.demand import RedisLike, idle_for, read_demand

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """Every runner a namespace should have, and the AIModels that cannot have one."""

    runners: dict[str, RunnerPlan]  # by runner name
    runner_of: dict[str, str]  # AIModel name -> runner name
    invalid: dict[str, str]  # AIModel name -> why


def plan_namespace(namespace: str, bodies: list[dict[str, Any]]) -> Plan:
    runners: dict[str, RunnerPlan] = {}
    invalid: dict[str, str] = {}
    groups: dict[str, list[Member]] = defaultdict(list)
    for body in bodies:
        meta = body["metadata"]
        if meta.get("deletionTimestamp"):
            continue
        try:
            model = AIModel.model_validate(body)
        except ValidationError as exc:  # the schema should have stopped it; say so if not
            invalid[meta["name"]] = _validation_message(exc)
            continue
        member = Member(name=meta["name"], uid=meta["uid"], spec=model.spec)
        if model.spec.gpu.share_group:
            groups[model.spec.gpu.share_group].append(member)
        else:
            plan = RunnerPlan.dedicated(namespace, member)
            runners[plan.name] = plan
    for group, members in groups.items():
        try:
            plan = RunnerPlan.group(namespace, group, members)
        except InvalidSpec as exc:
            invalid.update({m.name: str(exc) for m in members})
            continue
        runners[plan.name] = plan
    runner_of = {m.name: plan.name for plan in runners.values() for m in plan.members}
    return Plan(runners=runners, runner_of=runner_of, invalid=invalid)


def _validation_message(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
    ) or str(exc)


def pricings_of(kube: Kube, namespace: str) -> dict[str, PricingSpec]:
    found = {}
    for body in kube.list_pricings(namespace):
        try:
            found[body["metadata"]["name"]] = PricingSpec.model_validate(body["spec"])
        except ValidationError as exc:
            log.warning("Pricing %s/%s ignored: %s", namespace, body["metadata"]["name"], exc)
    return found


def reconcile_namespace(kube: Kube, settings: OperatorSettings, namespace: str) -> Plan:
    """Apply every runner the namespace's AIModels need, remove the rest, publish prices."""
    plan = plan_namespace(namespace, kube.list_aimodels(namespace))
    if kube.namespace_terminating(namespace):
        return plan  # its objects are going; creating any would be refused
    if plan.runners:
        kube.ensure_auth_secret(namespace, settings)
    for runner in plan.runners.values():
        kube.apply(build_runner_deployment(runner, settings))
        kube.apply(build_runner_service(runner, settings))
    log.info(
        "%s: %d runner(s) for %d AIModel(s)%s",
        namespace,
        len(plan.runners),
        len(plan.runner_of) + len(plan.invalid),
        f", invalid: {', '.join(sorted(plan.invalid))}" if plan.invalid else "",
    )
    for name in set(kube.runner_deployments(namespace)) - set(plan.runners):
        log.info("removing runner %s/%s: no AIModel needs it any more", namespace, name)
        kube.delete_runner(namespace, name)
    publish_models(kube, settings, namespace, plan)
    return plan


def publish_models(kube: Kube, settings: OperatorSettings, namespace: str, plan: Plan) -> None:
    """The proxy's models.json and go-livepeer's aiModels.json, in one ConfigMap."""
    pricings = pricings_of(kube, namespace)
    rows = []
    for runner in plan.runners.values():
        for member in runner.members:
            try:
                price = resolve_price(member.spec, pricings)
            except PricingProblem:
                price = None
            rows.append(TableRow(member.name, member.spec, runner.name, price))
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": L.MODELS_CONFIGMAP,
                "namespace": namespace,
                "labels": {L.PART_OF: "kubepeer", L.MANAGED_BY: "kubepeer-operator"},
            },
            "data": {
                "models.json": json.dumps(models_table(rows, settings.runner_port), indent=1),
                "aiModels.json": json.dumps(ai_models_json(rows, settings.proxy_url), indent=1),
            },
        }
    )


@dataclass(frozen=True)
class Observation:
    status: AIModelStatus
    scale_to_zero: bool  # an OnDemand model idle past its timeout


def observe_model(
    kube: Kube,
    settings: OperatorSettings,
    body: dict[str, Any],
    redis: RedisLike | None,
    now: float | None = None,
) -> Observation:
    now = now if now is not None else time.time()
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    previous = AIModelStatus.model_validate(body["status"]) if body.get("status") else None
    plan = plan_namespace(namespace, kube.list_aimodels(namespace))
    runner_name = plan.runner_of.get(name)
    invalid = plan.invalid.get(name)
    model = AIModel.model_validate(body) if not invalid else None

    pricing_problem = None
    if model is not None:
        try:
            resolve_price(model.spec, pricings_of(kube, namespace))
        except PricingProblem as exc:
            pricing_problem = str(exc)

    runner = plan.runners.get(runner_name) if runner_name else None
    observed = Observed(
        desired=runner.replicas if runner else 0,
        generation=meta.get("generation", 0),
        deployment=kube.read_deployment(namespace, runner_name) if runner_name else None,
        pods=kube.runner_pods(namespace, runner_name) if runner_name else [],
        selector=f"{L.RUNNER}={runner_name}" if runner_name else "",
        invalid=invalid,
        pricing_problem=pricing_problem,
    )
    status = compute_status(observed, previous, datetime.fromtimestamp(now, UTC))

    scale_to_zero = False
    if (
        model is not None
        and model.spec.warm.policy is WarmPolicy.ON_DEMAND
        and model.spec.desired_replicas > 0
        and status.phase is not Phase.IDLE
    ):
        if redis is None:
            log.debug("no Redis configured: %s/%s is never scaled to zero", namespace, name)
        else:
            demand = read_demand(redis, namespace, name)
            woken = status.last_scale_up_time.timestamp() if status.last_scale_up_time else None
            idle = idle_for(demand, woken, now)
            scale_to_zero = idle is not None and idle > model.spec.warm.idle_timeout_seconds
    return Observation(status=status, scale_to_zero=scale_to_zero)
