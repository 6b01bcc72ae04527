"""What every pipeline shares: errors in ai-runner's format, the device, the queue in front
of it, how a failure is classified (bad input, out of memory, a broken device), media
decoding and encoding."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Security
from fastapi.security import HTTPBearer
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from kubepeer_runner.config import Limits

T = TypeVar("T")


class RunnerError(HTTPException):
    """An error a client sees as {"detail": {"msg": ...}} with this status.

    A Starlette HTTPException so that FastAPI lets it through when it is raised while the
    request body is still being read (the upload size limit), instead of making it a 400."""

    def __init__(self, status: int, msg: str) -> None:
        super().__init__(status, msg)
        self.status, self.msg = status, msg


def bad_request(msg: str) -> RunnerError:
    return RunnerError(400, msg)


@dataclass(frozen=True)
class Device:
    """Where inference runs: CUDA in fp16 (bf16 when asked), else the CPU in fp32."""

    name: str
    dtype: Any

    @classmethod
    def pick(cls, bfloat16: bool = False) -> Device:
        import torch

        if torch.cuda.is_available():
            return cls("cuda", torch.bfloat16 if bfloat16 else torch.float16)
        return cls("cpu", torch.float32)


# Text torch and the CUDA libraries put in the errors of a device that is no longer usable
# (a sticky CUDA error poisons the whole process; only a restart clears it).
DEVICE_FAULTS = (
    "CUDA error",
    "device-side assert",
    "CUBLAS_STATUS",
    "CUDNN_STATUS",
    "cuDNN error",
    "illegal memory access",
    "NCCL error",
    "ECC error",
)


@dataclass(frozen=True)
class Failure:
    """What an exception raised by inference means: the client's answer, and for the runner
    whether the device is out of memory or broken."""

    error: RunnerError
    out_of_memory: bool = False
    device_fault: bool = False


def classify(exc: BaseException) -> Failure:
    if isinstance(exc, RunnerError):
        return Failure(exc)
    text = f"{type(exc).__name__}: {exc}"
    if type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc):
        return Failure(RunnerError(500, "out of memory: try fewer or smaller outputs"), True)
    if isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in DEVICE_FAULTS):
        return Failure(RunnerError(500, f"device failure: {text}"), device_fault=True)
    if isinstance(exc, (ValueError, TypeError)):
        # The pipelines raise these for arguments they cannot use: the request's fault.
        return Failure(bad_request(f"invalid request: {text}"))
    return Failure(RunnerError(500, f"inference failed: {text}"))


class DeviceHealth:
    """Whether the device still works: a device fault, or too many out-of-memory failures
    in a row, break it for good (health ERROR, so the liveness probe restarts the pod)."""

    def __init__(self, max_consecutive_oom: int) -> None:
        self.max_consecutive_oom = max_consecutive_oom
        self.consecutive_oom = 0
        self.broken: str | None = None

    def record(self, failure: Failure | None) -> None:
        if failure is None:
            self.consecutive_oom = 0
        elif failure.device_fault:
            self.broken = failure.error.msg
        elif failure.out_of_memory:
            self.consecutive_oom += 1
            if self.consecutive_oom >= self.max_consecutive_oom:
                self.broken = f"{self.consecutive_oom} out-of-memory failures in a row"


class DeviceQueue:
    """One inference at a time on the device, in one thread; the others wait their turn in
    arrival order, each for at most `timeout` seconds (then a 500: never an undocumented 503).

    How many may wait is the admission's business (Runner.admit): `capacity` per model."""

    def __init__(
        self,
        health: DeviceHealth,
        timeout: float,
        observe: Callable[[float], object] = lambda seconds: None,
    ) -> None:
        self.health, self.timeout, self.observe = health, timeout, observe
        self._lock = asyncio.Lock()
        # Always the same thread: torch runs measurably slower when the calling thread
        # changes from one inference to the next (hack/bench/runner.py shows it).
        self._device_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="device")

    def submit(self, fn: Callable[[], object]) -> None:
        """Run fn in the device thread, ahead of any request (model loading)."""
        self._device_thread.submit(fn)

    def _in_device_thread(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        return asyncio.get_running_loop().run_in_executor(self._device_thread, fn, *args)

    async def _take_device(self) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self._lock.acquire()
        except TimeoutError:
            raise RunnerError(
                500, f"timed out after {self.timeout:g} s waiting for the device"
            ) from None

    def _guarded(self, fn: Callable[..., T], *args: Any) -> T:
        """Run inference in the device thread; classify a failure and record what it says
        about the device."""
        if self.health.broken:
            raise RunnerError(500, f"device unusable: {self.health.broken}")
        started = time.perf_counter()
        try:
            result = fn(*args)
        except Exception as exc:
            failure = classify(exc)
            self.health.record(failure)
            if failure.out_of_memory:
                _release_cached_memory()
            raise failure.error from None
        finally:
            self.observe(time.perf_counter() - started)
        self.health.record(None)
        return result

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        await self._take_device()
        work = self._in_device_thread(self._guarded, fn, *args)
        try:
            return await asyncio.shield(work)
        finally:
            # A client that hangs up does not stop the GPU: keep the device locked until
            # the inference really ends, so two never overlap.
            if work.done():
                self._lock.release()
            else:
                work.add_done_callback(lambda _: self._lock.release())

    async def stream(self, fn: Callable[..., None], *args: Any) -> AsyncIterator[Any]:
        """Like run, for a `fn(emit, *args)` that emits items as it goes; yields them."""
        await self._take_device()
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[Any] = asyncio.Queue()
        done = object()

        def emit(item: Any) -> None:
            loop.call_soon_threadsafe(items.put_nowait, item)

        def work() -> None:
            try:
                self._guarded(fn, emit, *args)
            except Exception as exc:
                emit(exc)
            finally:
                emit(done)

        worker = self._in_device_thread(work)
        worker.add_done_callback(lambda _: self._lock.release())
        while (item := await items.get()) is not done:
            if isinstance(item, Exception):
                raise item
            yield item


def _release_cached_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """Decoding and encoding: in a worker thread, so the probes keep answering."""
    return await run_in_threadpool(fn, *args)


def png_data_url(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def read_image(data: Any, max_pixels: int, field: str = "image") -> Any:
    """An uploaded image (bytes or a file object) as RGB, refused before decoding when its
    header says it is larger than max_pixels."""
    from PIL import Image, UnidentifiedImageError

    source = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        image = Image.open(source)
        if image.width * image.height > max_pixels:
            raise bad_request(
                f"{field} is {image.width}x{image.height}, more than the {max_pixels} pixels "
                "this runner decodes (MAX_INPUT_PIXELS)"
            )
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise bad_request(f"{field} is not an image PIL can read") from None
    return image.convert("RGB")


async def read_upload(upload: Any, limits: Limits, field: str = "image") -> Any:
    """Decode an uploaded image off the event loop."""
    upload.file.seek(0)
    return await off_loop(read_image, upload.file, limits.max_input_pixels, field)


def check_size(height: int, width: int, max_pixels: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if value < 8 or value % 8:
            raise bad_request(f"{name} {value} must be a positive multiple of 8")
    if height * width > max_pixels:
        raise bad_request(
            f"{height}x{width} is more than the {max_pixels} pixels this runner generates "
            "(MAX_OUTPUT_PIXELS)"
        )


def at_most(limits: Limits, **values: int | None) -> None:
    """Refuse a request field over its limit; the message names the field, the value, the
    limit and the env var that sets it."""
    for name, value in values.items():
        limit_name = LIMIT_OF[name]
        limit = getattr(limits, limit_name)
        if value is not None and value > limit:
            raise bad_request(
                f"{name} {value} is more than this runner allows ({limit}; {limit_name.upper()})"
            )


LIMIT_OF = {
    "num_inference_steps": "max_inference_steps",
    "num_images_per_prompt": "max_images_per_prompt",
    "max_tokens": "max_new_tokens",
    "text_characters": "max_speech_characters",
}


class APIError(BaseModel):
    msg: str = Field(description="The error message.")


class HTTPError(BaseModel):
    """ai-runner's error body; 422 (validation) is FastAPI's list, as in ai-runner."""

    detail: APIError


BEARER = HTTPBearer(auto_error=False)  # the Guard checks the token; this documents it


def serve(
    app: FastAPI,
    path: str,
    endpoint: Callable[..., Any],
    operation_id: str,
    response_model: Any,
    statuses: tuple[int, ...] = (),
    ok: dict[str, Any] | None = None,
) -> None:
    """Register a pipeline route under both spellings, declared as ai-runner declares it:
    its operation id, the bearer scheme and every error status it answers."""
    responses: dict[int | str, dict[str, Any]] = {
        status: {"model": HTTPError} for status in sorted({400, 401, 500, *statuses})
    }
    if ok is not None:
        responses[200] = ok
    common = {"response_model": response_model, "responses": responses,
              "dependencies": [Security(BEARER)]}  # fmt: skip
    app.post(path, operation_id=operation_id, tags=["generate"], **common)(endpoint)
    app.post(path + "/", include_in_schema=False, **common)(endpoint)
