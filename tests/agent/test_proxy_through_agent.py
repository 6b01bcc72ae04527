"""End to end: a job through `kubepeer proxy`'s front door is served by an operator-made
runner that the node agent really runs.

Nothing static: the proxy learns the model from the operator's table ConfigMaps and the
runner's address from its Service's EndpointSlice (no --models-file, no --endpoints-file),
and dials the pod's own address, which the node agent owns (a local network namespace).
The proxy authenticates as its ServiceAccount, granted only `kubepeer rbac --proxy`.
"""

from __future__ import annotations

import pytest
import yaml

from kubepeer.controller.rbac import PROXY, proxy_rbac
from tests.agent.test_node_agent import IMAGE_REQUEST, TINY_SD, Fleet, assert_png_response
from tests.conftest import NodeAgent
from tests.proxies import start_proxy, stop_proxy
from tests.support import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.agent, pytest.mark.redis]


def test_a_private_job_reaches_the_node_agents_runner_through_the_watched_endpoint_slice(
    operator, crds, api, namespace, node_agent: NodeAgent, tiny_models, redis_server, tmp_path
):
    fleet = Fleet(crds, api, namespace)
    try:
        fleet.apply("tiny", node_agent, tiny_models, pricing={"price": {"pricePerUnit": "1"}})
        wait_for(lambda: fleet.status("tiny").get("phase") == "Ready", timeout=180,
                 what="AIModel tiny Ready")  # fmt: skip
        pod = fleet.pod("runner-tiny")
        assert pod.spec.node_name == node_agent.node  # a process on this machine, not kwok's
        (tmp_path / "bearer").write_text("gateway-token")
        for manifest in proxy_rbac(namespace):  # the proxy runs with its own grants only
            crds.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(manifest))
        as_proxy = crds.kubeconfig_for(api, namespace, PROXY, tmp_path / "proxy.kubeconfig")
        proxy = start_proxy(
            tmp_path, redis_server, models=None, endpoints=None, namespace=fleet.ns,
            kubeconfig=as_proxy, runner_token=fleet.runner_token(pod),
            args=["--no-payments", "--bearer-token-file", str(tmp_path / "bearer")],
        )  # fmt: skip
        try:
            job = {**IMAGE_REQUEST, "model_id": TINY_SD}
            with proxy.http(headers={"Authorization": "Bearer gateway-token"}) as http:
                response = http.post("/text-to-image", json=job)
                assert_png_response(response.status_code, response.json())
                refused = http.post(
                    "/text-to-image", json=job, headers={"Authorization": "Bearer wrong"}
                )
            assert refused.status_code == 401  # a front door, not an open relay
            log = proxy.log.read_text()
            assert f"http://{pod.status.pod_ip}:8000" in log, log[-4000:]  # the slice's address
        finally:
            stop_proxy(proxy)
    finally:
        fleet.delete_volumes()
