"""The tiers are enforced: a unit test that reaches for the network fails (conftest.py)."""

from __future__ import annotations

import socket

import pytest

from tests.conftest import SocketOpened


@pytest.mark.parametrize("call", ["connect", "bind"])
def test_a_unit_test_that_opens_a_socket_fails(call):
    with socket.socket() as sock, pytest.raises(SocketOpened, match=f"socket.{call}"):
        getattr(sock, call)(("127.0.0.1", 9))


def test_a_unit_test_may_still_make_an_event_loop():
    import asyncio

    async def nothing() -> int:
        return 1

    assert asyncio.run(nothing()) == 1  # (its self-pipe is a socketpair, not the network)


def test_this_module_is_a_unit_test(request):
    assert request.node.get_closest_marker("unit") is not None
    assert request.node.get_closest_marker("integration") is None


def test_each_test_is_grouped_for_the_workers_and_the_workers_see_the_group(request):
    """make test's two workers run a module's tests on one worker (conftest.worker_group);
    under pytest-xdist the group is in the test's id, which is what its scheduler reads."""
    [group] = request.node.iter_markers("xdist_group")
    assert group.args == ("tests/unit/test_tiers.py",)
    if hasattr(request.config, "workerinput"):  # a pytest-xdist worker
        assert request.node.nodeid.endswith("@tests/unit/test_tiers.py")
