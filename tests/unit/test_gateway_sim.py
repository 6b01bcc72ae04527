"""kubepeer_dev.gateway_sim pays as go-livepeer's gateway does (gateway-wire 2.1, newBalanceUpdate):
enough tickets to bring its credit for the session up to max(fee, ticket EV), none when the
credit already covers that, and its balance is kept per (recipient, auth-token session)."""

from __future__ import annotations

import pytest

from kubepeer.livepeer import net_pb2
from kubepeer_dev.gateway_sim import MAX_WIN_PROB, Gateway, fee, ticket_ev

EV = 8_000_000_000


def info(session: str = "s1", price: tuple[int, int] = (5, 1)) -> net_pb2.OrchestratorInfo:
    face = 2 * EV
    reply = net_pb2.OrchestratorInfo()
    reply.ticket_params.recipient = bytes(20)
    reply.ticket_params.face_value = face.to_bytes(8, "big")
    reply.ticket_params.win_prob = (-(-MAX_WIN_PROB // 2)).to_bytes(32, "big")
    reply.price_info.price_per_unit, reply.price_info.pixels_per_unit = price
    reply.auth_token.session_id = session
    return reply


def test_the_ticket_ev_is_face_value_times_win_probability():
    assert ticket_ev(info()) == EV


@pytest.mark.parametrize(
    ("units", "tickets"),
    [(1, 1), (EV // 5, 1), (EV // 5 + 1, 2), (4096 * 1000, 1), (3 * EV // 5, 3)],
)
def test_a_job_is_paid_with_the_tickets_that_cover_max_fee_and_ev(units, tickets):
    assert Gateway().tickets_for(info(), units) == tickets


def test_credit_left_in_a_session_pays_for_the_next_job_and_a_new_session_starts_at_zero():
    gateway, session = Gateway(), info("s1")
    units = EV // 5 + EV // 10  # a fee of 1.5 EV: two tickets, half an EV left over
    assert gateway.tickets_for(session, units) == 2
    gateway.paid(session, 2, fee(units, session))
    assert gateway.tickets_for(session, EV // 10) == 1  # 0.5 EV fee, but max(fee, EV) = EV
    gateway.paid(session, 1, fee(EV // 10, session))
    assert gateway.tickets_for(session, EV // 10) == 0  # credit 1 EV covers max(0.5, 1) EV
    assert gateway.tickets_for(info("s2"), EV // 10) == 1  # another session: no credit


def test_a_refused_job_keeps_the_credit_its_tickets_bought():
    gateway, session = Gateway(), info()
    gateway.paid(session, 3, None)  # the orchestrator took the payment, the job failed
    assert gateway.tickets_for(session, 2 * EV // 5) == 0  # 2 EV fee, 3 EV credited
