"""The chart as files: its CRDs and RBAC are the generated ones, `helm lint` is clean, and
values.schema.json refuses bad values naming the field. No servers (helm only)."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from kubepeer.api.crd import stale_crds
from kubepeer.controller.rbac import (
    cluster_rules,
    namespaced_rules,
    operator_rules,
    payments_rules,
    proxy_rules,
)
from kubepeer.controller.settings import OperatorSettings
from tests.conftest import REPO
from tests.e2e.charts import CHART, RECIPIENT, REQUIRED, REQUIRED_VALUES, find, helm, render, sets


def test_the_charts_crds_are_crds_byte_for_byte_and_current():
    ours = sorted(p.name for p in (REPO / "crds").glob("*.yaml"))
    chart = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert chart == ours
    for name in ours:
        assert (CHART / "crds" / name).read_bytes() == (REPO / "crds" / name).read_bytes(), name
    assert stale_crds(CHART / "crds") == []


def test_the_charts_rbac_data_is_what_kubepeer_rbac_generates():
    check = subprocess.run(
        [str(REPO / ".venv" / "bin" / "kubepeer"), "rbac", "--chart", "--check"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr


def _rules(obj: dict) -> list[dict]:
    return obj["rules"]


def test_rendered_rbac_is_kubepeer_rbac_for_each_component():
    settings = OperatorSettings()
    objects = render(*REQUIRED, namespace="kp")
    assert _rules(find(objects, "ClusterRole", "kubepeer-operator-kp")) == operator_rules(settings)
    assert _rules(find(objects, "Role", "kubepeer-proxy", "kp")) == proxy_rules()
    assert _rules(find(objects, "Role", "kubepeer-payments", "kp")) == payments_rules()
    # Each binding grants its own ServiceAccount, and each Deployment runs as that account.
    for kind, name, namespace in (
        ("ClusterRoleBinding", "kubepeer-operator-kp", None),
        ("RoleBinding", "kubepeer-proxy", "kp"),
        ("RoleBinding", "kubepeer-payments", "kp"),
    ):
        binding = find(objects, kind, name, namespace)
        account = binding["subjects"][0]["name"]
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account, "namespace": "kp"}
        ]
        deployment = find(objects, "Deployment", account, "kp")
        assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == account
    # The proxy and runners of another namespace: Roles there, accounts here.
    watched = render(*REQUIRED, "--set", "operator.watchNamespaces={models}",
                     "--set", "modelNamespace=models", namespace="kp")  # fmt: skip
    assert _rules(find(watched, "Role", "kubepeer-operator", "models")) == namespaced_rules(
        settings
    )
    assert _rules(find(watched, "ClusterRole", "kubepeer-operator-kp")) == cluster_rules(settings)
    assert _rules(find(watched, "Role", "kubepeer-proxy", "models")) == proxy_rules()
    assert [s["namespace"] for s in find(watched, "RoleBinding", "kubepeer-proxy")["subjects"]] == [
        "kp"
    ]


@pytest.mark.parametrize("values", [[], ["-f", str(CHART / "ci" / "lint-values.yaml")]])
def test_helm_lint_is_clean(values):
    result = helm("lint", "--strict", str(CHART), *values, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout, result.stdout
    assert "[ERROR]" not in result.stdout, result.stdout


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ("proxy.replicas=two", "/proxy/replicas"),  # a wrong type
        ("proxy.recipient=0x1234", "/proxy/recipient"),  # not an address
        ("payments.network=mainnet", "/payments/network"),  # not one of the networks
        ("proxy.replcas=3", "replcas"),  # a misspelt field is refused, not ignored
        ("redis.externalUrl=http://redis:6379", "/redis/externalUrl"),  # not a redis URL
        ("proxy.live.trickleUrlForRunner=proxy:8935", "/proxy/live/trickleUrlForRunner"),
        ("proxy.live.paymentIntervalSeconds=0", "/proxy/live/paymentIntervalSeconds"),
        ("proxy.tls.certManager.issuerRef.kind=Vault", "/proxy/tls/certManager/issuerRef/kind"),
    ],
)
def test_the_schema_refuses_bad_values_naming_the_field(setting, named):
    result = helm("template", "kubepeer", str(CHART), *REQUIRED, "--set", setting, check=False)
    assert result.returncode != 0
    assert "schema" in result.stderr, result.stderr
    assert named in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("drop", "named"),
    [
        ("proxy.publicUrl", "proxy.publicUrl"),
        ("proxy.recipient", "proxy.recipient"),
        ("secrets.rpcUrl.value", "secrets.rpcUrl"),
    ],
)
def test_a_missing_required_value_is_named(drop, named):
    kept = sets({k: v for k, v in REQUIRED_VALUES.items() if k != drop})
    result = helm("template", "kubepeer", str(CHART), *kept, check=False)
    assert result.returncode != 0
    assert named in result.stderr, result.stderr


def _containers(objects: list[dict]) -> list[dict]:
    return [
        c
        for o in objects
        if o["kind"] in ("Deployment", "StatefulSet")
        for c in o["spec"]["template"]["spec"]["containers"]
    ]


def test_secrets_reach_pods_as_files_never_as_args_or_literal_env():
    objects = render(*REQUIRED)
    pods = yaml.safe_dump([o for o in objects if o["kind"] in ("Deployment", "StatefulSet")])
    for secret in ("SECRET-API-KEY", "SECRET-PASSWORD", "SECRET-KEYSTORE"):
        assert secret not in pods
    rpc = find(objects, "Secret", "kubepeer-rpc")
    assert "SECRET-API-KEY" not in yaml.safe_dump(rpc)  # base64 in data, as a Secret holds it
    generated = find(objects, "Secret", "kubepeer-proxy-secrets")["data"]
    assert set(generated) == {"recipient-secret", "auth-secret", "bearer-token"}


def test_the_orchestrator_secret_reaches_the_proxy_as_a_file_when_named():
    off = find(render(*REQUIRED), "Deployment", "kubepeer-proxy")
    assert "--orch-secret-file" not in yaml.safe_dump(off)  # registration by heartbeat is off
    objects = render(*REQUIRED, "--set", "secrets.orchSecret.existingSecret=orchestrator",
                     "--set", "secrets.orchSecret.key=secret")  # fmt: skip
    proxy = find(objects, "Deployment", "kubepeer-proxy")["spec"]["template"]["spec"]
    args = proxy["containers"][0]["args"]
    path = args[args.index("--orch-secret-file") + 1]
    [mount] = [m for m in proxy["containers"][0]["volumeMounts"] if m["name"] == "orch"]
    assert path == f"{mount['mountPath']}/orch-secret"
    [volume] = [v for v in proxy["volumes"] if v["name"] == "orch"]
    assert volume["secret"] == {"secretName": "orchestrator",
                                "items": [{"key": "secret", "path": "orch-secret"}]}  # fmt: skip


def test_images_and_placement_come_from_values():
    objects = render(
        *REQUIRED,
        "--set", "images.kubepeer.repository=registry.example/kp/kubepeer",
        "--set", "images.kubepeer.tag=v9",
        "--set", "images.runner.repository=registry.example/kp/kubepeer-runner",
        "--set", "nodeSelector.pool=control",
    )  # fmt: skip
    images = {c["name"]: c["image"] for c in _containers(objects)}
    assert (
        images["operator"]
        == images["proxy"]
        == images["payments"]
        == ("registry.example/kp/kubepeer:v9")
    )
    operator = find(objects, "Deployment", "kubepeer-operator")["spec"]["template"]["spec"]
    args = operator["containers"][0]["args"]
    assert "--runner-image=registry.example/kp/kubepeer-runner:0.1.0" in args  # appVersion
    for o in objects:
        if o["kind"] in ("Deployment", "StatefulSet"):
            assert o["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "control"}


def test_runner_pods_accept_only_the_proxy():
    objects = render(*REQUIRED, "--set", "modelNamespace=models", namespace="kp")
    policy = find(objects, "NetworkPolicy", "kubepeer-runners", "models")["spec"]
    assert policy["podSelector"] == {
        "matchExpressions": [{"key": "kubepeer.io/runner", "operator": "Exists"}]
    }
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    (source,) = rule["from"]
    proxy = find(objects, "Deployment", "kubepeer-proxy", "kp")
    assert source["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "kp"}}
    selector = source["podSelector"]["matchLabels"]
    labels = proxy["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()
    others = [
        o
        for o in objects
        if o["kind"] == "Deployment" and o["metadata"]["name"] != "kubepeer-proxy"
    ]
    assert all(
        not selector.items() <= o["spec"]["template"]["metadata"]["labels"].items() for o in others
    )


def _proxy_args(objects: list[dict]) -> list[str]:
    return find(objects, "Deployment", "kubepeer-proxy")["spec"]["template"]["spec"]["containers"][
        0
    ]["args"]


def test_the_proxys_live_video_flags_come_from_values():
    defaults = _proxy_args(render(*REQUIRED))
    assert "--live-payment-interval=5" in defaults
    assert "--live-lease-seconds=30" in defaults
    assert not [a for a in defaults if a.startswith(("--trickle-url-for-runner", "--offchain"))]
    runner_url = "https://kubepeer-proxy.kubepeer-system.svc:8935"
    paid = _proxy_args(render(
        *REQUIRED, "--set", f"proxy.live.trickleUrlForRunner={runner_url}",
        "--set-json", "proxy.live.paymentIntervalSeconds=2.5",
        "--set", "proxy.live.leaseSeconds=60",
    ))  # fmt: skip
    assert f"--trickle-url-for-runner={runner_url}" in paid
    assert "--live-payment-interval=2.5" in paid
    assert "--live-lease-seconds=60" in paid
    private = _proxy_args(render(
        *REQUIRED, "--set", "proxy.payments=false", "--set", "proxy.live.offchainGateways=true",
    ))  # fmt: skip
    assert "--offchain-gateways" in private
    assert "--no-payments" in private
    # Discovery's address (gateway-wire 1.5): the recipient if set, else the proxy's zero.
    assert f"--recipient={RECIPIENT}" in private
    unnamed = _proxy_args(render(
        *REQUIRED, "--set", "proxy.payments=false", "--set", "proxy.recipient=",
    ))  # fmt: skip
    assert not [a for a in unnamed if a.startswith("--recipient")]
    # The proxy's own parser accepts what the chart passes (the flags exist, values parse;
    # the Redis URL comes from the pod's env).
    from kubepeer.cli import build_parser

    extra = ["--trickle-url-for-runner", runner_url, "--redis-url", "redis://redis:6379"]
    parsed = build_parser().parse_args(private + extra)
    assert parsed.offchain_gateways is True
    assert parsed.trickle_url_for_runner == runner_url
    assert parsed.live_payment_interval == 5.0


def test_offchain_gateways_with_payments_on_is_refused_naming_the_value():
    result = helm("template", "kubepeer", str(CHART), *REQUIRED,
                  "--set", "proxy.live.offchainGateways=true", check=False)  # fmt: skip
    assert result.returncode != 0
    assert "proxy.live.offchainGateways" in result.stderr, result.stderr


def test_the_proxys_metrics_are_kept_off_the_gateway_facing_port():
    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    objects = render(*REQUIRED, "--set", "serviceMonitor.enabled=true",
                     "--set-json", f"networkPolicy.metricsFrom=[{json.dumps(peer)}]")  # fmt: skip
    public = find(objects, "Service", "kubepeer-proxy")
    assert [p["name"] for p in public["spec"]["ports"]] == ["orchestrator"]
    metrics = find(objects, "Service", "kubepeer-proxy-metrics")
    assert metrics["spec"]["clusterIP"] == "None"
    assert [(p["name"], p["port"]) for p in metrics["spec"]["ports"]] == [("metrics", 9101)]
    assert "--metrics-port=9101" in _proxy_args(objects)
    monitor = find(objects, "ServiceMonitor", "kubepeer-proxy")
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    # Anyone reaches the orchestrator port; only the namespace and the listed peers the
    # metrics port.
    policy = find(objects, "NetworkPolicy", "kubepeer-proxy")
    rules = {rule["ports"][0]["port"]: rule.get("from") for rule in policy["spec"]["ingress"]}
    assert rules == {"orchestrator": None, "metrics": [{"podSelector": {}}, peer]}
    from kubepeer.cli import build_parser

    parsed = build_parser().parse_args([*_proxy_args(objects), "--redis-url", "redis://r:6379"])
    assert parsed.metrics_port == 9101


# values.yaml key under `proxy` -> ProxySettings field, each a default written in both places
# only because Helm needs its own: they must say the same.
PROXY_DEFAULTS = {
    "maxQueue": "max_queue", "queueTimeoutSeconds": "queue_timeout",
    "holdTimeoutSeconds": "hold_timeout", "gasPrice": "gas_price", "payments": "payments",
    "live.paymentIntervalSeconds": "live_payment_interval",
    "live.leaseSeconds": "live_lease_seconds", "live.offchainGateways": "offchain_gateways",
}  # fmt: skip


def test_the_charts_proxy_defaults_are_the_proxys_own():
    from kubepeer.proxy.settings import ProxySettings

    values = yaml.safe_load((CHART / "values.yaml").read_text())["proxy"]
    for key, field in PROXY_DEFAULTS.items():
        value = values
        for part in key.split("."):
            value = value[part]
        assert value == ProxySettings.model_fields[field].default, (key, value)
    # The one default the chart changes on purpose: metrics on, on their own port.
    assert ProxySettings.model_fields["metrics_port"].default == 0
    assert values["metricsPort"] == 9101
    # And what the chart passes makes valid settings.
    from kubepeer.cli import build_parser

    args = build_parser().parse_args(
        [*_proxy_args(render(*REQUIRED)), "--redis-url", "redis://r:6379"]
    )
    settings = args.settings(args)
    assert (settings.max_queue, settings.metrics_port, settings.payments) == (8, 9101, True)


def _proxy_tls(objects: list[dict]) -> tuple[list[str], list[str]]:
    """The proxy's TLS flags, and the Secret its tls volume mounts (if any)."""
    pod = find(objects, "Deployment", "kubepeer-proxy")["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    flags = [a for a in args if a.startswith("--tls") or a.startswith("/var/run/kubepeer/tls")]
    secrets = [v["secret"]["secretName"] for v in pod["volumes"] if v["name"] == "tls"]
    return flags, secrets


def test_cert_manager_issues_the_proxys_certificate_for_its_public_host():
    """Issue 26, item 6: a certificate a verifying client accepts (tests/proxy/test_tls.py
    checks the proxy serves it, and its renewals, to a client trusting only its CA)."""
    issuer = ["--set", "proxy.tls.certManager.enabled=true",
              "--set", "proxy.tls.certManager.issuerRef.name=letsencrypt"]  # fmt: skip
    objects = render(*REQUIRED, *issuer)
    certificate = find(objects, "Certificate", "kubepeer-proxy")
    assert certificate["apiVersion"] == "cert-manager.io/v1"
    spec = certificate["spec"]
    assert spec["secretName"] == "kubepeer-proxy-tls"
    assert spec["dnsNames"] == ["orchestrator.example.com"]  # publicUrl's host, no port
    assert "ipAddresses" not in spec
    assert spec["issuerRef"] == {"name": "letsencrypt", "kind": "ClusterIssuer",
                                 "group": "cert-manager.io"}  # fmt: skip
    assert spec["privateKey"]["rotationPolicy"] == "Always"
    flags, secrets = _proxy_tls(objects)
    assert flags == ["--tls-cert", "/var/run/kubepeer/tls/tls.crt",
                     "--tls-key", "/var/run/kubepeer/tls/tls.key"]  # fmt: skip
    assert secrets == ["kubepeer-proxy-tls"]

    by_ip = render(*REQUIRED, *issuer, "--set", "proxy.publicUrl=https://203.0.113.7:8935",
                   "--set", "proxy.tls.secretName=orchestrator-tls")  # fmt: skip
    spec = find(by_ip, "Certificate", "kubepeer-proxy")["spec"]
    assert (spec["ipAddresses"], "dnsNames" in spec) == (["203.0.113.7"], False)
    assert spec["secretName"] == "orchestrator-tls" == _proxy_tls(by_ip)[1][0]

    by_ipv6 = render(*REQUIRED, *issuer, "--set", "proxy.publicUrl=https://[2001:db8::1]:8935")
    assert find(by_ipv6, "Certificate", "kubepeer-proxy")["spec"]["ipAddresses"] == ["2001:db8::1"]

    unnamed = helm("template", "kubepeer", str(CHART), *REQUIRED,
                   "--set", "proxy.tls.certManager.enabled=true", check=False)  # fmt: skip
    assert unnamed.returncode != 0
    assert "proxy.tls.certManager.issuerRef.name" in unnamed.stderr
    plaintext = render(*REQUIRED, *issuer, "--set", "proxy.tls.plaintext=true")
    assert not [o for o in plaintext if o["kind"] == "Certificate"]
    assert _proxy_tls(plaintext) == ([], [])
    self_signed = render(*REQUIRED)  # the default: no Secret, a certificate per pod
    assert not [o for o in self_signed if o["kind"] == "Certificate"]
    assert _proxy_tls(self_signed) == ([], [])
