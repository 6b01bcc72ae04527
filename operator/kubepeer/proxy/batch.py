"""A batch job, from its request to its reply, in jobs.py's steps (go-livepeer's order).

Most jobs wait for nothing but their runner: a JSON body, a model with a slot free, a
kept-alive connection to the runner idle. `BatchJob.start` takes every step it can at once
and posts the job with `RunnerClient.fetch`, whose callback shapes the reply and hands it
to `respond`: from the gateway's last byte to the runner and from the runner's last byte
to the gateway, no task, future or turn of the event loop (hack/bench/proxy.py, against a
task per job in the same runs: 5 to 20% less CPU per job). A job that must wait (a
multipart body, an OnDemand model to wake, a queue for a slot, a runner gone before
answering, an llm stream, an image-to-video encode) goes on in a task, `_rest`: the same
steps, awaited, from the first that `start` did not take.

A job holds a slot, a demand record and the in-flight gauge from admission to `_end`, which
runs once: before a whole reply is given (the slot is free for the next job at once), and
for a stream when the server calls the reply's `sent()`, which it does even when the
gateway left before the stream began.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any

import orjson
from redis.exceptions import RedisError

from kubepeer.contracts.price_table import ServedModel
from kubepeer.livepeer import net_pb2
from kubepeer.livepeer.capabilities import Pipeline
from kubepeer.livepeer.wire import AI_WORKER_AUTHORIZATION
from kubepeer.payments.ledger import manifest_id
from kubepeer.proxy import metrics
from kubepeer.proxy.billing import PaymentRefused
from kubepeer.proxy.http1 import Reply, Respond
from kubepeer.proxy.jobs import (
    INSUFFICIENT_CAPACITY,
    JSON_PIPELINES,
    STORE_UNAVAILABLE,
    JobRefused,
    JobRequest,
    decode_fields,
    decode_json,
    runner_error,
)
from kubepeer.proxy.results import shape_reply
from kubepeer.proxy.routing import NoCapacity, Slot
from kubepeer.proxy.units import UnitsError, billed_units
from kubepeer.proxy.upstream import Answer, RunnerBroken, RunnerUnreachable

if TYPE_CHECKING:
    from kubepeer.proxy.app import Proxy

log = logging.getLogger("kubepeer.proxy")

SERVER_ERROR = b"Internal Server Error"
_PIPELINES = {f"/{pipeline.value}": pipeline for pipeline in Pipeline}  # by route

# Writes a job's log line: (message, fields). By default through `logging`; `kubepeer proxy`
# gives main.JobLines, the same JSON line for less CPU.
JobLog = Callable[[str, dict[str, Any]], None]


class BatchJob:
    """One job: what its steps found so far, and the slot, demand and gauge it holds until
    `_end`. Made per request by `Proxy.lean_job` (HTTP/1.1) or `Proxy.job` (ASGI)."""

    __slots__ = (
        "_ended",
        "_headers",
        "_upstream",
        "held",
        "in_flight",
        "model",
        "outcome",
        "paid",
        "path",
        "payment",
        "proxy",
        "request",
        "respond",
        "units",
        "woke",
    )  # fmt: skip

    def __init__(self, proxy: Proxy, path: str, headers: Mapping[str, str],
                 respond: Respond) -> None:  # fmt: skip
        """`headers` by lowercased name (`app.header_map`); `respond` is called once."""
        self.proxy = proxy
        self.path = path
        self._headers = headers
        self.respond = respond
        self.outcome = _Outcome(_PIPELINES[path], proxy.job_log)
        self.outcome.request_id = headers.get("x-request-id") or secrets.token_hex(8)
        self.request: JobRequest | None = None  # steps 0 to 3 passed
        self.payment: net_pb2.Payment | None = None
        self.units = 0
        self.model: ServedModel | None = None  # the AIModel chosen; its demand recorded
        self.woke: Awaitable[bool] | None = None  # the demand record's answer (OnDemand)
        self.held: list[Slot] = []  # the runner slot, once admitted and credited
        self.paid: Any = None  # the payment as billing credited it
        self.in_flight: Any = None  # the model's gauge, raised while the job is on a runner
        self._upstream: Answer | None = None  # an llm stream's answer, read by the reply
        self._ended = False

    # -- the way with no waiting ---------------------------------------------------------
    def start(self, body: bytes) -> None:
        """Take every step that needs no waiting, then post the job to its runner, its reply
        given from the answer's callback; a step that must wait hands the rest to a task."""
        self._settle(self._at_once, body)

    def _at_once(self, body: bytes) -> Reply | None:
        """Steps 0 to 6, and the job posted to its runner. Its reply comes later (from the
        answer's callback, or from a task), so this gives None; a refusal is raised."""
        slot = None
        if self.outcome.pipeline in JSON_PIPELINES:  # (a multipart body: an async parser's)
            request = self._check(body, decode_json(body))
            model = self._choose()
            if not model.on_demand and not request.streams:  # (may wake it; a stream)
                slot = self.proxy.router.try_reserve(model)  # (None: in line for one)
        if slot is None:
            self._go_on(self._rest(body))
            return None
        self.held.append(slot)
        self._credit()
        assert self.proxy.runners is not None
        self.proxy.runners.fetch(slot.url, self.path, body, self._runner_headers(), self._answered)
        return None

    def refuse(self, refused: JobRefused) -> None:
        """Refuse the job before it starts (a body past the limit, read by the ASGI path)."""
        self._answer(self._refusal(refused))

    def fail(self) -> None:
        """Answer 500: the job failed in a way the gateway is told nothing more of."""
        self._answer(Reply(500, _TEXT, SERVER_ERROR))

    def _answered(self, answer: Answer) -> None:
        """fetch's callback: the runner's whole answer, or why there is none."""
        self._settle(self._on_answer, answer)

    def _on_answer(self, answer: Answer) -> Reply | None:
        error = answer.error
        if isinstance(error, RunnerUnreachable):  # nothing done: once more elsewhere
            self._go_on(self._retried(self.held[0].url, error))
            return None
        raw = answer.body()  # (releases its connection)
        return self._shape(self._runner_json(answer.status, raw, error))

    def _settle(self, step: Callable[[Any], Reply | None], arg: Any) -> None:
        """Run a step, and answer the reply it gives (None: the job goes on elsewhere); a
        refusal or a failure is the reply too."""
        try:
            reply = step(arg)
        except JobRefused as exc:
            reply = self._refusal(exc)
        except RedisError as exc:
            reply = self._store_unavailable(exc)
        except Exception:
            log.exception("job failed")
            self.fail()
            return
        if reply is not None:
            self._answer(reply)

    # -- the way that waits --------------------------------------------------------------
    def _go_on(self, rest: Coroutine[Any, Any, Reply]) -> None:
        """Finish the job in a task (kept by the proxy until it is done)."""
        task = asyncio.get_running_loop().create_task(self._later(rest))
        self.proxy.jobs.add(task)
        task.add_done_callback(self.proxy.jobs.discard)

    async def _later(self, rest: Coroutine[Any, Any, Reply]) -> None:
        try:
            reply = await rest
        except JobRefused as exc:
            reply = self._refusal(exc)
        except asyncio.CancelledError:
            # The proxy is stopping, past its graceful timeout (Proxy's lifespan cancels the
            # jobs left): the gateway may try another orchestrator, as for a full one.
            self._answer(self._refusal(JobRefused(503, INSUFFICIENT_CAPACITY)))
            raise
        except RedisError as exc:
            reply = self._store_unavailable(exc)
        except Exception:
            log.exception("job failed")
            reply = Reply(500, _TEXT, SERVER_ERROR)
        self._answer(reply)

    def _store_unavailable(self, exc: RedisError) -> Reply:
        """Redis is out of reach: 503, which a gateway takes as full, not as broken."""
        log.warning("job refused: Redis is unavailable (%s)", exc)
        return self._refusal(JobRefused(503, STORE_UNAVAILABLE))

    async def _rest(self, body: bytes) -> Reply:
        """The steps `start` did not take, awaited, from the first of them."""
        pipeline = self.outcome.pipeline
        if self.request is None:
            content_type = self._headers.get("content-type", "")
            self._check(body, await decode_fields(pipeline, content_type, body))
        model = self.model or self._choose()
        if self.woke is not None and await self.woke:
            await self.proxy._wake(model, force=True)  # the operator is putting it to sleep
        self.held.append(await self.proxy._admit(model))
        self._credit()
        return await self._reply(await self._send())

    async def _retried(self, url: str, error: RunnerUnreachable) -> Reply:
        tried: list[str] = []
        await self._elsewhere(url, error, tried)
        return await self._reply(await self._send(tried))

    async def _send(self, tried: list[str] | None = None) -> Answer:
        """POST the job to the held slot's runner; once more elsewhere if that runner is gone."""
        assert self.request is not None
        assert self.proxy.runners is not None
        tried = [] if tried is None else tried
        while True:
            url = self.held[0].url
            try:
                return await self.proxy.runners.post(
                    url, self.path, self.request.body, self._runner_headers()
                )
            except RunnerUnreachable as exc:
                await self._elsewhere(url, exc, tried)
            except RunnerBroken as exc:
                raise JobRefused(
                    500, f"{self.outcome.pipeline.value} container failed: {exc}"
                ) from None

    async def _elsewhere(self, url: str, error: RunnerUnreachable, tried: list[str]) -> None:
        """`url`'s runner went before answering: its slot back, and (once) a slot on another."""
        tried.append(url)
        log.warning("runner %s failed before answering (%s)", url, error)
        assert self.model is not None
        self.proxy.router.release(self.held.pop(), self.model)
        if len(tried) > 1:
            raise JobRefused(500, f"{self.outcome.pipeline.value} container failed: {error}")
        try:
            self.held.append(await self.proxy.router.reserve(
                self.model, timeout=self.proxy.config.queue_timeout, exclude=tried))  # fmt: skip
        except NoCapacity:
            raise JobRefused(503, INSUFFICIENT_CAPACITY) from None

    async def _reply(self, upstream: Answer) -> Reply:
        assert self.request is not None
        if self.request.streams and upstream.status == 200:
            self._debit()
            self._upstream = upstream
            return Reply(200, b"text/event-stream", stream=_events(upstream))
        error = None
        try:
            raw = await upstream.read()
        except RunnerBroken as exc:
            raw, error = b"", exc
        finally:
            upstream.release()
        data = self._runner_json(upstream.status, raw, error)
        if self.outcome.pipeline is Pipeline.IMAGE_TO_VIDEO:  # H.264: off the event loop
            return await asyncio.to_thread(self._shape, data)
        return self._shape(data)

    def _runner_json(self, status: int, raw: bytes, error: Exception | None) -> bytes:
        """Steps 7 and 8 for a whole answer (`error`: why it broke off): its JSON to shape,
        debited, or the refusal that tells the gateway what the runner did."""
        pipeline = self.outcome.pipeline
        if status == 0:
            raise JobRefused(500, f"{pipeline.value} container failed: {error}")
        if status != 200:
            raw = raw if error is None else str(error).encode()
            raise JobRefused(500, runner_error(pipeline, status, raw))
        self._debit()
        if error is not None:
            raise JobRefused(500, self._bad_json(error))
        return raw

    # -- the steps -----------------------------------------------------------------------
    def _check(self, body: bytes, fields: dict[str, Any]) -> JobRequest:
        """Steps 1 to 3 of a decoded job: payment (402), credentials (403), units (400)."""
        pipeline = self.outcome.pipeline
        content_type = self._headers.get("content-type", "")
        self.payment = self.proxy._check_credentials(self._headers)
        try:
            self.units = billed_units(pipeline, fields)
        except UnitsError as exc:
            raise JobRefused(400, str(exc)) from None
        self.request = JobRequest(pipeline, body, content_type, fields)
        return self.request

    def _choose(self) -> ServedModel:
        """Which AIModel takes the job (503 if none serves its model); its demand counted
        from now (a held job keeps its model awake) to the job's end."""
        assert self.request is not None
        serving = self.proxy.catalogue().serving(self.outcome.pipeline, self.request.model_id)
        if not serving:
            raise JobRefused(503, INSUFFICIENT_CAPACITY)
        model = self.model = self.proxy.router.choose(serving)
        self.woke = self.proxy.demand.start(model, self.outcome.request_id)
        return model

    def _credit(self) -> None:
        """Steps 5 and 6, with a slot held: the payment credited and the balance checked.
        Then the job is on its runner (the in-flight gauge)."""
        model = self.model
        assert model is not None
        if self.payment is not None and self.proxy.billing is not None:
            try:
                manifest = manifest_id(model.capability, model.model_id)
                priced = model.charges(self.payment.sender)
                paid = self.proxy.billing.admit(self.payment, manifest, manifest, priced=priced)
                self.paid = (paid, manifest)
            except PaymentRefused as exc:
                raise JobRefused(exc.status, str(exc)) from None
        self.outcome.model_label = model.aimodel
        self.in_flight = metrics.child(metrics.IN_FLIGHT, model.aimodel)
        self.in_flight.inc()

    def _debit(self) -> None:
        """Step 8: the runner answered 200. The fee at the payment's expected price."""
        model = self.model
        assert model is not None
        fee = 0
        if self.paid is not None and self.proxy.billing is not None:
            paid, manifest = self.paid
            fee = self.proxy.billing.debit(paid, manifest, self.units)
            metrics.child(metrics.FEES, model.aimodel).inc(fee)
        self.outcome.served = {"model": model.model_id, "runner": self.held[0].url,
                               "units": self.units, "fee_wei": fee}  # fmt: skip

    def _runner_headers(self) -> dict[str, str]:
        assert self.request is not None
        headers = {"Content-Type": self.request.content_type}
        if self.proxy.config.runner_token:
            headers["Authorization"] = f"Bearer {self.proxy.config.runner_token}"
        return headers

    def _shape(self, data: bytes) -> Reply:
        """The gateway's reply from the runner's JSON: media as result URLs for a gateway
        that asks (Livepeer-AI-Worker), else data URLs; only the fields its types know."""
        assert self.request is not None
        try:
            body = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise JobRefused(500, self._bad_json(exc)) from None
        store = None
        if self._headers.get("authorization") == AI_WORKER_AUTHORIZATION:
            store = self.proxy._storer(self.outcome.request_id)
        reply = shape_reply(self.outcome.pipeline, body, self.request.fields, store)
        return Reply(200, b"application/json",
                     orjson.dumps(reply, option=orjson.OPT_APPEND_NEWLINE))  # fmt: skip

    def _bad_json(self, error: Exception) -> str:
        return f"{self.outcome.pipeline.value} container returned bad JSON: {error}"

    # -- the end -------------------------------------------------------------------------
    def _refusal(self, refused: JobRefused) -> Reply:
        self.outcome.refused = refused
        return Reply(refused.status, _TEXT, refused.text.encode() + b"\n")

    def _answer(self, reply: Reply) -> None:
        """Give the reply. A whole one ends the job first (its slot is free for the next);
        a stream's ends once it is sent."""
        if reply.stream is None:
            self._end()
        reply.headers.append((b"x-request-id", self.outcome.request_id.encode("latin-1")))
        reply.after = self._sent
        self.respond(reply)

    def _sent(self, status: int) -> None:
        self._end()
        self.outcome.record(status)

    def _end(self) -> None:
        """Give back what the job holds: its slot, its demand record, the gauge. Once."""
        if self._ended:
            return
        self._ended = True
        if self._upstream is not None:
            self._upstream.release()
        if self.in_flight is not None:
            self.in_flight.dec()
        model = self.model
        if model is not None:
            self.proxy.demand.end(model, self.outcome.request_id)
            for slot in self.held:
                self.proxy.router.release(slot, model)


_TEXT = b"text/plain; charset=utf-8"


async def _events(upstream: Answer) -> AsyncIterator[bytes]:
    """llm SSE, chunk by chunk, until the chunk with a finish_reason; no [DONE]."""
    try:
        async for line in upstream.lines():
            text = line.strip()
            if not text.startswith(b"data:"):
                continue
            data = text[5:].strip()
            if data == b"[DONE]":
                break
            yield b"data: " + data + b"\n\n"
            if _finished(data):
                break
    finally:
        upstream.release()


def _finished(data: bytes) -> bool:
    try:
        choices = orjson.loads(data).get("choices") or [{}]
    except (orjson.JSONDecodeError, AttributeError):
        return False
    return bool(choices[0].get("finish_reason"))


class _Outcome:
    """What a batch job's end counts and logs, after its answer is sent."""

    __slots__ = ("log", "model_label", "pipeline", "refused", "request_id", "served", "started")

    def __init__(self, pipeline: Pipeline, job_log: JobLog) -> None:
        self.started = time.monotonic()
        self.log = job_log
        self.pipeline = pipeline
        self.request_id = ""
        self.model_label = pipeline.value  # the AIModel once one is chosen
        self.served: dict[str, Any] | None = None
        self.refused: JobRefused | None = None

    def record(self, status: int) -> None:
        metrics.child(metrics.REQUESTS, self.model_label, str(status)).inc()
        metrics.child(metrics.LATENCY, self.model_label).observe(time.monotonic() - self.started)
        job = {"request_id": self.request_id, "pipeline": self.pipeline.value}
        if self.refused is not None:
            self.log("job refused", {**job, "status": self.refused.status,
                                     "reason": self.refused.text})  # fmt: skip
        elif self.served is not None:
            self.log("job served", {**job, **self.served})
