"""The operator's and the proxy's least-privilege RBAC, as data: their roles, and what
binds them.

Tests run the operator under exactly these rules (tests/cluster/test_rbac.py), so a
rule missing here fails there, and nothing beyond them is granted.
"""

from __future__ import annotations

from typing import Any

from kubepeer.api import GROUP
from kubepeer.controller.settings import OperatorSettings

READ = ["get", "list", "watch"]
RBAC = "rbac.authorization.k8s.io"
NAME = "kubepeer-operator"
PROXY = "kubepeer-proxy"
PAYMENTS = "kubepeer-payments"


def namespaced_rules(settings: OperatorSettings) -> list[dict[str, Any]]:
    """What the operator does inside a namespace it manages."""
    return [
        # The resources it serves: it reads them, writes status, and scales idle models.
        {
            "apiGroups": [GROUP],
            "resources": ["aimodels", "liverunners", "pricings"],
            "verbs": READ,
        },
        {"apiGroups": [GROUP], "resources": ["aimodels", "liverunners"], "verbs": ["patch"]},
        {
            "apiGroups": [GROUP],
            "resources": ["aimodels/status", "liverunners/status"],
            "verbs": ["get", "patch"],
        },
        # Owner references with blockOwnerDeletion need this where
        # OwnerReferencesPermissionEnforcement is on.
        {
            "apiGroups": [GROUP],
            "resources": ["aimodels/finalizers", "liverunners/finalizers"],
            "verbs": ["update"],
        },
        {
            "apiGroups": ["kopf.dev"],
            "resources": ["kopfpeerings"],
            "verbs": [*READ, "create", "patch"],
        },
        # Runners and their table rows: watched (indices), server-side applied, removed.
        {
            "apiGroups": ["apps"],
            "resources": ["deployments"],
            "verbs": [*READ, "create", "patch", "delete"],
        },
        {
            "apiGroups": [""],
            "resources": ["services"],
            "verbs": ["get", "create", "patch", "delete"],
        },
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": [*READ, "create", "patch"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
        # The runners' auth token: created once, never read back (a 409 says it exists),
        # so the operator can neither read a Secret nor mint a readable token.
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
        # External orchestrators' -orchSecret (LiveRunner registerWith): read only by these
        # names, which the operator's settings list; any other Secret stays unreadable.
        *_orchestrator_secrets(settings),
        {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
    ]


def _orchestrator_secrets(settings: OperatorSettings) -> list[dict[str, Any]]:
    if not settings.orchestrator_secrets:
        return []
    return [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"],
             "resourceNames": list(settings.orchestrator_secrets)}]  # fmt: skip


def cluster_rules(settings: OperatorSettings) -> list[dict[str, Any]]:
    """What only exists cluster-wide: PriorityClasses, and kopf's view of CRDs and namespaces."""
    return [
        # kopf observes namespaces (their names) even when given a fixed list.
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": READ},
        {
            "apiGroups": ["apiextensions.k8s.io"],
            "resources": ["customresourcedefinitions"],
            "verbs": READ,
        },
        # A registered replica's GPU, from its node's GPU feature discovery labels.
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]},
        # Create cannot be limited by name; get and patch are.
        {"apiGroups": ["scheduling.k8s.io"], "resources": ["priorityclasses"], "verbs": ["create"]},
        {
            "apiGroups": ["scheduling.k8s.io"],
            "resources": ["priorityclasses"],
            "resourceNames": [settings.warm_priority_class, settings.cold_priority_class],
            "verbs": ["get", "patch"],
        },
    ]


# kopf's peering when it watches every namespace.
CLUSTER_PEERING = {
    "apiGroups": ["kopf.dev"],
    "resources": ["clusterkopfpeerings"],
    "verbs": [*READ, "create", "patch"],
}


def operator_rules(settings: OperatorSettings) -> list[dict[str, Any]]:
    """Every rule, for the cluster-wide operator (one ClusterRole)."""
    return [*namespaced_rules(settings), CLUSTER_PEERING, *cluster_rules(settings)]


def _binding(
    kind: str, name: str, role_kind: str, subject: dict[str, str], **meta: Any
) -> dict[str, Any]:
    return {
        "apiVersion": f"{RBAC}/v1",
        "kind": kind,
        "metadata": {"name": name, **meta},
        "roleRef": {"apiGroup": RBAC, "kind": role_kind, "name": name},
        "subjects": [subject],
    }


def operator_rbac(
    settings: OperatorSettings, namespace: str, service_account: str = NAME
) -> list[dict[str, Any]]:
    """The ServiceAccount and its grants. Watching given namespaces (`settings.namespaces`),
    a Role and RoleBinding in each of them, and a ClusterRole for cluster-scoped objects
    only; watching all, one ClusterRole for everything."""
    labels = {"app.kubernetes.io/part-of": "kubepeer", "app.kubernetes.io/name": NAME}
    subject = {"kind": "ServiceAccount", "name": service_account, "namespace": namespace}
    account = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": service_account, "namespace": namespace, "labels": labels},
    }
    if not settings.namespaces:
        return [
            account,
            {"apiVersion": f"{RBAC}/v1", "kind": "ClusterRole",
             "metadata": {"name": NAME, "labels": labels}, "rules": operator_rules(settings)},
            _binding("ClusterRoleBinding", NAME, "ClusterRole", subject, labels=labels),
        ]  # fmt: skip
    objects = [
        account,
        {"apiVersion": f"{RBAC}/v1", "kind": "ClusterRole",
         "metadata": {"name": NAME, "labels": labels}, "rules": cluster_rules(settings)},
        _binding("ClusterRoleBinding", NAME, "ClusterRole", subject, labels=labels),
    ]  # fmt: skip
    for watched in settings.namespaces:
        objects.append(
            {"apiVersion": f"{RBAC}/v1", "kind": "Role",
             "metadata": {"name": NAME, "namespace": watched, "labels": labels},
             "rules": namespaced_rules(settings)}
        )  # fmt: skip
        objects.append(
            _binding("RoleBinding", NAME, "Role", subject, namespace=watched, labels=labels)
        )
    return objects


def proxy_rules() -> list[dict[str, Any]]:
    """What `kubepeer proxy` does in its namespace: watch runner and app endpoints and the
    operator's table ConfigMaps, and wake an OnDemand AIModel or LiveRunner (get, patch)."""
    return [
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
         "verbs": ["list", "watch"]},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list", "watch"]},
        {"apiGroups": [GROUP], "resources": ["aimodels", "liverunners"],
         "verbs": ["get", "patch"]},
    ]  # fmt: skip


def _role_rbac(
    name: str, namespace: str, rules: list[dict[str, Any]], service_account: str
) -> list[dict[str, Any]]:
    """A ServiceAccount, and a Role and RoleBinding granting it `rules` in its namespace."""
    labels = {"app.kubernetes.io/part-of": "kubepeer", "app.kubernetes.io/name": name}
    subject = {"kind": "ServiceAccount", "name": service_account, "namespace": namespace}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": service_account, "namespace": namespace, "labels": labels}},
        {"apiVersion": f"{RBAC}/v1", "kind": "Role",
         "metadata": {"name": name, "namespace": namespace, "labels": labels}, "rules": rules},
        _binding("RoleBinding", name, "Role", subject, namespace=namespace, labels=labels),
    ]  # fmt: skip


def proxy_rbac(namespace: str, service_account: str = PROXY) -> list[dict[str, Any]]:
    """The proxy's ServiceAccount, and a Role and RoleBinding in the namespace it serves."""
    return _role_rbac(PROXY, namespace, proxy_rules(), service_account)


def payments_rules() -> list[dict[str, Any]]:
    """What `kubepeer payments --lease-namespace NS` does there: hold the redeemer's Lease
    (read it, create it once, renew or take it over by update). Its name carries the
    recipient address, so it cannot be narrowed by resourceNames before it exists."""
    return [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
         "verbs": ["get", "create", "update"]},
    ]  # fmt: skip


def payments_rbac(namespace: str, service_account: str = PAYMENTS) -> list[dict[str, Any]]:
    """The payments process's ServiceAccount, and a Role and RoleBinding for its Lease."""
    return _role_rbac(PAYMENTS, namespace, payments_rules(), service_account)


def chart_data(settings: OperatorSettings) -> dict[str, Any]:
    """What the Helm chart renders its RBAC and PriorityClasses from
    (helm/kubepeer/files/generated.yaml, written by `kubepeer rbac --chart`): the same
    rules as above, so the chart and `kubepeer rbac` cannot disagree."""
    from kubepeer.controller.builders import build_priority_classes

    return {
        "operator": {
            "namespaced": namespaced_rules(settings),
            "clusterPeering": CLUSTER_PEERING,
            "cluster": cluster_rules(settings),
        },
        "proxy": proxy_rules(),
        "payments": payments_rules(),
        "priorityClasses": build_priority_classes(settings),
    }
