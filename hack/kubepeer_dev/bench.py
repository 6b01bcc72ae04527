"""What the benchmarks in hack/bench share: a funded sender and a fresh chain view for a
paying proxy, ports, waits, percentiles and a process's CPU time."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import threading
import time
from pathlib import Path

import httpx
from redis import Redis

from kubepeer.payments.rounds import ChainView
from kubepeer.payments.sender import SenderInfo
from kubepeer.payments.watcher import save_view

CHAIN = ChainView(l1_block=5_000, current_round=10, creation_round=10,
                  creation_round_block_hash=bytes.fromhex("ab" * 32))  # fmt: skip
FUNDED = SenderInfo(deposit=10**21, withdraw_round=0, reserve=10**21, reserve_alloc=10**20)


def keep_view_fresh(redis_url: str) -> None:
    """The chain watcher's view, saved now and every 5 s (a thread, for the whole run)."""
    redis = Redis.from_url(redis_url)

    def keep() -> None:
        while True:
            save_view(redis, CHAIN)
            time.sleep(5)

    save_view(redis, CHAIN)
    threading.Thread(target=keep, daemon=True).start()


def wait_up_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def free_port() -> int:
    """A free port below the kernel's ephemeral range: the bench's own connections take
    ephemeral ports while the servers start, and one could take a port picked for a server."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    while True:
        port = random.randrange(10_000, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def wait_up(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, verify=False, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children (nginx's worker), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat.parent.name) == pid or int(fields[1]) == pid:  # fields[1]: the parent
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total
