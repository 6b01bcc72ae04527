"""The operator's work on one thing at a time, between thin kopf handlers and pure builders.

Everything here reads a `View`: the operator's in-memory picture of the cluster, kept
current by kopf indices (watches), never by listing the API server. `reconcile_runner`
makes one runner match the AIModels that want it; `publish_table` writes one AIModel's
row of the price table; `model_status` says what one AIModel's status is. Each writes
only when what it would write differs from what the view shows is there.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from kubepeer.api import AIModel, AIModelSpec, AIModelStatus, PricingSpec
from kubepeer.api.aimodel import Earnings
from kubepeer.contracts import labels as L
from kubepeer.controller.builders import (
    Member,
    RunnerPlan,
    admit_group,
    build_runner,
    content_hash,
)
from kubepeer.controller.prices import (
    PricingProblem,
    TableRow,
    ai_model_entries,
    model_entry,
    resolve_price,
)
from kubepeer.controller.settings import OperatorSettings
from kubepeer.controller.status import Observed, compute_status

log = logging.getLogger(__name__)
Key = tuple[str, str]  # (namespace, name)


@dataclass
class View:
    """What the watches have shown the operator; plain mappings, filled by kopf indices.

    aimodels: (ns, name) -> AIModel body; members: (ns, runner) -> AIModel names that want
    it; runners: (ns, runner) -> Deployment summary; listed_in: (ns, aimodel) -> runners whose
    Deployment serves it; pods: (ns, runner) -> pod summaries; pricings: ns -> (name, spec);
    tables: (ns, aimodel) -> content hash of its table ConfigMap; live_runners,
    live_deployments, live_pods: (ns, app Deployment) -> LiveRunner body, Deployment
    summary, pod summaries; app_tables: (ns, LiveRunner) -> content hash of its app table
    ConfigMap (see live_runners.py)."""

    aimodels: Mapping[Key, Any] = field(default_factory=dict)
    members: Mapping[Key, Any] = field(default_factory=dict)
    runners: Mapping[Key, Any] = field(default_factory=dict)
    listed_in: Mapping[Key, Any] = field(default_factory=dict)
    pods: Mapping[Key, Any] = field(default_factory=dict)
    pricings: Mapping[str, Any] = field(default_factory=dict)
    tables: Mapping[Key, Any] = field(default_factory=dict)
    live_runners: Mapping[Key, Any] = field(default_factory=dict)
    live_deployments: Mapping[Key, Any] = field(default_factory=dict)
    live_pods: Mapping[Key, Any] = field(default_factory=dict)
    app_tables: Mapping[Key, Any] = field(default_factory=dict)
    # What the operator applied in the last minute, by (ns, object name): the watch shows
    # a write later (tens of seconds on a loaded API server), and until then this stops the
    # same write being made twice. A deletion seen by the watch forgets the entry.
    applied: dict[Key, tuple[str, float]] = field(default_factory=dict)
    # Plans (and their runner hash) by runner, with the member specs they were made from.
    plans: dict[Key, tuple[Any, RunnerOutcome]] = field(default_factory=dict)
    hashes: dict[Key, tuple[Any, str]] = field(default_factory=dict)  # runner -> (plan, hash)

    def shows(self, key: Key, indexed_hash: str | None, wanted: str) -> bool:
        """Whether the object at `key` already holds `wanted`, as far as the view knows."""
        recent = self.applied.get(key)
        if recent is not None and time.monotonic() - recent[1] < 60:
            return recent[0] == wanted  # our own last write is newer than the watch's view
        return indexed_hash == wanted

    def wrote(self, key: Key, content_hash: str) -> None:
        self.applied[key] = (content_hash, time.monotonic())

    def one(self, index: Mapping[Any, Any], key: Any) -> Any | None:
        """The single value of a key in a kopf index (a Store), or None."""
        store = index.get(key)
        return next(iter(store), None) if store is not None else None

    def many(self, index: Mapping[Any, Any], key: Any) -> list[Any]:
        store = index.get(key)
        return list(store) if store is not None else []

    def pricings_in(self, namespace: str) -> dict[str, PricingSpec]:
        found = {}
        for name, spec in self.many(self.pricings, namespace):
            try:
                found[name] = PricingSpec.model_validate(spec)
            except ValidationError as exc:
                log.warning("Pricing %s/%s ignored: %s", namespace, name, exc)
        return found


# --- what an AIModel asks for ---


def target_runner(body: Mapping[str, Any]) -> str:
    """The runner an AIModel belongs in, from its spec alone (valid or not)."""
    spec = body.get("spec") or {}
    group = (spec.get("gpu") or {}).get("shareGroup")
    if group:
        return L.runner_name(share_group=group)
    return L.runner_name(aimodel=body["metadata"]["name"])


def _member(body: Mapping[str, Any]) -> Member:
    model = AIModel.model_validate(body)
    meta = body["metadata"]
    return Member(
        name=meta["name"],
        uid=meta["uid"],
        spec=model.spec,
        created=meta.get("creationTimestamp") or "",
    )


def validation_message(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
    ) or str(exc)


@dataclass(frozen=True)
class RunnerOutcome:
    """One runner's plan (None: nothing wants it) and the AIModels refused from it."""

    plan: RunnerPlan | None
    refused: dict[str, str]


def plan_runner(view: View, namespace: str, runner: str) -> RunnerOutcome:
    """The runner's plan, remembered until one of its AIModels' specs changes: status
    events (pods, Deployments) ask for it far more often than specs change."""
    bodies = [
        view.one(view.aimodels, (namespace, name))
        for name in sorted(set(view.many(view.members, (namespace, runner))))
    ]
    signature = tuple(
        (
            b["metadata"]["uid"],
            b["metadata"].get("generation"),
            b["metadata"].get("deletionTimestamp"),
        )
        for b in bodies
        if b is not None
    )
    key = (namespace, runner)
    remembered = view.plans.get(key)
    if remembered is not None and remembered[0] == signature:
        return remembered[1]
    outcome = _plan_runner(namespace, [b for b in bodies if b is not None])
    view.plans[key] = (signature, outcome)
    return outcome


def _plan_runner(namespace: str, bodies: list[Mapping[str, Any]]) -> RunnerOutcome:
    members: list[Member] = []
    refused: dict[str, str] = {}
    group: str | None = None
    for body in bodies:
        name = body["metadata"]["name"]
        if body["metadata"].get("deletionTimestamp"):
            continue
        try:
            member = _member(body)
        except ValidationError as exc:  # the schema should have stopped it; say so if not
            refused[name] = validation_message(exc)
            continue
        group = member.spec.gpu.share_group
        members.append(member)
    if not members:
        return RunnerOutcome(None, refused)
    if group is None:
        return RunnerOutcome(RunnerPlan.dedicated(namespace, members[0]), refused)
    admitted, conflicts = admit_group(group, members)
    return RunnerOutcome(RunnerPlan.group(namespace, group, admitted), refused | conflicts)


# --- writing runners and table rows ---


class Writer:
    """The operator's writes; `kube.Kube` in the operator, a recorder in unit tests."""

    def apply(self, manifest: dict[str, Any]) -> None: ...
    def delete_runner(self, namespace: str, name: str) -> None: ...
    def ensure_auth_secret(self, namespace: str, settings: OperatorSettings) -> None: ...


def reconcile_runner(
    kube: Writer, settings: OperatorSettings, view: View, namespace: str, runner: str
) -> RunnerOutcome:
    """Make one runner match the AIModels that want it: create, update, delete or nothing."""
    outcome = plan_runner(view, namespace, runner)
    existing = view.one(view.runners, (namespace, runner))
    if outcome.plan is None:
        if existing is not None:
            log.info("removing runner %s/%s: no AIModel needs it any more", namespace, runner)
            kube.delete_runner(namespace, runner)
        return outcome
    wanted = runner_hash(view, settings, outcome.plan)
    if view.shows((namespace, runner), existing["hash"] if existing else None, wanted):
        return outcome
    kube.ensure_auth_secret(namespace, settings)
    for manifest in build_runner(outcome.plan, settings):
        kube.apply(manifest)
    view.wrote((namespace, runner), wanted)
    log.info(
        "%s runner %s/%s for %s",
        "updated" if existing else "created",
        namespace,
        runner,
        ", ".join(m.name for m in outcome.plan.members),
    )
    return outcome


def table_row(view: View, body: Mapping[str, Any]) -> tuple[TableRow, str | None]:
    """One AIModel's row of the price table, and why it has no price if it has none."""
    spec = AIModelSpec.model_validate(body["spec"])
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    try:
        price, problem = resolve_price(spec, view.pricings_in(namespace)), None
    except PricingProblem as exc:
        price, problem = None, str(exc)
    return TableRow(name, spec, target_runner(body), price), problem


def build_table(
    settings: OperatorSettings, body: Mapping[str, Any], row: TableRow
) -> dict[str, Any]:
    """The ConfigMap holding one AIModel's row: owned by it, so it goes when the model goes."""
    meta = body["metadata"]
    data = {
        "model.json": json.dumps(model_entry(row, settings.runner_port), sort_keys=True),
        "aiModels.json": json.dumps(ai_model_entries(row, settings.proxy_url), sort_keys=True),
    }
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": L.table_name(meta["name"]),
            "namespace": meta["namespace"],
            "labels": {L.PART_OF: "kubepeer", L.MANAGED_BY: L.MANAGER, L.TABLE: "model"},
            "annotations": {L.AIMODEL_ANNOTATION: meta["name"], L.CONTENT_HASH: content_hash(data)},
            "ownerReferences": [
                {
                    "apiVersion": body.get("apiVersion", "kubepeer.io/v1alpha1"),
                    "kind": "AIModel",
                    "name": meta["name"],
                    "uid": meta["uid"],
                    "controller": True,
                    "blockOwnerDeletion": False,
                }
            ],
        },
        "data": data,
    }


def publish_table(
    kube: Writer, settings: OperatorSettings, view: View, body: Mapping[str, Any]
) -> str | None:
    """Write the AIModel's table row if it changed; returns the pricing problem, if any.
    An AIModel whose spec is invalid gets no row (its status says why)."""
    try:
        row, problem = table_row(view, body)
    except ValidationError:
        return None
    manifest = build_table(settings, body, row)
    meta = body["metadata"]
    if (
        view.one(view.tables, (meta["namespace"], meta["name"]))
        != (manifest["metadata"]["annotations"][L.CONTENT_HASH])
    ):
        kube.apply(manifest)
    return problem


# --- status ---


def model_status(
    settings: OperatorSettings,
    view: View,
    body: Mapping[str, Any],
    outcome: RunnerOutcome | None = None,
    now: datetime | None = None,
    earnings: Earnings | None = None,
    warm: tuple[bool, str] | None = None,
) -> AIModelStatus:
    """An AIModel's status from the view: its runner's Deployment and pods, its price;
    from Redis, its last hour's earnings and (a Revenue model) its warm decision."""
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    previous = _previous_status(body)
    runner = target_runner(body)
    outcome = outcome or plan_runner(view, namespace, runner)
    invalid = outcome.refused.get(name)
    plan = outcome.plan if not invalid else None
    pricing_problem = None
    if not invalid:
        try:
            _, pricing_problem = table_row(view, body)
        except ValidationError as exc:
            invalid = validation_message(exc)
    deployment = view.one(view.runners, (namespace, runner)) if plan else None
    current = bool(plan and deployment and deployment["hash"] == runner_hash(view, settings, plan))
    observed = Observed(
        desired=plan.replicas if plan else 0,
        generation=meta.get("generation", 0),
        deployment=deployment,
        pods=view.many(view.pods, (namespace, runner)) if plan else [],
        selector=f"{L.RUNNER}={runner}" if plan else "",
        invalid=invalid,
        pricing_problem=pricing_problem,
        current=current,
        nodes_fixed=settings.nodes_fixed,
        earnings=earnings,
        warm=warm,
    )
    return compute_status(observed, previous, now or datetime.now(UTC))


def runner_hash(view: View, settings: OperatorSettings, plan: RunnerPlan) -> str:
    """The content hash of the runner a plan builds, remembered with the plan it is for."""
    key = (plan.namespace, plan.name)
    known = view.hashes.get(key)
    if known is not None and known[0] is plan:
        return known[1]
    content = build_runner(plan, settings)[-1]["metadata"]["annotations"][L.CONTENT_HASH]
    view.hashes[key] = (plan, content)
    return content


def _previous_status(body: Mapping[str, Any]) -> AIModelStatus | None:
    try:
        return AIModelStatus.model_validate(body["status"]) if body.get("status") else None
    except ValidationError:
        return None


def status_changes(body: Mapping[str, Any], status: AIModelStatus) -> dict[str, Any] | None:
    """The status to write, or None when the object already says it."""
    wire = status.to_wire()
    have = body.get("status") or {}
    return None if all(have.get(k) == v for k, v in wire.items()) else wire


def runners_of(view: View, namespace: str, name: str, body: Mapping[str, Any] | None) -> set[str]:
    """Every runner an AIModel's change may affect: where it wants to be, and where it is."""
    found = set(view.many(view.listed_in, (namespace, name)))
    if body is not None:
        found.add(target_runner(body))
    return found


def names_in(index_keys: Iterable[Key], namespace: str) -> list[str]:
    return sorted(name for ns, name in index_keys if ns == namespace)
