"""`helm template` of the chart, with every optional object on, is accepted by the real API
server (a server-side dry run: schemas, defaults and admission, nothing stored)."""

from __future__ import annotations

import uuid

import pytest

from tests.e2e.charts import CHART, REQUIRED, helm

pytestmark = pytest.mark.cluster


def test_every_rendered_object_passes_a_server_side_dry_run(crds):
    suffix = uuid.uuid4().hex[:6]
    release_ns, models_ns = f"kubepeer-{suffix}", f"models-{suffix}"
    for namespace in (release_ns, models_ns):
        crds.kubectl("create", "namespace", namespace)
    try:
        rendered = helm(
            "template", "kubepeer", str(CHART), "--namespace", release_ns, *REQUIRED,
            "-f", str(CHART / "ci" / "lint-values.yaml"),
            "--set", f"modelNamespace={models_ns}",
            "--set", f"operator.watchNamespaces={{{models_ns}}}",
            # The ServiceMonitor and Certificate CRDs belong to the Prometheus Operator and
            # cert-manager, not this cluster (test_chart_render.py reads the Certificate).
            "--set", "serviceMonitor.enabled=false",
            "--set", "proxy.tls.certManager.enabled=false",
        ).stdout  # fmt: skip
        applied = crds.kubectl("apply", "--dry-run=server", "-f", "-", stdin=rendered)
        kinds = {line.split("/")[0] for line in applied.stdout.splitlines()}
        for kind in ("deployment.apps", "statefulset.apps", "ingress.networking.k8s.io",
                     "horizontalpodautoscaler.autoscaling", "networkpolicy.networking.k8s.io",
                     "poddisruptionbudget.policy", "role.rbac.authorization.k8s.io",
                     "clusterrole.rbac.authorization.k8s.io", "secret", "service"):  # fmt: skip
            assert kind in kinds, applied.stdout
        assert "(server dry run)" in applied.stdout
    finally:
        for namespace in (release_ns, models_ns):
            crds.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
