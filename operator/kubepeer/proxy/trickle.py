"""The trickle server under /ai/trickle/ (gateway-wire 5.2), its channels kept in Redis.

Why Redis and not this replica's memory: a live stream's four channels are used by the
gateway (publish input, read output, control, events) and by the runner, each over its own
connections, which the Service spreads over every proxy replica. With the segments in
Redis any replica answers any channel request, and a replica that dies loses only the
connections it held (their clients reconnect, as trickle clients do, to another replica
and find the same ring). The cost is one Redis round trip per relayed chunk.

Layout (every key of a channel carries the channel's name as its hash tag, so the keys one
script touches share a Redis Cluster slot):
- `kubepeer:trickle:{<ch>}` hash: `mime`, `next` (the next sequence to be written),
  `wt` (unix seconds of the last segment's first byte), `r0`..`r4` (the sequence number
  held in each ring slot: the last 5 segments).
- `kubepeer:trickle:{<ch>}:<seq>` stream: one entry per chunk (`d`: bytes) as the
  publisher sends it, then one end entry (`e`: `done`, `evicted` or `closed`).
- `kubepeer:trickle:active` sorted set: channel -> last write time, for the idle sweep.
Readers follow a segment's stream with XREAD BLOCK, each at its own pace: a slow reader
holds no lock and no buffer the writer waits on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

log = logging.getLogger("kubepeer.proxy.trickle")

BASE_PATH = "/ai/trickle/"
RING = 5  # segments kept per channel (go-livepeer's maxSegmentsPerStream)
IDLE_SECONDS = 300.0  # a channel with no new segment for this long is swept
SWEEP_SECONDS = 60.0
KEEP_AFTER_END = 60  # seconds a closed or evicted segment stays readable by readers on it
POLL_MS = 1000  # a reader re-checks its channel this often while nothing arrives
PRECONNECT_POLL_SECONDS = 0.25  # a publisher waiting for its first byte checks its channel
RESET_HEADER = b"lp-trickle-reset"  # a restarted publisher: end the segments before its own
ACTIVE = "kubepeer:trickle:active"
CHANNEL_NAME = re.compile(r"^[A-Za-z0-9._~-]{1,200}$")
STATUS_ABSENT = 470  # channel exists, segment not (go-livepeer's special status)

CLOSED = b"closed"
EVICTED = b"evicted"
DONE = b"done"


def meta_key(channel: str) -> str:
    return f"kubepeer:trickle:{{{channel}}}"


def segment_key(channel: str, seq: int) -> str:
    return f"{meta_key(channel)}:{seq}"


# -- scripts (ARGV[1] is always the segment key prefix `<meta key>:`) -----------------------
# Evicting a ring slot ends the old segment for readers still on it and lets it expire.
_EVICT = """
local function evict(prefix, old, keep)
  if old then
    redis.call('XADD', prefix .. old, '*', 'e', 'evicted')
    redis.call('EXPIRE', prefix .. old, keep)
  end
end
local function take_slot(meta, prefix, idx, keep)
  local slot = 'r' .. (idx % %RING%)
  local cur = redis.call('HGET', meta, slot)
  if cur == tostring(idx) then return end
  evict(prefix, cur, keep)
  redis.call('DEL', prefix .. idx)
  redis.call('HSET', meta, slot, idx)
end
""".replace("%RING%", str(RING))

# KEYS[1] meta; ARGV: prefix, seq, keep -> {idx} or {} (no channel)
_OPEN_WRITE = (
    _EVICT
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
local idx = tonumber(ARGV[2])
if idx == -1 then idx = tonumber(redis.call('HGET', KEYS[1], 'next')) end
local slot = 'r' .. (idx % %RING%)
if redis.call('HGET', KEYS[1], slot) == tostring(idx) then
  -- a segment posted again once finished starts over; a precreated one is kept
  local last = redis.call('XREVRANGE', ARGV[1] .. idx, '+', '-', 'COUNT', 1)
  if last[1] and last[1][2][1] == 'e' then redis.call('DEL', ARGV[1] .. idx) end
end
take_slot(KEYS[1], ARGV[1], idx, tonumber(ARGV[3]))
return {idx}
""".replace("%RING%", str(RING))
)

# KEYS[1] meta; ARGV: prefix, seq, keep -> {} (no channel) or {found, idx, next, mime}
_OPEN_READ = (
    _EVICT
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
local nxt = tonumber(redis.call('HGET', KEYS[1], 'next'))
local idx = tonumber(ARGV[2])
if idx == -1 then idx = nxt elseif idx == -2 then idx = math.max(nxt - 1, 0) end
local found = 0
if idx >= 0 then
  if redis.call('HGET', KEYS[1], 'r' .. (idx % %RING%)) == tostring(idx) then
    found = 1
  elseif idx == nxt or (nxt == 0 and idx == 1) then
    -- a reader just ahead of the writer waits for the segment (go-livepeer precreates it)
    take_slot(KEYS[1], ARGV[1], idx, tonumber(ARGV[3]))
    found = 1
  end
end
return {found, idx, nxt, redis.call('HGET', KEYS[1], 'mime')}
""".replace("%RING%", str(RING))
)

# KEYS[1] meta; ARGV: prefix, idx, now, ttl: the first byte of segment idx arrived
_FIRST_BYTE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'next', tonumber(ARGV[2]) + 1, 'wt', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""

# KEYS[1] meta; ARGV: prefix, idx, ttl -> how many segments before idx were ended. A
# restarted publisher's earlier segments may never get their last byte: end them for the
# readers waiting on them (who then get 470 and the latest seq); later, preconnected
# segments are kept (they can arrive out of order).
_RESET = """
local ended = 0
for i = 0, %LAST% do
  local held = redis.call('HGET', KEYS[1], 'r' .. i)
  if held and tonumber(held) < tonumber(ARGV[2]) then
    local last = redis.call('XREVRANGE', ARGV[1] .. held, '+', '-', 'COUNT', 1)
    if not (last[1] and last[1][2][1] == 'e') then
      redis.call('XADD', ARGV[1] .. held, '*', 'e', 'done')
      redis.call('EXPIRE', ARGV[1] .. held, ARGV[3])
      ended = ended + 1
    end
  end
end
return ended
""".replace("%LAST%", str(RING - 1))

# KEYS[1] meta; ARGV: prefix, keep -> 1, or 0 when there was no such channel
_CLOSE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 0, %LAST% do
  local idx = redis.call('HGET', KEYS[1], 'r' .. i)
  if idx then
    redis.call('XADD', ARGV[1] .. idx, '*', 'e', 'closed')
    redis.call('EXPIRE', ARGV[1] .. idx, ARGV[2])
  end
end
redis.call('DEL', KEYS[1])
return 1
""".replace("%LAST%", str(RING - 1))


@dataclass(frozen=True)
class ReadPlan:
    found: bool
    seq: int
    latest: int
    mime: str


@dataclass(frozen=True)
class SegmentEnd:
    """How a segment's bytes ended: `done` by its publisher, `evicted` from the ring, or
    `closed` with its channel (then Lp-Trickle-Closed)."""

    reason: bytes


class TrickleStore:
    """The channels, in Redis; shared by every proxy replica."""

    def __init__(
        self,
        redis: Redis,
        *,
        idle_seconds: float = IDLE_SECONDS,
        keep_after_end: int = KEEP_AFTER_END,
    ) -> None:
        self.redis = redis
        self.idle_seconds = idle_seconds
        self.keep_after_end = keep_after_end
        self._open_write = redis.register_script(_OPEN_WRITE)
        self._open_read = redis.register_script(_OPEN_READ)
        self._first_byte = redis.register_script(_FIRST_BYTE)
        self._close = redis.register_script(_CLOSE)
        self._reset = redis.register_script(_RESET)

    @property
    def key_ttl(self) -> int:
        """Keys outlive a channel's idle limit twice over: a backstop when no replica sweeps."""
        return int(self.idle_seconds * 2) + self.keep_after_end

    # -- channels ----------------------------------------------------------------------
    async def create(self, channel: str, mime: str) -> None:
        now = time.time()
        meta = meta_key(channel)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(meta)
            pipe.hset(meta, mapping={"mime": mime, "next": 0, "wt": now})
            pipe.expire(meta, self.key_ttl)
            await pipe.execute()
        await self.redis.zadd(ACTIVE, {channel: now})

    async def mime(self, channel: str) -> str | None:
        raw = await self.redis.hget(meta_key(channel), "mime")
        return None if raw is None else raw.decode()

    async def exists(self, channel: str) -> bool:
        return bool(await self.redis.exists(meta_key(channel)))

    async def close(self, channel: str) -> bool:
        """Ends every segment's readers with Lp-Trickle-Closed; False: no such channel."""
        closed = await self._close(
            keys=[meta_key(channel)], args=[segment_key(channel, 0)[:-1], self.keep_after_end]
        )
        await self.redis.zrem(ACTIVE, channel)
        return bool(closed)

    async def next_seq(self, channel: str) -> int | None:
        raw = await self.redis.hget(meta_key(channel), "next")
        return None if raw is None else int(raw)

    async def sweep(self, now: float | None = None) -> list[str]:
        """Close channels with no new segment for `idle_seconds` (any replica may sweep)."""
        limit = (now if now is not None else time.time()) - self.idle_seconds
        swept = []
        for raw in await self.redis.zrangebyscore(ACTIVE, "-inf", limit):
            channel = raw.decode()
            wt = await self.redis.hget(meta_key(channel), "wt")
            if wt is not None and float(wt) > limit:
                await self.redis.zadd(ACTIVE, {channel: float(wt)})  # written meanwhile
                continue
            await self.close(channel)
            swept.append(channel)
        return swept

    # -- writing -----------------------------------------------------------------------
    async def open_write(self, channel: str, seq: int) -> int | None:
        """The segment a POST writes (seq -1: the next one); None when no such channel."""
        prefix = segment_key(channel, 0)[:-1]
        found = await self._open_write(
            keys=[meta_key(channel)], args=[prefix, seq, self.keep_after_end]
        )
        return int(found[0]) if found else None

    async def reset_before(self, channel: str, seq: int) -> int:
        """End the unfinished segments before seq (Lp-Trickle-Reset); how many were."""
        prefix = segment_key(channel, 0)[:-1]
        return int(await self._reset(keys=[meta_key(channel)], args=[prefix, seq, self.key_ttl]))

    async def first_byte(self, channel: str, seq: int) -> None:
        now = time.time()
        await self._first_byte(
            keys=[meta_key(channel)], args=[segment_key(channel, 0)[:-1], seq, now, self.key_ttl]
        )
        await self.redis.zadd(ACTIVE, {channel: now})

    async def append(self, channel: str, seq: int, data: bytes) -> None:
        key = segment_key(channel, seq)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(key, {"d": data})
            pipe.expire(key, self.key_ttl)
            await pipe.execute()

    async def end_segment(self, channel: str, seq: int, reason: bytes = DONE) -> None:
        key = segment_key(channel, seq)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(key, {"e": reason})
            pipe.expire(key, self.key_ttl)
            await pipe.execute()

    async def write_segment(self, channel: str, data: bytes) -> int | None:
        """Publish one whole segment as the orchestrator (an o2r message); its sequence
        number, or None when there is no such channel."""
        seq = await self.open_write(channel, -1)
        if seq is None:
            return None
        await self.append(channel, seq, data)
        await self.first_byte(channel, seq)
        await self.end_segment(channel, seq, DONE)
        return seq

    async def end_reason(self, channel: str, seq: int) -> bytes | None:
        """How segment seq ended (`done`, `closed`, `evicted`); None while it is open."""
        last = await self.redis.xrevrange(segment_key(channel, seq), count=1)
        return last[0][1].get(b"e") if last else None

    async def in_ring(self, channel: str, seq: int) -> bool | None:
        """Whether segment seq is in its channel's ring; None when there is no channel."""
        held = await self.redis.hget(meta_key(channel), f"r{seq % RING}")
        if held is None:
            return None if not await self.exists(channel) else False
        return int(held) == seq

    # -- reading -----------------------------------------------------------------------
    async def open_read(self, channel: str, seq: int) -> ReadPlan | None:
        prefix = segment_key(channel, 0)[:-1]
        found = await self._open_read(
            keys=[meta_key(channel)], args=[prefix, seq, self.keep_after_end]
        )
        if not found:
            return None
        mime = found[3].decode() if isinstance(found[3], bytes) else (found[3] or "")
        return ReadPlan(bool(found[0]), int(found[1]), int(found[2]), mime)

    async def read(self, channel: str, seq: int) -> AsyncIterator[bytes | SegmentEnd]:
        """The segment's chunks as they arrive, then one SegmentEnd."""
        key = segment_key(channel, seq)
        last = "0-0"
        while True:
            reply = await self.redis.xread({key: last}, block=POLL_MS, count=64)
            if not reply:
                if not await self.exists(channel):
                    yield SegmentEnd(CLOSED)  # swept or closed while we waited
                    return
                continue
            for entry_id, fields in reply[0][1]:
                last = entry_id
                if b"d" in fields:
                    yield fields[b"d"]
                else:
                    yield SegmentEnd(fields.get(b"e", DONE))
                    return


# -- the HTTP edge (raw ASGI: headers go out with the first byte, as in go-livepeer) -------
def _headers(pairs: dict[str, str | int]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode(), str(v).encode()) for k, v in pairs.items()]


async def _plain(
    send: Any, status: int, text: str, headers: dict[str, str | int] | None = None
) -> None:
    body = (text + "\n").encode() if text else b""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": _headers({"content-type": "text/plain; charset=utf-8", **(headers or {})}),
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _drain(receive: Any) -> None:
    """Read a request body we will not use, so the connection stays usable."""
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return


class TrickleServer:
    """ASGI app for every path under BASE_PATH."""

    def __init__(self, store: TrickleStore) -> None:
        self.store = store

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        parts = scope["path"][len(BASE_PATH) :].split("/")
        method = scope["method"]
        channel = parts[0]
        if not CHANNEL_NAME.match(channel) or len(parts) > 2:
            await _plain(send, 404, "Stream not found")
            return
        if len(parts) == 1 or parts[1] == "":
            if method == "POST":  # create: only with autocreate, which we never do
                await _drain(receive)
                if await self.store.exists(channel):
                    await _plain(send, 200, "")
                else:
                    await _plain(send, 404, "Stream not found")
            elif method == "DELETE":
                if await self.store.close(channel):
                    await _plain(send, 200, "")
                else:
                    await _plain(send, 400, "Invalid stream")
            else:
                await _plain(send, 405, "Method Not Allowed")
            return
        if parts[1] == "next" and method == "GET":
            nxt = await self.store.next_seq(channel)
            if nxt is None:
                await _plain(send, 404, "Stream not found")
            else:
                await _plain(send, 200, str(nxt), {"Lp-Trickle-Latest": nxt})
            return
        try:
            seq = int(parts[1])
        except ValueError:
            await _drain(receive)
            await _plain(send, 400, "Invalid idx")
            return
        if method == "POST":
            await self.publish(channel, seq, scope, receive, send)
        elif method == "GET":
            await self.subscribe(channel, seq, receive, send)
        elif method == "DELETE":
            await self.close_segment(channel, seq, send)
        else:
            await _plain(send, 405, "Method Not Allowed")

    async def close_segment(self, channel: str, seq: int, send: Any) -> None:
        held = await self.store.in_ring(channel, seq) if seq >= 0 else False
        if held is None:
            await _plain(send, 404, "Stream not found")
        elif not held:
            await _plain(send, 400, "Nonexistent segment")
        else:
            await self.store.end_segment(channel, seq, DONE)
            await _plain(send, 200, "")

    # -- POST: publish one segment, relayed to readers as it arrives --------------------
    async def publish(
        self, channel: str, seq: int, scope: dict[str, Any], receive: Any, send: Any
    ) -> None:
        if seq < -1:
            await _drain(receive)
            await _plain(send, 400, "Invalid idx")
            return
        idx = await self.store.open_write(channel, seq)
        if idx is None:
            await _drain(receive)
            await _plain(send, 404, "Stream not found", {"Connection": "close"})
            return
        if any(k == RESET_HEADER and v for k, v in scope["headers"]):
            await self.store.reset_before(channel, idx)
        first = asyncio.ensure_future(self._first_chunk(receive))
        ended = asyncio.ensure_future(self._segment_ended(channel, idx))
        # A preconnected publisher is held, unanswered, until its first byte or its segment's
        # end. go-livepeer also sends it `100 Continue` every 10 s; ASGI cannot (DESIGN.md).
        done, _ = await asyncio.wait({first, ended}, return_when=asyncio.FIRST_COMPLETED)
        if first not in done:
            # A preconnected publisher whose segment or channel closed before it sent a byte.
            first.cancel()
            reason = ended.result()
            headers: dict[str, str | int] = {"Connection": "close", "Lp-Trickle-Seq": idx}
            if reason == CLOSED:
                headers["Lp-Trickle-Closed"] = "terminated"
            await _plain(send, 200, "", headers)
            return
        ended.cancel()
        chunk, more, disconnected = first.result()
        total = 0
        while True:
            if chunk:
                await self.store.append(channel, idx, chunk)  # readers first, bookkeeping after
                if total == 0:
                    await self.store.first_byte(channel, idx)
                total += len(chunk)
            if disconnected or not more:
                break
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected = True
                chunk, more = b"", False
            else:
                chunk, more = message.get("body", b""), message.get("more_body", False)
        headers = {"Lp-Trickle-Seq": idx}
        if total == 0 and not disconnected:
            if await self.store.in_ring(channel, idx) is None:  # closed while we waited
                await _plain(send, 200, "", {**headers, "Lp-Trickle-Closed": "terminated",
                                             "Connection": "close"})  # fmt: skip
                return
            await self.store.first_byte(channel, idx)  # an empty segment still moves on
        await self.store.end_segment(channel, idx, DONE)
        if not disconnected:
            await _plain(send, 200, "", headers)

    @staticmethod
    async def _first_chunk(receive: Any) -> tuple[bytes, bool, bool]:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", False, True
            body, more = message.get("body", b""), message.get("more_body", False)
            if body or not more:
                return body, more, False

    async def _segment_ended(self, channel: str, idx: int) -> bytes:
        """Polled, not a blocked XREAD: cancelling a blocked Redis command (as every first
        byte would) costs the connection it was using."""
        while True:
            held = await self.store.in_ring(channel, idx)
            if held is None:
                return CLOSED
            if not held:
                return EVICTED
            # Ended by Lp-Trickle-Reset, DELETE /{ch}/{seq} or the channel's close; the end
            # entry says which, also when the channel closed between the two reads above.
            reason = await self.store.end_reason(channel, idx)
            if reason is not None:
                return reason
            await asyncio.sleep(PRECONNECT_POLL_SECONDS)

    # -- GET: subscribe to one segment --------------------------------------------------
    async def subscribe(self, channel: str, seq: int, receive: Any, send: Any) -> None:
        plan = await self.store.open_read(channel, seq)
        if plan is None:
            await _plain(send, 404, "Stream not found")
            return
        if not plan.found:
            where = {"Lp-Trickle-Latest": plan.latest, "Lp-Trickle-Seq": plan.seq}
            await _plain(send, STATUS_ABSENT, "Entry not found", where)
            return
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            await self._relay(channel, plan, send, gone)
        finally:
            gone.cancel()

    async def _relay(
        self, channel: str, plan: ReadPlan, send: Any, gone: asyncio.Future[None]
    ) -> None:
        started = False
        reader = self.store.read(channel, plan.seq).__aiter__()
        try:
            while True:
                step = asyncio.ensure_future(reader.__anext__())
                done, _ = await asyncio.wait({step, gone}, return_when=asyncio.FIRST_COMPLETED)
                if step not in done:
                    step.cancel()
                    with contextlib.suppress(BaseException):
                        await step
                    return  # the reader hung up
                item = step.result()
                if isinstance(item, SegmentEnd):
                    break
                if not started:
                    headers: dict[str, str | int] = {
                        "Lp-Trickle-Seq": plan.seq, "Content-Type": plan.mime
                    }  # fmt: skip
                    if plan.seq != plan.latest:
                        headers["Lp-Trickle-Latest"] = plan.latest
                    await send({"type": "http.response.start", "status": 200,
                                "headers": _headers(headers)})  # fmt: skip
                    started = True
                await send({"type": "http.response.body", "body": item, "more_body": True})
        except StopAsyncIteration:
            item = SegmentEnd(CLOSED)
        finally:
            with contextlib.suppress(BaseException):
                await reader.aclose()
        if started:
            await send({"type": "http.response.body", "body": b""})
            return
        # Nothing was written: the segment was cancelled, evicted, or its channel closed.
        if item.reason == CLOSED:
            await _plain(send, 200, "", {"Lp-Trickle-Seq": plan.seq,
                                         "Lp-Trickle-Closed": "terminated"})  # fmt: skip
            return
        latest = await self.store.next_seq(channel)
        await _plain(send, STATUS_ABSENT, "", {"Lp-Trickle-Seq": plan.seq,
                                               "Lp-Trickle-Latest": latest or 0})  # fmt: skip


async def _disconnected(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def sweep_forever(store: TrickleStore, every: float = SWEEP_SECONDS) -> None:
    while True:
        await asyncio.sleep(every)
        try:
            swept = await store.sweep()
        except Exception:  # Redis away: the next pass tries again
            log.exception("trickle sweep failed")
            continue
        for channel in swept:
            log.info("closed idle trickle channel", extra={"channel": channel})
