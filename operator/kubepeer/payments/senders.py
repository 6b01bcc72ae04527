"""The TicketBroker's view of each sender, read by the payments process and shared in Redis.

go-livepeer's orchestrator reads a sender's deposit, reserve and unlock round through a
cache (`pm/sendermonitor.go`) before it issues params (their face value is capped by the
sender's max float) and when tickets arrive (an unlocking sender is refused). Here the
payments process reads the chain and every proxy replica reads Redis, never the chain,
and never per job:

- a proxy that meets a sender with no cached facts asks for them (`request`: pushed on
  `SENDERS_WANTED`) and waits a moment at discovery (`await_facts`);
- the payments process answers at once (`SenderWatch`: a blocking pop) and keeps the facts
  of every sender asked about in the last `ASKED_FOR` seconds fresh, each at most
  `REFRESH_SECONDS` old;
- each entry dies `FACTS_TTL` seconds after it was read, so a stalled watcher never lets a
  proxy trust an old deposit for long.

Layout (hash tag `{pm}`, as the ledger's keys):
    kubepeer:{pm}:sender:<sender>     JSON SenderInfo + seen_at, expiring after FACTS_TTL
    kubepeer:{pm}:senders:asked       sorted set: sender -> when a proxy last asked
    kubepeer:{pm}:senders:wanted      list: senders to read now
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict

from redis import Redis

from kubepeer.payments.ledger import PREFIX
from kubepeer.payments.sender import SenderInfo

log = logging.getLogger(__name__)

SENDERS_ASKED = f"{PREFIX}:senders:asked"
SENDERS_WANTED = f"{PREFIX}:senders:wanted"
FACTS_TTL = 120  # seconds an entry is trusted after the chain was read
REFRESH_SECONDS = 30  # an asked-for sender's facts are read again at least this often
ASKED_FOR = 1800  # a sender no proxy asked about for this long is no longer refreshed


def sender_key(sender: bytes) -> str:
    return f"{PREFIX}:sender:0x{sender.hex()}"


def save_facts(redis: Redis, sender: bytes, info: SenderInfo, now: float | None = None) -> None:
    fields = {**asdict(info), "seen_at": time.time() if now is None else now}
    redis.set(sender_key(sender), json.dumps(fields), ex=FACTS_TTL)


def load_facts(redis: Redis, sender: bytes) -> SenderInfo | None:
    """The sender's facts as the watcher last read them, or None (never read, or expired)."""
    return parse_facts(redis.get(sender_key(sender)))


def parse_facts(raw: bytes | None) -> SenderInfo | None:
    """`load_facts` of the value read at `sender_key`."""
    if raw is None:
        return None
    fields = json.loads(raw)
    fields.pop("seen_at", None)
    return SenderInfo(**fields)


def request(redis: Redis, sender: bytes, now: float | None = None) -> None:
    """Ask the payments process to read this sender now (and keep it fresh)."""
    pipe = redis.pipeline(transaction=False)
    pipe.zadd(SENDERS_ASKED, {sender.hex(): time.time() if now is None else now})
    pipe.lpush(SENDERS_WANTED, sender.hex())
    pipe.execute()


async def await_facts(redis: Redis, sender: bytes, timeout: float) -> SenderInfo | None:
    """The sender's facts, asking for them and waiting up to `timeout` seconds if none are
    cached. Also marks the sender asked-for, so the watcher keeps its facts fresh."""
    info = load_facts(redis, sender)
    if info is not None:
        redis.zadd(SENDERS_ASKED, {sender.hex(): time.time()})
        return info
    request(redis, sender)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        info = load_facts(redis, sender)
        if info is not None:
            return info
    return None


class SenderWatch:
    """The payments process's side: reads senders from the chain when asked, and keeps the
    asked-for ones fresh. `read(sender)` is the chain read (ChainWatcher.sender_info)."""

    def __init__(self, redis: Redis, read: Callable[[bytes], SenderInfo],
                 stop: threading.Event | None = None) -> None:  # fmt: skip
        self.redis = redis
        self.read = read
        self.stop = stop or threading.Event()

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="sender-watch", daemon=True)
        thread.start()
        return thread

    def run(self) -> None:
        last_sweep = 0.0
        while not self.stop.is_set():
            try:
                popped = self.redis.blpop([SENDERS_WANTED], timeout=1)
                if popped is not None:
                    self._read(bytes.fromhex(popped[1].decode()))
                if time.monotonic() - last_sweep >= 1.0:
                    self.refresh_stale()
                    last_sweep = time.monotonic()
            except Exception as exc:  # the RPC or Redis is away: try again, never die
                log.warning("sender watch: %s", exc)
                self.stop.wait(1.0)

    def refresh_stale(self, now: float | None = None) -> None:
        """Read again each sender asked about recently whose facts are older than
        REFRESH_SECONDS (or gone); forget senders nobody asked about for ASKED_FOR."""
        now = time.time() if now is None else now
        self.redis.zremrangebyscore(SENDERS_ASKED, "-inf", now - ASKED_FOR)
        senders = [bytes.fromhex(m.decode()) for m in self.redis.zrange(SENDERS_ASKED, 0, -1)]
        if not senders:
            return
        facts = self.redis.mget([sender_key(sender) for sender in senders])  # one round trip
        for sender, raw in zip(senders, facts, strict=True):
            if raw is None or now - json.loads(raw)["seen_at"] >= REFRESH_SECONDS:
                self._read(sender)

    def _read(self, sender: bytes) -> None:
        save_facts(self.redis, sender, self.read(sender))
