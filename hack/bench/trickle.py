#!/usr/bin/env python3
"""The proxy's trickle relay, as ratios against its own floor measured in the same run.

A publisher POSTs segments to one proxy replica while a subscriber, already waiting on the
next sequence, reads them from another replica (the worst case: every byte crosses Redis).
Measured per segment: publish start -> first byte at the subscriber (relay latency), and
the whole segment's arrival; then throughput of back-to-back 1 MiB segments. The floor is
Redis itself: XADD -> a blocked XREAD's wake-up on the same server, the least any
Redis-backed relay can add.

Run: .venv/bin/python hack/bench/trickle.py [--segments 60] [--size 65536]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from redis.asyncio import Redis

from kubepeer.proxy.trickle import TrickleStore

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_http(url: str) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(300):
            try:
                async with http.get(url) as reply:
                    if reply.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} never answered")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def redis_floor(redis: Redis, n: int) -> list[float]:
    """XADD -> blocked XREAD wake-up, on the same Redis."""
    took = []
    key = "bench:trickle:floor"
    await redis.delete(key)
    last = "0-0"
    for _ in range(n):
        reader = asyncio.ensure_future(redis.xread({key: last}, block=5000, count=1))
        await asyncio.sleep(0.002)
        started = time.perf_counter()
        await redis.xadd(key, {"d": b"x"})
        reply = await reader
        took.append(time.perf_counter() - started)
        last = reply[0][1][0][0]
    return took


async def relay(a: str, b: str, channel: str, n: int, size: int) -> tuple[list, list]:
    first_bytes, wholes = [], []
    body = os.urandom(size)
    async with aiohttp.ClientSession() as http:
        for seq in range(n):
            reading = asyncio.ensure_future(http.get(f"{b}/ai/trickle/{channel}/{seq}"))
            await asyncio.sleep(0.02)  # the subscriber is waiting at the live edge
            started = time.perf_counter()
            post = asyncio.ensure_future(http.post(f"{a}/ai/trickle/{channel}/{seq}", data=body))
            reply = await reading
            await reply.content.readany()
            first_bytes.append(time.perf_counter() - started)
            await reply.read()
            wholes.append(time.perf_counter() - started)
            (await post).release()
    return first_bytes, wholes


async def throughput(a: str, b: str, channel: str, n: int) -> float:
    body = os.urandom(1 << 20)
    async with aiohttp.ClientSession() as http:

        async def read_all() -> int:
            got = 0
            for seq in range(n):
                async with http.get(f"{b}/ai/trickle/{channel}/{seq}") as reply:
                    got += len(await reply.read())
            return got

        reader = asyncio.ensure_future(read_all())
        started = time.perf_counter()
        for seq in range(n):
            async with http.post(f"{a}/ai/trickle/{channel}/{seq}", data=body) as reply:
                await reply.read()
        got = await reader
        return got / (time.perf_counter() - started) / 2**20


async def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-trickle-"))
    redis_port = free_port()
    procs = [subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no"], stdout=subprocess.DEVNULL)]  # fmt: skip
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    (work / "models.json").write_text('{"version": 1, "models": []}')
    (work / "endpoints.json").write_text("{}")
    (work / "bearer").write_text("bench")
    urls = []
    for _ in range(2):
        port = free_port()
        urls.append(f"http://127.0.0.1:{port}")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "kubepeer.cli", "proxy", "--bind", f"127.0.0.1:{port}",
             "--public-url", urls[-1], "--namespace", "bench", "--redis-url", redis_url,
             "--models-file", str(work / "models.json"),
             "--endpoints-file", str(work / "endpoints.json"), "--plaintext", "--no-payments",
             "--bearer-token-file", str(work / "bearer"), "--no-wake"],
            stdout=(work / f"proxy-{port}.log").open("wb"), stderr=subprocess.STDOUT,
        ))  # fmt: skip
    try:
        for url in urls:
            await wait_http(f"{url}/healthz")
        redis = Redis.from_url(redis_url)
        store = TrickleStore(redis)
        await store.create("latency", "video/MP2T")
        await store.create("throughput", "video/MP2T")
        floor = await redis_floor(redis, args.segments)
        first, whole = await relay(urls[0], urls[1], "latency", args.segments, args.size)
        mib_s = await throughput(urls[0], urls[1], "throughput", args.throughput_segments)
        f50, f99 = statistics.median(floor), pct(floor, 0.99)
        print(
            f"Redis floor (XADD -> XREAD wake-up): p50 {f50 * 1e3:.2f} ms, p99 {f99 * 1e3:.2f} ms"
        )
        for name, values in (("first byte", first), (f"whole {args.size} B segment", whole)):
            p50, p99 = statistics.median(values), pct(values, 0.99)
            print(f"relay {name} (publish on A, read on B): p50 {p50 * 1e3:.2f} ms "
                  f"({p50 / f50:.1f}x floor), "
                  f"p99 {p99 * 1e3:.2f} ms ({p99 / f99:.1f}x floor)")  # fmt: skip
        print(f"throughput, 1 MiB segments A -> B: {mib_s:.1f} MiB/s "
              f"(a 512x512 H.264 stream is ~0.25 MiB/s)")  # fmt: skip
        await redis.aclose()
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--segments", type=int, default=60)
    parser.add_argument("--size", type=int, default=64 * 1024)
    parser.add_argument("--throughput-segments", type=int, default=40)
    asyncio.run(main(parser.parse_args()))
