"""A batch job, top to bottom, in go-livepeer's order (jobs.py's steps): `serve`.

Each step's logic lives in its own module and knows nothing of the proxy:

    0      body decoded                 jobs.decode_fields                 400
    1, 2   payment and credentials      admission.check_credentials        402, 403 (401)
    3      billed units                 units.billed_units                 400
    4      an AIModel and a slot        activation.Activation              503
    5, 6   payment credited, balance    billing.Billing.admit              400
    7      the runner answers           upstream.RunnerClient              500
    8      fee debited, reply shaped    billing.Billing.debit, results     500 (bad JSON)

`serve` gets those collaborators as one typed `JobContext`, never the proxy. A paid job
makes two Redis round trips: its credit (step 5) and, before its reply, one pipeline with
its fee and its result files (step 8).

A job holds a slot, a demand record and the in-flight gauge from step 4 to `Job.end`, which
runs once: before a whole reply is given (the slot is free for the next job at once), and
for a stream when the server calls the reply's `sent()`, which it does even when the
gateway left before the stream began. `run` gives the reply, a refusal included, to
`respond`, exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio.client import Pipeline as AsyncPipeline
from redis.exceptions import RedisError

from kubepeer.contracts.price_table import ServedModel
from kubepeer.livepeer import net_pb2
from kubepeer.livepeer.capabilities import Pipeline
from kubepeer.livepeer.wire import AI_WORKER_AUTHORIZATION
from kubepeer.payments.ledger import manifest_id
from kubepeer.payments.validator import ValidPayment
from kubepeer.proxy import metrics
from kubepeer.proxy.activation import Activation
from kubepeer.proxy.admission import Door, check_credentials
from kubepeer.proxy.billing import Billing, PaymentRefused
from kubepeer.proxy.catalogue import Catalogue
from kubepeer.proxy.discovery import Offered
from kubepeer.proxy.http1 import Reply, Respond
from kubepeer.proxy.jobs import (
    INSUFFICIENT_CAPACITY,
    STORE_UNAVAILABLE,
    JobRefused,
    JobRequest,
    decode_fields,
    runner_error,
)
from kubepeer.proxy.results import ResultStore, shape_reply
from kubepeer.proxy.routing import Slot
from kubepeer.proxy.units import UnitsError, billed_units
from kubepeer.proxy.upstream import Answer, RunnerBroken, RunnerClient, RunnerUnreachable

log = logging.getLogger("kubepeer.proxy")

PIPELINES = {f"/{pipeline.value}": pipeline for pipeline in Pipeline}  # by route
SERVER_ERROR = b"Internal Server Error"
_TEXT = b"text/plain; charset=utf-8"

# Writes a job's log line: (message, fields). By default through `logging`; `kubepeer proxy`
# gives main.JobLines, the same JSON line for less CPU.
JobLog = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True, slots=True)
class JobContext:
    """What a job needs, each collaborator with one concern."""

    door: Door  # steps 1 and 2
    offered: Callable[[], Offered]  # what discovery offers now (rebuilt on change only)
    catalogue: Callable[[], Catalogue]  # which AIModels serve which model
    activation: Activation  # step 4, and the demand records
    billing: Billing | None  # steps 5, 6 and 8 (None: payments off)
    runners: RunnerClient  # step 7
    results: ResultStore  # step 8's result files, on the job's write pipeline
    public_url: str  # the host of result URLs
    runner_token: str | None  # the runners' AUTH_TOKEN


class Job:
    """One job: its request's headers (by lowercased name), what it holds from step 4 to
    its end, and what its end counts and logs."""

    __slots__ = (
        "_ended",
        "activation",
        "cold",
        "headers",
        "in_flight",
        "log",
        "model",
        "model_label",
        "path",
        "pipeline",
        "refused",
        "request_id",
        "served",
        "slot",
        "started",
        "upstream",
        "woke",
    )  # fmt: skip

    def __init__(self, path: str, headers: Mapping[str, str], activation: Activation,
                 job_log: JobLog) -> None:  # fmt: skip
        self.path = path
        self.log = job_log
        self.pipeline = PIPELINES[path]
        self.headers = headers
        self.activation = activation
        self.request_id = headers.get("x-request-id") or secrets.token_hex(8)
        self.started = time.monotonic()
        self.model: ServedModel | None = None  # chosen at step 4; its demand recorded
        self.model_label = self.pipeline.value  # the AIModel's name once one is chosen
        self.woke: Any = None  # the demand record's answer (OnDemand models)
        self.cold = False  # its model had no ready replica when it was chosen
        self.slot: Slot | None = None
        self.in_flight: Any = None  # the model's gauge, raised while the job is on a runner
        self.upstream: Answer | None = None  # an llm stream's answer, read by the reply
        self.served: dict[str, Any] | None = None
        self.refused: JobRefused | None = None
        self._ended = False

    def take(self, model: ServedModel) -> ServedModel:
        """The job is `model`'s: its demand counted from now (a held job keeps it awake)."""
        self.model = model
        self.woke = self.activation.demand.start(model, self.request_id)
        return model

    def running(self) -> None:
        assert self.model is not None
        self.model_label = self.model.aimodel
        self.in_flight = metrics.child(metrics.IN_FLIGHT, self.model.aimodel)
        self.in_flight.inc()

    def end(self) -> None:
        """Give back what the job holds: its slot, its demand record, the gauge. Once."""
        if self._ended:
            return
        self._ended = True
        if self.upstream is not None:
            self.upstream.release()
        if self.in_flight is not None:
            self.in_flight.dec()
        if self.model is not None:
            self.activation.demand.end(self.model, self.request_id)
            if self.slot is not None:
                self.activation.release(self.slot, self.model)


# -- the job -----------------------------------------------------------------------------
async def serve(ctx: JobContext, job: Job, body: bytes) -> Reply:
    """The job's reply, in go-livepeer's order; a refusal is raised (JobRefused)."""
    content_type = job.headers.get("content-type", "")
    fields = await decode_fields(job.pipeline, content_type, body)  # 0
    payment = check_credentials(job.headers, ctx.door, ctx.offered())  # 1, 2
    try:
        units = billed_units(job.pipeline, fields)  # 3
    except UnitsError as exc:
        raise JobRefused(400, str(exc)) from None
    request = JobRequest(job.pipeline, body, content_type, fields)
    serving = ctx.catalogue().serving(job.pipeline, request.model_id)
    model = job.take(ctx.activation.choose(serving))  # 4: the AIModel
    job.cold = model.on_demand and not ctx.activation.router.ready(model)
    if job.cold:
        metrics.child(metrics.COLD_JOBS, model.aimodel).inc()
    job.slot = await ctx.activation.slot(model, job.woke)  # 4: a slot on one of its runners
    paid = await credit(ctx, model, payment)  # 5, 6
    job.running()
    answer = await on_runner(ctx, job, request)  # 7
    return await results(ctx, job, request, answer, paid, units)  # 8


Paid = tuple[ValidPayment, str]  # the payment as credited, and its manifest


async def credit(ctx: JobContext, model: ServedModel,
                 payment: net_pb2.Payment | None) -> Paid | None:  # fmt: skip
    """Steps 5 and 6: the payment credited, and the balance checked, for `model`."""
    if payment is None or ctx.billing is None:
        return None
    manifest = manifest_id(model.capability, model.model_id)
    try:
        valid = await ctx.billing.admit(payment, manifest, manifest,
                                        priced=model.charges(payment.sender))  # fmt: skip
    except PaymentRefused as exc:
        raise JobRefused(exc.status, str(exc)) from None
    return valid, manifest


async def on_runner(ctx: JobContext, job: Job, request: JobRequest) -> Answer:
    """Step 7: the job POSTed to its slot's runner; to another once if that runner went
    before answering (nothing was done there)."""
    assert job.model is not None
    assert job.slot is not None
    headers = {"Content-Type": request.content_type}
    if ctx.runner_token:
        headers["Authorization"] = f"Bearer {ctx.runner_token}"
    tried: list[str] = []
    while True:
        url = job.slot.url
        try:
            return await ctx.runners.post(url, job.path, request.body, headers)
        except RunnerUnreachable as exc:
            log.warning("runner %s failed before answering (%s)", url, exc)
            tried.append(url)
            ctx.activation.release(job.slot, job.model)
            job.slot = None
            if len(tried) > 1:
                raise JobRefused(500, f"{job.pipeline.value} container failed: {exc}") from None
            job.slot = await ctx.activation.elsewhere(job.model, tried)
        except RunnerBroken as exc:
            raise JobRefused(500, f"{job.pipeline.value} container failed: {exc}") from None


async def results(ctx: JobContext, job: Job, request: JobRequest, upstream: Answer,
                  paid: Paid | None, units: int) -> Reply:  # fmt: skip
    """Step 8: the runner's answer. On success the fee is debited (with the result files,
    one round trip, before the reply); an error answer is passed on as go-livepeer words it."""
    writes = ctx.results.redis.pipeline(transaction=False)
    if request.streams and upstream.status == 200:
        job.upstream = upstream  # (released at the job's end, however it ends)
        debit(ctx, job, writes, paid, units)
        await _sent(writes)
        return Reply(200, b"text/event-stream", stream=_events(upstream))
    error = None
    try:
        raw = await upstream.read()
    except RunnerBroken as exc:
        raw, error = b"", exc
    finally:
        upstream.release()
    if upstream.status != 200:
        raw = raw if error is None else str(error).encode()
        raise JobRefused(500, runner_error(job.pipeline, upstream.status, raw))
    debit(ctx, job, writes, paid, units)
    try:
        if error is not None:
            raise JobRefused(500, _bad_json(job.pipeline, error))
        store = None
        if job.headers.get("authorization") == AI_WORKER_AUTHORIZATION:
            store = _storer(ctx, writes, job.request_id)
        if job.pipeline is Pipeline.IMAGE_TO_VIDEO:  # H.264: off the event loop
            return await asyncio.to_thread(_shape, job.pipeline, raw, request.fields, store)
        return _shape(job.pipeline, raw, request.fields, store)
    finally:
        await _sent(writes)  # the fee, even for a reply that then fails


def debit(ctx: JobContext, job: Job, writes: AsyncPipeline, paid: Paid | None,
          units: int) -> None:  # fmt: skip
    """The runner answered 200: the fee at the payment's expected price, on `writes`."""
    assert job.model is not None
    assert job.slot is not None
    fee = 0
    if paid is not None and ctx.billing is not None:
        fee = ctx.billing.debit(writes, *paid, units)
        metrics.child(metrics.FEES, job.model.aimodel).inc(fee)
    job.served = {"model": job.model.model_id, "runner": job.slot.url, "units": units,
                  "fee_wei": fee}  # fmt: skip
    # Its earnings with its fee (one round trip) when it has writes to send anyway.
    ctx.activation.demand.served(job.model.aimodel, fee, job.cold, writes if len(writes) else None)


async def _sent(writes: AsyncPipeline) -> None:
    if len(writes):
        await writes.execute()


def _storer(ctx: JobContext, writes: AsyncPipeline, request_id: str) -> Callable[[str, bytes], str]:
    base = ctx.public_url.rstrip("/")

    def store(content_type: str, data: bytes) -> str:
        name = ctx.results.stage(writes, request_id, content_type, data)
        return f"{base}/stream/{request_id}/{name}"

    return store


def _shape(pipeline: Pipeline, data: bytes, fields: dict[str, Any],
           store: Callable[[str, bytes], str] | None) -> Reply:  # fmt: skip
    """The gateway's reply from the runner's JSON: media as result URLs for a gateway
    that asks (Livepeer-AI-Worker), else data URLs; only the fields its types know."""
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise JobRefused(500, _bad_json(pipeline, exc)) from None
    reply = shape_reply(pipeline, body, fields, store)
    return Reply(200, b"application/json", orjson.dumps(reply, option=orjson.OPT_APPEND_NEWLINE))


def _bad_json(pipeline: Pipeline, error: Exception) -> str:
    return f"{pipeline.value} container returned bad JSON: {error}"


# -- the reply ---------------------------------------------------------------------------
async def run(ctx: JobContext, job: Job, body: bytes, respond: Respond) -> None:
    """Serve the job and give its reply to `respond`: a refusal, Redis out of reach (503,
    which gateways take as full), or a failure (500) included."""
    try:
        reply = await serve(ctx, job, body)
    except JobRefused as exc:
        reply = refusal(job, exc)
    except RedisError as exc:
        log.warning("job refused: Redis is unavailable (%s)", exc)
        reply = refusal(job, JobRefused(503, STORE_UNAVAILABLE))
    except asyncio.CancelledError:
        # The proxy is stopping, past its graceful timeout (its lifespan cancels the jobs
        # left): the gateway may try another orchestrator, as for a full one.
        give(job, refusal(job, JobRefused(503, INSUFFICIENT_CAPACITY)), respond)
        raise
    except Exception:
        log.exception("job failed")
        reply = failure()
    give(job, reply, respond)


def refusal(job: Job, refused: JobRefused) -> Reply:
    job.refused = refused
    return Reply(refused.status, _TEXT, refused.text.encode() + b"\n")


def failure() -> Reply:
    """500: the job failed in a way the gateway is told nothing more of."""
    return Reply(500, _TEXT, SERVER_ERROR)


def give(job: Job, reply: Reply, respond: Respond) -> None:
    """Give the reply. A whole one ends the job first (its slot is free for the next);
    a stream's ends once it is sent. The job is counted and logged once it is sent."""
    if reply.stream is None:
        job.end()
    reply.headers.append((b"x-request-id", job.request_id.encode("latin-1")))
    reply.after = lambda status: _record(job, status)
    respond(reply)


def _record(job: Job, status: int) -> None:
    job.end()
    metrics.child(metrics.REQUESTS, job.model_label, str(status)).inc()
    metrics.child(metrics.LATENCY, job.model_label).observe(time.monotonic() - job.started)
    line = {"request_id": job.request_id, "pipeline": job.pipeline.value}
    if job.refused is not None:
        job.log("job refused", {**line, "status": job.refused.status,
                                "reason": job.refused.text})  # fmt: skip
    elif job.served is not None:
        job.log("job served", {**line, **job.served})


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
