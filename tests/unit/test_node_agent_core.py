"""The node agent's kubelet decisions (kubepeer_dev.node_agent.core), checked against what the
Kubernetes documentation says a kubelet does."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kubepeer_dev.node_agent.core import (
    ContainerView,
    EnvSources,
    PodSpecError,
    ProbeSpec,
    ProbeState,
    backoff_seconds,
    container_argv,
    expand,
    mount_table,
    pod_phase,
    pod_status,
    resolve_env,
    rewrite_path,
)
from kubepeer_dev.node_agent.images import build_image, command_for, image_repository, image_table

POD = {
    "metadata": {"name": "p", "namespace": "ns", "uid": "u1", "labels": {"app": "x"}},
    "spec": {"nodeName": "agent-0"},
}


def sources(secrets=None, config_maps=None) -> EnvSources:
    secrets = secrets or {}
    config_maps = config_maps or {}
    return EnvSources(
        pod=POD,
        pod_ip="10.244.0.2",
        host_ip="10.244.0.1",
        secret=secrets.get,
        config_map=config_maps.get,
    )


def test_env_resolves_literals_refs_and_envfrom_in_kubelet_order():
    container = {
        "envFrom": [
            {"configMapRef": {"name": "cm"}, "prefix": "CM_"},
            {"secretRef": {"name": "s"}},
        ],
        "env": [
            {"name": "A", "value": "a"},
            {"name": "B", "value": "$(A)-$(NOPE)-$$(A)"},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "token"}}},
            {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "mode"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "token", "value": "overrides envFrom"},
        ],
    }
    env = resolve_env(container, sources({"s": {"token": "t0k"}}, {"cm": {"mode": "fast"}}))
    assert env == {
        "CM_mode": "fast",
        "token": "overrides envFrom",
        "A": "a",
        "B": "a-$(NOPE)-$(A)",
        "TOKEN": "t0k",
        "MODE": "fast",
        "IP": "10.244.0.2",
        "NS": "ns",
        "APP": "x",
    }


def test_missing_secret_names_the_variable_and_the_secret_unless_optional():
    ref = {"name": "T", "valueFrom": {"secretKeyRef": {"name": "gone", "key": "k"}}}
    with pytest.raises(PodSpecError, match=r"env\[T\]: Secret 'gone' not found"):
        resolve_env({"env": [ref]}, sources())
    ref["valueFrom"]["secretKeyRef"]["optional"] = True
    assert resolve_env({"env": [ref]}, sources()) == {}


def test_dollar_escape_and_unknown_references_stay():
    assert expand("$(X)$$(X)$(Y)", {"X": "1"}) == "1$(X)$(Y)"


def test_mount_paths_rewrite_to_host_dirs_longest_first():
    table = mount_table(
        {
            "volumeMounts": [
                {"name": "m", "mountPath": "/models"},
                {"name": "c", "mountPath": "/models/cfg/"},
            ]
        },
        {"m": "/host/m", "c": "/host/c"},
    )
    assert rewrite_path("/models", table) == "/host/m"
    assert rewrite_path("/models/x/y", table) == "/host/m/x/y"
    assert rewrite_path("/models/cfg/a", table) == "/host/c/a"
    assert rewrite_path("/modelsX", table) == "/modelsX"
    with pytest.raises(PodSpecError, match="volumeMounts\\[nope\\]"):
        mount_table({"volumeMounts": [{"name": "nope", "mountPath": "/x"}]}, {})


def test_probe_thresholds_count_consecutive_results():
    state = ProbeState(ProbeSpec(path="/", port=1, success_threshold=2, failure_threshold=3))
    assert not state.record(True)
    assert not state.passing
    assert state.record(True)
    assert state.passing
    state.record(False)
    state.record(False)
    assert state.passing
    assert not state.failed
    assert state.record(False)
    assert not state.passing
    assert state.failed


def test_named_probe_port_resolves_and_unknown_is_refused():
    probe = {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5}
    assert ProbeSpec.from_wire(probe, {"http": 8000}).port == 8000
    with pytest.raises(PodSpecError, match="'http'"):
        ProbeSpec.from_wire(probe, {})
    with pytest.raises(PodSpecError, match="httpGet"):
        ProbeSpec.from_wire({"exec": {"command": ["true"]}}, {})


def test_backoff_doubles_from_ten_seconds_to_five_minutes():
    assert [backoff_seconds(n) for n in range(7)] == [0, 10, 20, 40, 80, 160, 300]


def test_phase_and_ready_conditions_follow_the_containers():
    running = ContainerView("c", "i", state={"running": {}}, ready=True)
    waiting = ContainerView(
        "d", "i", state={"waiting": {"reason": "CrashLoopBackOff"}}, restart_count=2
    )
    assert pod_phase("Always", [running]) == "Running"
    assert pod_phase("Always", [waiting]) == "Running"
    assert pod_phase("Always", [ContainerView("e", "i")]) == "Pending"
    done = ContainerView("f", "i", state={"terminated": {"exitCode": 0}})
    failed = ContainerView("g", "i", state={"terminated": {"exitCode": 1}})
    assert pod_phase("Never", [done]) == "Succeeded"
    assert pod_phase("Never", [done, failed]) == "Failed"

    first = pod_status(
        restart_policy="Always", views=[running, waiting], pod_ip="10.244.0.2",
        host_ip="10.244.0.1", start_time="t0", now="t1", previous_conditions=[],
    )  # fmt: skip
    cond = {c["type"]: c for c in first["conditions"]}
    assert cond["Ready"]["status"] == cond["ContainersReady"]["status"] == "False"
    assert first["podIPs"] == [{"ip": "10.244.0.2"}]
    later = pod_status(
        restart_policy="Always", views=[running, waiting], pod_ip="10.244.0.2",
        host_ip="10.244.0.1", start_time="t0", now="t2", previous_conditions=first["conditions"],
    )  # fmt: skip
    assert {c["type"]: c["lastTransitionTime"] for c in later["conditions"]}["Ready"] == "t1"


def test_images_map_by_repository_name_and_unmapped_is_none(tmp_path):
    table = image_table(tmp_path / "bin")
    assert image_repository("ghcr.io/x/kubepeer-runner:v1@sha256:ab") == "kubepeer-runner"
    argv, env = command_for(table, "example.invalid/kubepeer-runner:test", None, None)
    assert argv == [str(tmp_path / "bin" / "kubepeer-runner")]  # the installed entry point
    assert "PYTHONPATH" not in env
    argv, _ = command_for(table, "registry.example/kubepeer:dev", None, ["proxy", "--plaintext"])
    assert argv == [str(tmp_path / "bin" / "kubepeer"), "proxy", "--plaintext"]
    argv, _ = command_for(table, "python:3.12", ["python", "-c", "print(1)"], None)
    assert argv == ["python", "-c", "print(1)"]
    assert command_for(table, "nginx:latest", None, None) is None


def test_the_images_own_entrypoint_is_never_taken_for_a_container_path():
    """A cache under /tmp (KUBEPEER_CACHE=/tmp/...) put the image's binary under a pod's
    /tmp emptyDir mount, and the agent ran a path inside the volume: `not found`."""
    mounts = {"/tmp": "/var/pods/p1/volumes/tmp", "/etc/cfg": "/var/pods/p1/volumes/cfg"}
    argv = ["/tmp/cache/images/k/bin/kubepeer", "payments", "--config", "/etc/cfg/$(NAME)"]
    assert container_argv(argv, 1, {"NAME": "a.yaml"}, mounts) == [
        "/tmp/cache/images/k/bin/kubepeer", "payments",
        "--config", "/var/pods/p1/volumes/cfg/a.yaml",
    ]  # fmt: skip
    # A pod's own command is the container's: rewritten like any other word.
    assert container_argv(["/tmp/run.sh"], 0, {}, mounts) == ["/var/pods/p1/volumes/tmp/run.sh"]


def test_a_built_image_outlives_the_checkout_that_built_it(tmp_path):
    """hack/setup links each checkout's .venv to one shared environment in the cache, so two
    clones of the same sources share a built image. The image must name that environment,
    not a path through whichever clone built it first: CI once ran pods whose image pointed
    into a deleted clone, and every kubepeer process died on `import kopf`."""
    cache = Path(os.environ.get("KUBEPEER_CACHE", Path.home() / ".cache" / "kubepeer"))
    uvs = sorted(cache.glob("tools/uv-*/bin/uv"))
    assert uvs, f"no uv under {cache}/tools: run `make setup`"
    work = tmp_path / "cache"
    work.mkdir()
    (work / "uv-cache").symlink_to(cache / "uv-cache")
    shared = tmp_path / "shared-venv"  # what hack/setup keeps in the cache
    uv = str(uvs[-1])
    subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(shared)], check=True)
    site = next(shared.glob("lib/python*/site-packages"))
    (site / "locked_dep.py").write_text("OK = 1\n")
    # The build backend, as hack/setup's environment has it (locked in uv.lock).
    import hatchling

    (site / "build-backend.pth").write_text(f"{Path(hatchling.__file__).parents[1]}\n")

    def checkout(name: str) -> Path:
        repo = tmp_path / name
        (repo / "operator" / "kubepeer").mkdir(parents=True)
        (repo / "operator" / "kubepeer" / "__init__.py").write_text("")
        (repo / "pyproject.toml").write_text(
            '[project]\nname = "kubepeer"\nversion = "0.0.1"\n'
            '[build-system]\nrequires = ["hatchling>=1.25"]\nbuild-backend = "hatchling.build"\n'
            '[tool.hatch.build.targets.wheel]\npackages = ["operator/kubepeer"]\n'
        )
        (repo / ".venv").symlink_to(shared)
        return repo

    def imports(image_bin: Path) -> subprocess.CompletedProcess:
        code = "import kubepeer, locked_dep; print(locked_dep.OK)"
        python = str(image_bin / "python")
        return subprocess.run([python, "-c", code], capture_output=True, text=True)

    first = checkout("clone-a")
    built = build_image(first, work, Path(uv))
    assert imports(built).stdout == "1\n", imports(built).stderr
    shutil.rmtree(first)
    again = build_image(checkout("clone-b"), work, Path(uv))
    assert again == built  # the same sources and environment: the same image, reused
    assert imports(again).stdout == "1\n", imports(again).stderr

    # An image built before this fix names a clone that is gone: it is built again.
    pth = next(built.parent.glob("lib/python*/site-packages/kubepeer-locked-deps.pth"))
    pth.write_text(f"{first}/.venv/lib/site-packages\n")
    assert imports(built).returncode != 0
    rebuilt = build_image(tmp_path / "clone-b", work, Path(uv))
    assert imports(rebuilt).stdout == "1\n", imports(rebuilt).stderr


def test_volumes_become_files_like_a_kubelet_lays_them_out(tmp_path):
    from kubepeer_dev.node_agent.volumes import materialise

    ca_item = [{"key": "ca.crt", "path": "ca.crt"}]
    a_item = [{"key": "a", "path": "x/a"}]
    ns_item = [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]
    pod = {
        "metadata": {"name": "p", "namespace": "ns"},
        "spec": {
            "volumes": [
                {"name": "scratch", "emptyDir": {}},
                {"name": "models", "hostPath": {"path": "/srv/models"}},
                {"name": "weights", "persistentVolumeClaim": {"claimName": "w"}},
                {"name": "cfg", "configMap": {"name": "cm", "items": a_item}},
                {"name": "creds", "secret": {"secretName": "s"}},
                {
                    "name": "kube-api-access",
                    "projected": {
                        "sources": [
                            {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
                            {"configMap": {"name": "kube-root-ca.crt", "items": ca_item}},
                            {"downwardAPI": {"items": ns_item}},
                        ]
                    },
                },
            ]
        },
    }  # fmt: skip
    config_maps = {"cm": {"a": "A", "b": "B"}, "kube-root-ca.crt": {"ca.crt": "PEM"}}
    asked: list = []
    dirs = materialise(
        pod,
        tmp_path,
        secret={"s": {"user": "u"}}.get,
        config_map=config_maps.get,
        token=lambda aud, secs: asked.append((aud, secs)) or "jwt",
        claim={"w": "/srv/weights"}.get,
    )
    assert dirs["models"] == "/srv/models"
    assert dirs["weights"] == "/srv/weights"  # the bound PersistentVolume's host path
    assert (tmp_path / "volumes" / "scratch").is_dir()
    assert (tmp_path / "volumes" / "cfg" / "x" / "a").read_text() == "A"
    assert not (tmp_path / "volumes" / "cfg" / "b").exists()  # items select keys
    assert (tmp_path / "volumes" / "creds" / "user").read_text() == "u"
    sa = tmp_path / "volumes" / "kube-api-access"
    assert [(sa / f).read_text() for f in ("token", "ca.crt", "namespace")] == ["jwt", "PEM", "ns"]
    assert asked == [(None, 3607)]


def test_unsupported_or_missing_volumes_are_refused_with_the_volume_named(tmp_path):
    from kubepeer_dev.node_agent.volumes import materialise

    def pod(vol):
        return {"metadata": {"name": "p", "namespace": "ns"}, "spec": {"volumes": [vol]}}

    kwargs = {"secret": {}.get, "config_map": {}.get, "token": lambda a, s: ""}
    with pytest.raises(PodSpecError, match="volume 'data': PersistentVolumeClaim 'x' is not bound"):
        materialise(
            pod({"name": "data", "persistentVolumeClaim": {"claimName": "x"}}), tmp_path, **kwargs
        )
    with pytest.raises(PodSpecError, match="volume 'share': nfs is not supported"):
        materialise(pod({"name": "share", "nfs": {"server": "s", "path": "/"}}), tmp_path, **kwargs)
    with pytest.raises(PodSpecError, match="volume 'c': Secret 'gone' not found"):
        materialise(pod({"name": "c", "secret": {"secretName": "gone"}}), tmp_path, **kwargs)
