"""The operator's least-privilege RBAC, as data: one ClusterRole, and what binds it.

Tests run the operator under exactly these rules (tests/cluster/test_rbac.py), so a
rule missing here fails there, and nothing beyond them is granted.
"""

from __future__ import annotations

from typing import Any

from kubepeer.api import GROUP
from kubepeer.controller.settings import OperatorSettings

READ = ["get", "list", "watch"]


def operator_rules(settings: OperatorSettings) -> list[dict[str, Any]]:
    return [
        # The resources it serves: kopf patches annotations, finalizers and status.
        {"apiGroups": [GROUP], "resources": ["aimodels", "pricings"], "verbs": [*READ, "patch"]},
        {"apiGroups": [GROUP], "resources": ["aimodels/status"], "verbs": ["get", "patch"]},
        {"apiGroups": [GROUP], "resources": ["aimodels/scale"], "verbs": ["get", "patch"]},
        # Peering between replicas, and kopf's view of what resources exist.
        {
            "apiGroups": ["kopf.dev"],
            "resources": ["clusterkopfpeerings", "kopfpeerings"],
            "verbs": [*READ, "create", "patch"],
        },
        {
            "apiGroups": ["apiextensions.k8s.io"],
            "resources": ["customresourcedefinitions"],
            "verbs": READ,
        },
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": READ},
        # Runners: server-side apply patches, and creates what does not exist yet.
        {
            "apiGroups": ["apps"],
            "resources": ["deployments"],
            "verbs": [*READ, "create", "patch", "delete"],
        },
        {
            "apiGroups": [""],
            "resources": ["services"],
            "verbs": ["get", "list", "create", "patch", "delete"],
        },
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "create", "patch"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
        # The runners' auth token: made once; only that Secret may be read.
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": [settings.auth_secret],
            "verbs": ["get"],
        },
        {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
        # Create cannot be limited by name; get and patch are.
        {"apiGroups": ["scheduling.k8s.io"], "resources": ["priorityclasses"], "verbs": ["create"]},
        {
            "apiGroups": ["scheduling.k8s.io"],
            "resources": ["priorityclasses"],
            "resourceNames": [settings.warm_priority_class, settings.cold_priority_class],
            "verbs": ["get", "patch"],
        },
    ]


def operator_rbac(
    settings: OperatorSettings, namespace: str, service_account: str = "kubepeer-operator"
) -> list[dict[str, Any]]:
    name = "kubepeer-operator"
    labels = {"app.kubernetes.io/part-of": "kubepeer", "app.kubernetes.io/name": name}
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": service_account, "namespace": namespace, "labels": labels},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": name, "labels": labels},
            "rules": operator_rules(settings),
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": name, "labels": labels},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": name,
            },
            "subjects": [
                {"kind": "ServiceAccount", "name": service_account, "namespace": namespace}
            ],
        },
    ]
