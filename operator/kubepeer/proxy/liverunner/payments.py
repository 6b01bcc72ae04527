"""Paid Live Runner sessions (live-runner-wire.md 7): the 402 challenge, the paid retry,
top-ups, `/refresh-payment`, and metering every interval.

The tickets themselves are judged by the proxy's one door to payments (`Billing`): the
price a payment claims must be the one its challenge offered this payer for this app
(ledger key `app_key(route)`), and credits land on (payer, session id) as a batch job's
do on (sender, manifest). A session's price is frozen at its reserving payment.

Metering is shared by every proxy replica: due sessions sit in one sorted set in Redis
and each replica's `meter_forever` claims those due (one script: a claimed session is
pushed to its next due time at once), so each is billed once per interval by whichever
replica claims it, and a replica that dies stops billing nothing.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any

from kubepeer.contracts.apps import AppPrice
from kubepeer.livepeer import net_pb2
from kubepeer.livepeer.wire import (
    PAYMENT_HEADER,
    SEGMENT_HEADER,
    BadHeader,
    decode_payment,
    decode_segment,
)
from kubepeer.payments.ledger import balance_key
from kubepeer.proxy.billing import Billing, PaymentRefused, fee
from kubepeer.proxy.credentials import AuthSecret, CredentialsRefused, check_segment
from kubepeer.proxy.liverunner.sessions import Billed, Session, SessionStore

log = logging.getLogger("kubepeer.proxy.liverunner")

PAYER_HEADER = "livepeer-payer-address"
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
PIXELS_PER_SECOND = 1280 * 720 * 30  # a second of nominal 720p30 (wire 7.5)
RATE = {"seconds": 1, "720p-pixel-seconds": PIXELS_PER_SECOND}  # units per second


def app_key(route: str) -> str:
    """The ledger key prices are offered under for an app (beside `<cap>_<model>` keys)."""
    return f"liverunner_{route}"


class PaymentProblem(Exception):
    """An answer to a paid request: status, and a text (or a JSON error body)."""

    def __init__(self, status: int, text: str, as_json: bool = False) -> None:
        super().__init__(text)
        self.status, self.text, self.as_json = status, text, as_json


def wants_challenge(headers: Mapping[str, str]) -> bool:
    """Neither payment header: the request is answered with a 402 challenge (wire 7.2)."""
    return not headers.get(PAYMENT_HEADER.lower()) and not headers.get(SEGMENT_HEADER.lower())


def units_due(unit: str, elapsed: float) -> int:
    """Whole units in `elapsed` seconds (go-livepeer's floor(rate x elapsed))."""
    return math.floor(RATE[unit] * elapsed)


@dataclass(frozen=True)
class Paid:
    """A paid retry that passed: the payment, the session id it names, its price."""

    payment: net_pb2.Payment
    sid: str
    billed: Billed


class AppPayments:
    def __init__(
        self, billing: Billing, auth: AuthSecret, address: bytes, public_url: str,
        sessions: SessionStore, interval: float, lease: float = 600.0,
    ) -> None:  # fmt: skip
        self.billing, self.auth, self.address = billing, auth, address
        self.public_url, self.sessions, self.interval = public_url, sessions, interval
        self.lease = lease  # each paid debit renews its session's lease this far

    # -- the challenge (7.2) --------------------------------------------------------------
    async def _info(self, payer: bytes, route: str, price: AppPrice,
                    session_id: str) -> net_pb2.OrchestratorInfo:  # fmt: skip
        """OrchestratorInfo for a payer: ticket params at the app's price, that price, our
        address, an auth token for the session id; no capabilities."""
        try:
            await self.billing.know_sender(payer)
            params = await self.billing.params_for(payer, (price.wei, 1), [app_key(route)])
        except PaymentRefused as exc:
            raise PaymentProblem(500, str(exc)) from None
        return net_pb2.OrchestratorInfo(
            transcoder=self.public_url,
            ticket_params=params,
            price_info=net_pb2.PriceInfo(price_per_unit=price.wei, pixels_per_unit=1),
            address=self.address,
            auth_token=self.auth.issue(session_id=session_id),
        )

    async def challenge(self, route: str, price: AppPrice, headers: Mapping[str, str]) -> dict:
        payer = headers.get(PAYER_HEADER, "")
        if not _ADDRESS.match(payer):
            raise PaymentProblem(402, "invalid live runner payment signer address", as_json=True)
        manifest = secrets.token_hex(4)  # becomes the session id on the paid retry
        info = await self._info(bytes.fromhex(payer[2:]), route, price, manifest)
        payment_url = f"{self.public_url}/apps/{route}/session/{manifest}/payment"
        return self._challenge(info, manifest, payment_url)

    def _challenge(self, info: net_pb2.OrchestratorInfo, manifest: str, payment_url: str) -> dict:
        """A 402 challenge's body (wire 7.2), as /refresh-payment answers it too (7.6)."""
        return {
            "payment_params": base64.b64encode(info.SerializeToString()).decode(),
            "orchestrator": self.public_url,
            "manifest_id": manifest,
            "payment_url": payment_url,
        }

    # -- the paid retry (7.3) -------------------------------------------------------------
    def _credentials(self, headers: Mapping[str, str]) -> tuple[net_pb2.Payment, net_pb2.SegData]:
        try:
            payment = decode_payment(headers.get(PAYMENT_HEADER.lower(), ""))
        except BadHeader as exc:
            raise PaymentProblem(402, str(exc)) from None
        try:
            seg = decode_segment(headers.get(SEGMENT_HEADER.lower(), ""))
        except BadHeader:
            raise PaymentProblem(403, "ErrorSegEncoding") from None
        try:  # a Live Runner segment names no capabilities: nothing to be compatible with
            check_segment(seg, payment.sender, self.auth, compatible=True)
        except CredentialsRefused as exc:
            raise PaymentProblem(403, str(exc)) from None
        return payment, seg

    def check_retry(self, price: AppPrice, headers: Mapping[str, str]) -> Paid:
        """Steps 1-4: the payment decodes, the segment is the payer's and carries our
        unexpired token for the manifest it names; a fixed price is the app's exactly."""
        payment, seg = self._credentials(headers)
        manifest = seg.manifest_id.decode(errors="replace")
        if manifest != seg.auth_token.session_id:
            raise PaymentProblem(403, "mismatched manifest and auth token")
        claimed = payment.expected_price
        if price.fixed and (claimed.price_per_unit, claimed.pixels_per_unit) != (price.wei, 1):
            raise PaymentProblem(400, "payment price does not match live runner price")
        frozen = Fraction(claimed.price_per_unit, claimed.pixels_per_unit or 1)
        billed = Billed(payer=payment.sender, price=frozen, unit=price.unit,
                        billed_at=time.time())  # fmt: skip
        return Paid(payment, manifest, billed)

    async def settle(self, paid: Paid, session: Session, route: str, price: AppPrice) -> None:
        """Steps 6-7 for a reserved session: credit the payment; a fixed price is debited
        whole at once. A metered session must hold its first interval's fee: beyond
        go-livepeer, which lets a payment with no tickets run until its first debit, as
        Kubepeer's batch jobs need one ticket's worth. Billing starts now (after any wait
        for a cold app). Raises PaymentProblem (the caller releases the session)."""
        try:
            await self.billing.credit(paid.payment, paid.sid, app_key(route))
        except PaymentRefused as exc:
            raise PaymentProblem(400, str(exc)) from None
        ledger = self.billing.ledger
        balance = await ledger.balance(paid.billed.payer, paid.sid)
        owed = price.wei if price.fixed else fee(units_due(price.unit, self.interval),
                                                 paid.billed.price)  # fmt: skip
        if balance < owed:
            raise PaymentProblem(400, f"insufficient balance, mid={paid.sid}")
        if price.fixed:
            await ledger.charge(paid.billed.payer, paid.sid, price.wei)
        billed = replace(paid.billed, billed_at=time.time())
        first_due = None if price.fixed else billed.billed_at + self.interval
        if not await self.sessions.bill(session, billed, first_due):
            raise PaymentProblem(404, "runner session not found")

    # -- top-ups (7.4) and refresh (7.6) --------------------------------------------------
    async def top_up(self, session: Session, route: str, price: AppPrice,
                     headers: Mapping[str, str]) -> bytes:  # fmt: skip
        """A follow-up payment credited to the session; the PaymentResult's bytes."""
        if session.billed is None or session.billed.unit == "fixed":
            raise PaymentProblem(409, "fixed-price live runner sessions do not accept "
                                      "follow-up payments")  # fmt: skip
        payment, seg = self._credentials(headers)
        if seg.manifest_id.decode(errors="replace") != session.sid:
            raise PaymentProblem(403, "mismatched session and payment manifest")
        try:
            await self.billing.credit(payment, session.sid, app_key(route))
        except PaymentRefused as exc:
            raise PaymentProblem(400, str(exc)) from None
        info = await self._info(payment.sender, route, price, session.sid)
        info.auth_token.CopyFrom(seg.auth_token)  # the token sent, as go-livepeer answers
        return net_pb2.PaymentResult(info=info).SerializeToString()

    async def refresh(self, body: Any, find: Callable[[str], Awaitable[Session | None]],
                      price_of: Callable[[str], AppPrice | None]) -> dict:  # fmt: skip
        """POST /refresh-payment: new params for a session's payer at its recorded price."""
        sender = body.get("sender") if isinstance(body, dict) else None
        if not isinstance(sender, str) or not _ADDRESS.match(sender):
            raise PaymentProblem(400, "invalid sender", as_json=True)
        manifest = body.get("manifest_id")
        if not isinstance(manifest, str) or not manifest:
            raise PaymentProblem(400, "missing manifest_id", as_json=True)
        session = await find(manifest)
        price = price_of(session.route) if session else None
        payer = bytes.fromhex(sender[2:])
        if (session is None or session.billed is None or price is None
                or session.billed.payer != payer):  # fmt: skip
            raise PaymentProblem(409, "fixed price not found for session", as_json=True)
        recorded = session.billed.price
        at = AppPrice(wei=recorded.numerator // recorded.denominator, unit=price.unit)
        info = await self._info(payer, session.route, at, manifest)
        return self._challenge(info, manifest, f"{self.public_url}/payment")

    # -- metering (7.5) -------------------------------------------------------------------
    def debit(self, session: Session, now: float) -> tuple[Session, str, int, float] | None:
        """One interval's debit of a metered session, as `SessionStore.debit_many` takes it:
        floor(rate x elapsed) units at the frozen price, the billed instant moved by the
        billed time (remainders carry). None: nothing is due yet."""
        billed = session.billed
        if billed is None or billed.unit not in RATE:
            return None
        elapsed = now - billed.billed_at
        if elapsed < self.interval:
            return None
        units = units_due(billed.unit, elapsed)
        instant = billed.billed_at + units / RATE[billed.unit]
        return session, balance_key(billed.payer, session.sid), fee(units, billed.price), instant

    async def meter_once(self, now: float, release: Callable[[Session, str], Awaitable[None]],
                         serving: Callable[[Session], bool]) -> None:  # fmt: skip
        """Bill the sessions due now: three round trips however many there are. A session
        whose replica no longer serves it (`serving`) is released, not billed (wire 7.5:
        the loop stops when the runner is not ready)."""
        sids = await self.sessions.due(now, now + self.interval)
        if not sids:
            return
        debits = []
        for sid, session in zip(sids, await self.sessions.get_many(sids), strict=True):
            if session is None:
                await self.sessions.unmeter(sid)
            elif not serving(session):
                await release(session, "its replica no longer serves it")
            elif (debit := self.debit(session, now)) is not None:
                debits.append(debit)
        if not debits:
            return
        done = await self.sessions.debit_many(debits, self.lease)
        for (session, *_), paid in zip(debits, done, strict=True):
            if paid is False:
                await release(session, "its balance ran dry")

    async def meter_forever(self, release: Callable[[Session, str], Awaitable[None]],
                            serving: Callable[[Session], bool]) -> None:  # fmt: skip
        """Every half interval, bill the sessions due; release those that cannot pay."""
        while True:
            await asyncio.sleep(self.interval / 2)
            try:
                await self.meter_once(time.time(), release, serving)
            except asyncio.CancelledError:
                raise
            except Exception:  # Redis away: the sessions stay due, billed next time
                log.exception("metering Live Runner sessions failed; trying again")
