"""What the payments process publishes in Redis about the chain, kept in the proxy's memory.

A paid job is judged against the chain watcher's view (`watcher.save_view`) and its
sender's deposit and reserve (`senders.save_facts`). Both change every few seconds at most
(the watcher reads a block at a time; a sender's facts are refreshed every 30 s), so the
proxy does not read them per job: `ChainFacts.refresh` reads the view and the facts of every
sender met lately in one round trip, every `every` seconds, off the jobs' path, and marks
those senders asked-for, so the payments process keeps their facts fresh. A job's credit is
then its one round trip before the runner (`AsyncLedger.admit`).

A sender met for the first time (or whose facts have expired) costs one read on its first
job; with none cached the payments process is asked for them, as before. What the cache
holds is never older than `every` seconds plus the payments process's own age limits, which
the view's and the facts' own checks keep applying (`max_age`, FACTS_TTL).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import RedisError

from kubepeer.payments.rounds import ChainView
from kubepeer.payments.sender import SenderInfo
from kubepeer.payments.senders import (
    ASKED_FOR,
    SENDERS_ASKED,
    SENDERS_WANTED,
    parse_facts,
    sender_key,
)
from kubepeer.payments.watcher import CHAIN_VIEW_KEY, parse_view

log = logging.getLogger("kubepeer.proxy")

REFRESH_SECONDS = 1.0


class ChainFacts:
    def __init__(self, redis: AsyncRedis, max_age: float = 60.0,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        self.redis = redis
        self.max_age = max_age  # seconds the watcher's view is trusted after it was read
        self.clock = clock
        self._view: bytes | None = None  # as read: its age is judged when it is used
        self._facts: dict[bytes, SenderInfo] = {}
        self._met: dict[bytes, float] = {}  # sender -> when a job or discovery last met it
        self.refreshed = 0  # refreshes done (tests wait on it)

    # -- what jobs and discovery read --------------------------------------------------
    def view(self) -> ChainView | None:
        """The watcher's last view, or None when it has none or is older than `max_age`."""
        return parse_view(self._view, self.max_age, self.clock())

    def cached(self, sender: bytes) -> SenderInfo | None:
        """The sender's facts if memory holds them (then it is met: kept fresh)."""
        info = self._facts.get(sender)
        if info is not None:
            self._met[sender] = self.clock()
        return info

    async def sender(self, sender: bytes) -> SenderInfo | None:
        """The sender's facts: from memory, else read (and, with none in Redis, asked for
        from the payments process: None until it has read the chain). Only for a sender we
        issued params to: it is kept fresh from now on."""
        info = self._facts.get(sender)
        if info is None:
            info = parse_facts(await self.redis.get(sender_key(sender)))
            if info is None:
                await self.ask(sender)
                return None
            self._facts[sender] = info
        self._met[sender] = self.clock()  # (only senders with facts: memory stays bounded)
        return info

    async def ask(self, sender: bytes) -> None:
        """Have the payments process read this sender now (and keep it fresh)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(SENDERS_ASKED, {sender.hex(): self.clock()})
        pipe.lpush(SENDERS_WANTED, sender.hex())
        await pipe.execute()

    async def await_sender(self, sender: bytes, timeout: float) -> SenderInfo | None:
        """The sender's facts, waiting up to `timeout` seconds for the payments process to
        read them when none are cached (discovery, before it issues params)."""
        info = await self.sender(sender)
        deadline = time.monotonic() + timeout
        while info is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            info = parse_facts(await self.redis.get(sender_key(sender)))
        if info is not None:
            self._facts[sender] = info
            self._met[sender] = self.clock()
        return info

    # -- the refresh -------------------------------------------------------------------
    async def refresh(self) -> None:
        """One round trip: the view, the facts of every sender met in the last ASKED_FOR
        seconds (one gone from Redis is dropped here, and read again when next met), and
        those senders marked asked-for."""
        now = self.clock()
        self._met = {s: at for s, at in self._met.items() if now - at < ASKED_FOR}
        senders = list(self._met)
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(CHAIN_VIEW_KEY)
        if senders:
            pipe.mget([sender_key(s) for s in senders])
            pipe.zadd(SENDERS_ASKED, {s.hex(): at for s, at in self._met.items()})
        view, *rest = await pipe.execute()
        self._view = view
        read = dict(zip(senders, rest[0] if rest else [], strict=True))
        # Senders read now are replaced (or dropped, gone from Redis); one met while this
        # read was on the wire keeps what its job read; one not met for ASKED_FOR goes.
        self._facts = {s: info for s, info in self._facts.items()
                       if s not in read and s in self._met}  # fmt: skip
        self._facts.update((s, info) for s, raw in read.items()
                           if (info := parse_facts(raw)) is not None)  # fmt: skip
        self.refreshed += 1

    async def refresh_forever(self, every: float = REFRESH_SECONDS) -> None:
        """Refresh every `every` seconds until cancelled; Redis away: keep what is held
        (the view's own age check ends its use) and try again."""
        while True:
            try:
                await self.refresh()
            except (RedisError, OSError) as exc:
                log.warning("could not refresh the chain facts: %s", exc)
            await asyncio.sleep(every)
