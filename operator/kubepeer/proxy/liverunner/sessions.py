"""Live Runner sessions and the slots they hold, in Redis: every proxy replica serves every
request of every session, and an app's capacity holds across replicas
(live-runner-wire.md 4).

Layout, per namespace `ns`:
- `kubepeer:lr:{ns}:session:<sid>` hash: `route`, `url` (the app replica it is pinned to),
  `token` (what the replica presents on callbacks), `mode`, `created`, and `channels`
  (the trickle channels made for it, space-separated), `proxies` (its generated proxy URLs'
  ids), `expires` (its lease). Kept GRACE_SECONDS past its lease, so that the sweep that
  releases an expired session still finds what to close.
  A paid session also holds `payer`, `price` (wei per unit, "num/den", frozen at its
  reserving payment), `unit` and `billed_at` (unix seconds billed up to).
- `kubepeer:lr:{ns}:meter` sorted set: paid metered session -> when its next debit is due.
- `kubepeer:lr:{ns}:slots:<route>` sorted set: `<replica url> <sid>` -> lease expiry (unix
  seconds). One member per session or single-shot call in flight; a replica takes
  `capacity` of them. An expired member holds nothing, so a proxy replica that dies
  mid-call pins a slot for one lease at most; `expired` finds them for the sweep.

A reservation is one script: count the live slots per ready replica, take the least used
replica under capacity, write the session. Two proxy replicas reserving at once cannot
both take a replica's last slot.
"""

from __future__ import annotations

import base64
import secrets
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from redis.asyncio import Redis

GRACE_SECONDS = 120  # a session's record outlives its lease by this, for the sweep

# KEYS: slots, session. ARGV: now, expiry, capacity, sid, token, route, mode, grace, urls...
# Expired slots are not counted (the sweep releases them, so their channels close).
_RESERVE = """
if redis.call('EXISTS', KEYS[2]) == 1 then return {'exists'} end
local used = {}
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf')) do
  local url = string.match(member, '^(%S+) ')
  used[url] = (used[url] or 0) + 1
end
local capacity = tonumber(ARGV[3])
local best, least = nil, capacity
for i = 9, #ARGV do
  local n = used[ARGV[i]] or 0
  if n < least then best, least = ARGV[i], n end
end
if not best then return {'full'} end
redis.call('ZADD', KEYS[1], ARGV[2], best .. ' ' .. ARGV[4])
redis.call('HSET', KEYS[2], 'route', ARGV[6], 'url', best, 'token', ARGV[5],
           'mode', ARGV[7], 'created', ARGV[1], 'channels', '', 'proxies', '',
           'expires', ARGV[2])
redis.call('EXPIREAT', KEYS[2], math.ceil(tonumber(ARGV[2]) + tonumber(ARGV[8])))
return {'ok', best}
"""
# KEYS: slots, session, meter. ARGV: sid. Returns the session's fields before it went, or {}.
_RELEASE = """
local fields = redis.call('HGETALL', KEYS[2])
local url = redis.call('HGET', KEYS[2], 'url')
if url then redis.call('ZREM', KEYS[1], url .. ' ' .. ARGV[1]) end
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
return fields
"""
# KEYS: meter. ARGV: now, next due, most. Claims the sessions due for a debit: each is
# pushed to its next due time in the same step, so one replica bills it per interval.
_METER_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, sid in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[2], sid) end
return due
"""
# KEYS: the payer's balance for the session, session, slots. ARGV: fee, new billed instant,
# the billed instant it was computed from, lease expiry, sid, grace. Debits the fee, moves
# the billed instant and renews the lease (a paying session is in use) in one step; 0 when
# the balance is short or the session is gone, -1 when another replica billed it meanwhile.
_DEBIT = """
local billed = redis.call('HGET', KEYS[2], 'billed_at')
if not billed then return 0 end
if billed ~= ARGV[3] then return -1 end
if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then return 0 end
redis.call('DECRBY', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], 'billed_at', ARGV[2], 'expires', ARGV[4])
local url = redis.call('HGET', KEYS[2], 'url')
redis.call('ZADD', KEYS[3], 'XX', ARGV[4], url .. ' ' .. ARGV[5])
redis.call('EXPIREAT', KEYS[2], math.ceil(tonumber(ARGV[4]) + tonumber(ARGV[6])))
return 1
"""
# KEYS: session. ARGV: field/value pairs. Sets them only while the session exists.
_SET = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""
# KEYS: slots, session. ARGV: sid, expiry, now, grace. Pushes the lease out; 0 if the
# session is gone or its lease has run out (then the sweep releases it).
_RENEW = """
local url = redis.call('HGET', KEYS[2], 'url')
if not url then return 0 end
local member = url .. ' ' .. ARGV[1]
local expiry = tonumber(redis.call('ZSCORE', KEYS[1], member) or '0')
if expiry <= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], 'XX', ARGV[2], member)
redis.call('HSET', KEYS[2], 'expires', ARGV[2])
redis.call('EXPIREAT', KEYS[2], math.ceil(tonumber(ARGV[2]) + tonumber(ARGV[4])))
return 1
"""
# KEYS: session. ARGV: a list field (channels, proxies), a name. Adds the name to the
# session's list; 0 if the session is gone.
_ADD_NAME = """
local have = redis.call('HGET', KEYS[1], ARGV[1])
if not have then return 0 end
for name in string.gmatch(have, '%S+') do
  if name == ARGV[2] then return 1 end
end
redis.call('HSET', KEYS[1], ARGV[1], have .. ' ' .. ARGV[2])
return 1
"""


class Full(Exception):
    """Every ready replica holds `capacity` sessions: go-livepeer's `no capacity available`."""


class Exists(Exception):
    """A session with this id is already reserved (a paid retry sent twice)."""


@dataclass(frozen=True)
class Billed:
    """What a paid session is billed by: the payer, the price its reserving payment carried
    (frozen for the session, live-runner-wire.md 7.5), the unit, the instant billed up to."""

    payer: bytes
    price: Fraction  # wei per unit
    unit: str  # seconds | 720p-pixel-seconds | fixed
    billed_at: float  # unix seconds

    def fields(self) -> dict[str, str]:
        return {"payer": self.payer.hex(), "unit": self.unit, "billed_at": repr(self.billed_at),
                "price": f"{self.price.numerator}/{self.price.denominator}"}  # fmt: skip


@dataclass(frozen=True)
class Session:
    sid: str
    route: str
    url: str  # the replica it is pinned to
    token: str
    mode: str
    channels: tuple[str, ...] = ()
    proxies: tuple[str, ...] = ()  # its generated proxy URLs' ids
    billed: Billed | None = None  # None: a free session
    expires: float = float("inf")  # its lease

    @classmethod
    def from_fields(cls, sid: str, fields: dict[bytes, bytes]) -> Session:
        text = {k.decode(): v.decode() for k, v in fields.items()}
        billed = None
        if "payer" in text:
            billed = Billed(payer=bytes.fromhex(text["payer"]), price=Fraction(text["price"]),
                            unit=text["unit"], billed_at=float(text["billed_at"]))  # fmt: skip
        return cls(sid=sid, route=text["route"], url=text["url"], token=text["token"],
                   mode=text["mode"], channels=tuple(text.get("channels", "").split()),
                   proxies=tuple(text.get("proxies", "").split()),
                   billed=billed, expires=float(text.get("expires", "inf")))  # fmt: skip


def base32(raw: bytes) -> str:
    """Random bytes as go-livepeer writes its ids and secrets: lowercase, unpadded base32."""
    return base64.b32encode(raw).decode().rstrip("=").lower()


def new_session_id() -> str:
    """`session_` and 8 lowercase base32 characters, as go-livepeer's (LR:ReserveSession)."""
    return "session_" + base32(secrets.token_bytes(5))


def new_token() -> str:
    """An opaque secret of 52 lowercase base32 characters (256 bits), as go-livepeer's."""
    return base32(secrets.token_bytes(32))


class SessionStore:
    def __init__(self, redis: Redis, namespace: str) -> None:
        self.redis = redis
        self.prefix = f"kubepeer:lr:{namespace}"
        self._reserve = redis.register_script(_RESERVE)
        self._release = redis.register_script(_RELEASE)
        self._renew = redis.register_script(_RENEW)
        self._add_name = redis.register_script(_ADD_NAME)
        self._meter_claim = redis.register_script(_METER_CLAIM)
        self._set = redis.register_script(_SET)
        self._debit = redis.register_script(_DEBIT)
        self.meter_key = f"{self.prefix}:meter"

    def slots_key(self, route: str) -> str:
        return f"{self.prefix}:slots:{route}"

    def session_key(self, sid: str) -> str:
        return f"{self.prefix}:session:{sid}"

    async def reserve(self, route: str, mode: str, urls: Sequence[str], capacity: int,
                      lease: float, sid: str | None = None) -> Session:  # fmt: skip
        """A slot on the least used of `urls` (the app's ready replicas, in the order ties
        should go), for a session of `lease` seconds. Raises Full or Exists."""
        sid = sid or new_session_id()
        token = new_token()
        now = time.time()
        answer = await self._reserve(
            keys=[self.slots_key(route), self.session_key(sid)],
            args=[
                repr(now),
                repr(now + lease),
                capacity,
                sid,
                token,
                route,
                mode,
                GRACE_SECONDS,
                *urls,
            ],
        )
        status = answer[0].decode()
        if status == "full":
            raise Full(route)
        if status == "exists":
            raise Exists(sid)
        return Session(sid=sid, route=route, url=answer[1].decode(), token=token, mode=mode)

    async def get(self, sid: str) -> Session | None:
        """A live session (None once released, or once its lease has run out)."""
        fields = await self.redis.hgetall(self.session_key(sid))
        if not fields:
            return None
        session = Session.from_fields(sid, fields)
        return session if session.expires > time.time() else None

    async def renew(self, session: Session, lease: float) -> bool:
        """Push the session's lease `lease` seconds from now; False: it was released."""
        now = time.time()
        return bool(
            await self._renew(
                keys=[self.slots_key(session.route), self.session_key(session.sid)],
                args=[session.sid, repr(now + lease), repr(now), GRACE_SECONDS],
            )
        )

    async def release(self, route: str, sid: str) -> Session | None:
        """End the session and free its slot; the session as it was, or None if it was
        not there (already released, or never)."""
        fields = await self._release(
            keys=[self.slots_key(route), self.session_key(sid), self.meter_key], args=[sid]
        )
        if not fields:
            return None
        pairs = dict(zip(fields[::2], fields[1::2], strict=True))
        return Session.from_fields(sid, pairs)

    async def bill(self, session: Session, billed: Billed, first_due: float | None) -> bool:
        """Record what the session is billed by; `first_due`: when its first debit is due
        (None: never, a fixed price). False: it was released meanwhile."""
        pairs = [x for kv in billed.fields().items() for x in kv]
        if not await self._set(keys=[self.session_key(session.sid)], args=pairs):
            return False
        if first_due is not None:
            await self.redis.zadd(self.meter_key, {session.sid: first_due})
        return True

    async def get_many(self, sids: list[str]) -> list[Session | None]:
        """Sessions by id, in one round trip (None: gone)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for sid in sids:
                pipe.hgetall(self.session_key(sid))
            found = await pipe.execute()
        return [Session.from_fields(s, f) if f else None for s, f in zip(sids, found, strict=True)]

    async def debit_many(self, debits: list[tuple[Session, str, int, float]],
                         lease: float) -> list[bool | None]:  # fmt: skip
        """Each (session, its payer's balance key, fee, new billed instant): the fee debited,
        the billed instant moved and the lease renewed together (True); nothing when the
        balance is short (False) or another replica billed that interval already (None).
        One round trip for all."""
        until = repr(time.time() + lease)
        async with self.redis.pipeline(transaction=False) as pipe:
            for session, balance, charge, instant in debits:
                billed_from = repr(session.billed.billed_at) if session.billed else ""
                await self._debit(
                    keys=[balance, self.session_key(session.sid), self.slots_key(session.route)],
                    args=[charge, repr(instant), billed_from, until, session.sid, GRACE_SECONDS],
                    client=pipe,
                )  # fmt: skip
            done = await pipe.execute()
        return [None if d == -1 else bool(d) for d in done]

    async def expired(self, routes: Iterable[str]) -> list[tuple[str, str]]:
        """(route, sid) of the sessions whose lease has run out, for the sweep to release."""
        routes = list(routes)
        slots = await self._slots(routes, live=False)
        return [(route, sid) for route, held in zip(routes, slots, strict=True)
                for _, sid in held]  # fmt: skip

    async def due(self, now: float, next_due: float, most: int = 256) -> list[str]:
        """Claim the sessions whose debit is due (pushed to `next_due` in the same step)."""
        claimed = await self._meter_claim(
            keys=[self.meter_key], args=[repr(now), repr(next_due), most]
        )
        return [sid.decode() for sid in claimed]

    async def unmeter(self, sid: str) -> None:
        await self.redis.zrem(self.meter_key, sid)

    async def add_channel(self, session: Session, channel: str) -> bool:
        """Note a trickle channel made for the session; False: it was released meanwhile."""
        return await self._add(session, "channels", channel)

    async def add_proxy(self, session: Session, proxy_id: str) -> bool:
        """Note a generated proxy URL of the session; False: it was released meanwhile."""
        return await self._add(session, "proxies", proxy_id)

    async def _add(self, session: Session, field: str, name: str) -> bool:
        return bool(await self._add_name(keys=[self.session_key(session.sid)], args=[field, name]))

    async def sessions_of(self, route: str) -> list[str]:
        """The ids of an app's live sessions (and calls), oldest first."""
        [held] = await self._slots([route], live=True)
        sids = [sid for _, sid in held]
        if not sids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for sid in sids:
                pipe.hget(self.session_key(sid), "created")
            created = await pipe.execute()
        live = [(float(at), sid) for sid, at in zip(sids, created, strict=True) if at is not None]
        return [sid for _, sid in sorted(live)]

    async def used(self, routes: Iterable[str]) -> dict[str, dict[str, int]]:
        """Live slots per replica URL, per route: one round trip for a whole discovery."""
        routes = list(routes)
        slots = await self._slots(routes, live=True)
        return {route: dict(Counter(url for url, _ in held))
                for route, held in zip(routes, slots, strict=True)}  # fmt: skip

    async def _slots(self, routes: list[str], live: bool) -> list[list[tuple[str, str]]]:
        """Each route's slots as (replica url, sid), in one round trip: the live ones, or
        those whose lease has run out."""
        if not routes:
            return []
        now = repr(time.time())
        low, high = (f"({now}", "+inf") if live else ("-inf", now)
        async with self.redis.pipeline(transaction=False) as pipe:
            for route in routes:
                pipe.zrangebyscore(self.slots_key(route), low, high)
            replies: list[Any] = await pipe.execute()
        return [[_member(m) for m in members] for members in replies]


def _member(raw: bytes) -> tuple[str, str]:
    """A slot's member, `<replica url> <sid>`, as the scripts write it."""
    url, sid = raw.decode().split(" ", 1)
    return url, sid
