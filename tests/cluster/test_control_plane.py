"""The test cluster is a real one: scheduler, controller-manager and API server at work."""

from __future__ import annotations

import pytest
from kubernetes import client

from tests.conftest import GPUS_PER_NODE
from tests.support import wait_for

pytestmark = pytest.mark.cluster


def gpu_container(gpus: int) -> client.V1Container:
    return client.V1Container(
        name="runner",
        image="example.invalid/runner:test",
        resources=client.V1ResourceRequirements(limits={"nvidia.com/gpu": str(gpus)}),
    )


def gpu_deployment(name: str, gpus: int) -> client.V1Deployment:
    labels = {"app": name}
    return client.V1Deployment(
        metadata=client.V1ObjectMeta(name=name, labels=labels),
        spec=client.V1DeploymentSpec(
            replicas=1,
            selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=client.V1PodSpec(containers=[gpu_container(gpus)]),
            ),
        ),
    )


def pods_of(core: client.CoreV1Api, namespace: str, app: str) -> list[client.V1Pod]:
    return core.list_namespaced_pod(namespace, label_selector=f"app={app}").items


def test_gpu_pod_is_scheduled_onto_a_gpu_node_and_runs(api, namespace):
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    apps.create_namespaced_deployment(namespace, gpu_deployment("one-gpu", gpus=1))

    def running_pod() -> client.V1Pod | None:
        pods = [p for p in pods_of(core, namespace, "one-gpu") if p.status.phase == "Running"]
        return pods[0] if pods else None

    pod = wait_for(running_pod, timeout=60, what="the GPU pod to be Running")
    node = core.read_node(pod.spec.node_name)
    assert node.metadata.labels["nvidia.com/gpu.present"] == "true"
    assert int(node.status.allocatable["nvidia.com/gpu"]) >= 1
    # The scheduler, not the test, bound it: the binding is recorded as an event.
    events = core.list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={pod.metadata.name}"
    )
    assert any(e.reason == "Scheduled" for e in events.items)


def test_pod_asking_for_more_gpus_than_any_node_has_stays_pending(api, namespace):
    core = client.CoreV1Api(api)
    too_many = GPUS_PER_NODE + 1
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name="greedy"),
        spec=client.V1PodSpec(containers=[gpu_container(too_many)]),
    )
    core.create_namespaced_pod(namespace, pod)

    def failed_scheduling() -> list[client.CoreV1Event]:
        events = core.list_namespaced_event(namespace, field_selector="involvedObject.name=greedy")
        return [e for e in events.items if e.reason == "FailedScheduling"]

    events = wait_for(failed_scheduling, timeout=60, what="a FailedScheduling event")
    assert "Insufficient nvidia.com/gpu" in events[0].message
    live = core.read_namespaced_pod("greedy", namespace)
    assert live.status.phase == "Pending"
    assert not live.spec.node_name


def test_deleting_a_deployment_garbage_collects_its_replicaset_and_pods(api, namespace):
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    apps.create_namespaced_deployment(namespace, gpu_deployment("doomed", gpus=1))
    wait_for(lambda: pods_of(core, namespace, "doomed"), timeout=60, what="the Deployment's pod")
    assert apps.list_namespaced_replica_set(namespace, label_selector="app=doomed").items

    apps.delete_namespaced_deployment("doomed", namespace, propagation_policy="Background")

    wait_for(
        lambda: not apps.list_namespaced_replica_set(namespace, label_selector="app=doomed").items,
        timeout=60,
        what="the garbage collector to delete the ReplicaSet",
    )
    wait_for(
        lambda: not pods_of(core, namespace, "doomed"),
        timeout=60,
        what="the pods to be deleted",
    )


WIDGET_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.test.kubepeer.io
spec:
  group: test.kubepeer.io
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              required: [size]
              properties:
                size: {type: integer, minimum: 1, maximum: 8}
"""


def test_crd_schema_rejects_an_invalid_object_with_the_servers_message(cluster, namespace):
    cluster.kubectl("apply", "-f", "-", stdin=WIDGET_CRD)
    cluster.kubectl(
        "wait", "--for=condition=Established", "crd/widgets.test.kubepeer.io", "--timeout=30s"
    )

    def apply_widget(size: int) -> object:
        manifest = (
            "apiVersion: test.kubepeer.io/v1\nkind: Widget\n"
            f"metadata: {{name: w{size}}}\nspec: {{size: {size}}}\n"
        )
        return cluster.kubectl("-n", namespace, "apply", "-f", "-", stdin=manifest, check=False)

    # Discovery may lag the Established condition by a moment.
    wait_for(lambda: apply_widget(3).returncode == 0, timeout=30, what="a valid Widget to apply")

    rejected = apply_widget(9)
    assert rejected.returncode != 0
    assert "spec.size" in rejected.stderr
    assert "should be less than or equal to 8" in rejected.stderr
    assert cluster.kubectl("-n", namespace, "get", "widget", "w9", check=False).returncode != 0
