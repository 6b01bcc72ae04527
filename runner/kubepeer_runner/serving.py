"""What every pipeline shares: errors in ai-runner's format, the device, the one-at-a-time
queue in front of it, and media encoding."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


class RunnerError(Exception):
    """An error a client sees as {"detail": {"msg": ...}} with this status."""

    def __init__(self, status: int, msg: str) -> None:
        super().__init__(msg)
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


class DeviceQueue:
    """One inference at a time on the device; at most `max_waiting` more wait their turn.

    A request beyond that gets 503 at once rather than an unbounded wait, which is what a
    proxy in front of several runners wants to know."""

    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self.waiting = 0
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
        if self._lock.locked() and self.waiting >= self.max_waiting:
            raise RunnerError(503, f"runner busy: {self.waiting} requests already waiting")
        self.waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self.waiting -= 1

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        await self._take_device()
        work = self._in_device_thread(_guarded, fn, *args)
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
                _guarded(fn, emit, *args)
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


def _guarded(fn: Callable[..., T], *args: Any) -> T:
    """Run inference; out of device memory is a 500 and the runner carries on."""
    import torch

    try:
        return fn(*args)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        raise RunnerError(500, "out of memory: try fewer or smaller outputs") from None


def png_data_url(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def read_image(data: bytes, field: str = "image") -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError):
        raise bad_request(f"{field} is not an image PIL can read") from None
    return image.convert("RGB")


def check_size(height: int, width: int, max_pixels: int = 2048 * 2048) -> None:
    for name, value in (("height", height), ("width", width)):
        if value < 8 or value % 8:
            raise bad_request(f"{name} {value} must be a positive multiple of 8")
    if height * width > max_pixels:
        raise bad_request(f"{height}x{width} is more than the {max_pixels} pixels allowed")
