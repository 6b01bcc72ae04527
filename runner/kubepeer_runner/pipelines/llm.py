"""llm: a transformers causal LM behind an OpenAI-style chat API, streamed as SSE on request."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from kubepeer_runner.config import ModelSpec
from kubepeer_runner.hf import load_kwargs
from kubepeer_runner.serving import Device, at_most, serve

PIPELINE = "llm"
BODY_LIMIT = "max_json_bytes"


class LLMMessage(BaseModel):
    role: str
    content: str


class LLMRequest(BaseModel):
    messages: list[LLMMessage] = Field(min_length=1)
    model: str = ""
    temperature: float = Field(default=0.7, ge=0)
    max_tokens: int = Field(default=256, ge=1)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=-1, ge=-1)
    stream: bool = False


class LLMTokenUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class LLMChoice(BaseModel):
    index: int
    finish_reason: str = ""
    delta: LLMMessage | None = None
    message: LLMMessage | None = None


class LLMResponse(BaseModel):
    """A whole completion, and also each chunk of a stream (as in ai-runner): every chunk
    carries the usage so far and a delta with its role, so each one validates."""

    id: str
    object: str = "chat.completion"
    model: str
    created: int
    usage: LLMTokenUsage
    choices: list[LLMChoice]


@dataclass
class Loaded:
    tokenizer: Any
    model: Any
    device: Device
    model_id: str


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int

    def usage(self) -> LLMTokenUsage:
        return LLMTokenUsage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
        )


def load(spec: ModelSpec, model_dir: Path, device: Device) -> Loaded:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = load_kwargs(model_dir, spec.model_id, device)
    tokenizer = AutoTokenizer.from_pretrained(spec.model_id, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(spec.model_id, dtype=device.dtype, **kwargs)
    return Loaded(tokenizer, model.to(device.name).eval(), device, spec.model_id)


def complete(
    model: Loaded, req: LLMRequest, emit: Callable[[Completion], None] | None = None
) -> Completion:
    """Generate; with emit, each piece of text as it is final (a Completion of that piece
    with the tokens generated so far)."""
    import torch
    from transformers import TextStreamer

    inputs = model.tokenizer.apply_chat_template(
        [m.model_dump() for m in req.messages],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    ).to(model.device.name)
    sampling: dict[str, Any] = {"do_sample": req.temperature > 0}
    if req.temperature > 0:
        sampling.update(temperature=req.temperature, top_p=req.top_p)
        if req.top_k > 0:
            sampling["top_k"] = req.top_k

    prompt_tokens = inputs["input_ids"].shape[1]

    class Emitter(TextStreamer):
        generated = 0

        def put(self, value: Any) -> None:
            if not (self.skip_prompt and self.next_tokens_are_prompt):
                self.generated += value.numel()
            super().put(value)
            # TextStreamer holds symbols back until the next space (console formatting);
            # a streaming client wants every token as it comes. Only an incomplete UTF-8
            # character (decoded as U+FFFD) has to wait for the token that completes it.
            if self.token_cache:
                text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
                if len(text) > self.print_len and not text.endswith("\ufffd"):
                    self.on_finalized_text(text[self.print_len :])
                    self.print_len = len(text)

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text and emit is not None:
                emit(Completion(text, prompt_tokens, self.generated))

    streamer = Emitter(model.tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.inference_mode():
        out = model.model.generate(
            **inputs,
            max_new_tokens=req.max_tokens,
            pad_token_id=model.tokenizer.pad_token_id or model.tokenizer.eos_token_id,
            streamer=streamer if emit else None,
            **sampling,
        )
    generated = out[0][prompt_tokens:]
    return Completion(
        text=model.tokenizer.decode(generated, skip_special_tokens=True),
        prompt_tokens=prompt_tokens,
        completion_tokens=len(generated),
    )


def register(app: FastAPI, runner: Any) -> None:
    async def llm(req: LLMRequest) -> Any:
        model = await runner.model(PIPELINE, req.model)
        at_most(runner.limits, max_tokens=req.max_tokens)
        created, request_id = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"

        def response(piece: Completion, finish: str, streamed: bool) -> LLMResponse:
            text = LLMMessage(role="assistant", content=piece.text)
            choice = LLMChoice(
                index=0, finish_reason=finish, **{"delta" if streamed else "message": text}
            )
            return LLMResponse(
                id=request_id, object="chat.completion.chunk" if streamed else "chat.completion",
                model=model.model_id, created=created, usage=piece.usage(), choices=[choice],
            )  # fmt: skip

        def event(piece: Completion, finish: str) -> str:
            return f"data: {response(piece, finish, True).model_dump_json(exclude_none=True)}\n\n"

        if not req.stream:
            whole = response(await runner.queue.run(complete, model, req), "stop", False)
            return JSONResponse(whole.model_dump(exclude_none=True))

        items = runner.queue.stream(lambda emit, r: emit(("done", complete(model, r, emit))), req)
        first = await anext(items)  # errors before the first byte are still a clean 4xx/5xx

        async def events() -> AsyncIterator[str]:
            item = first
            while True:
                if isinstance(item, tuple):  # the whole completion: the last chunk
                    last = Completion("", item[1].prompt_tokens, item[1].completion_tokens)
                    yield event(last, "stop")
                    break
                yield event(item, "")
                try:
                    item = await anext(items)
                except StopAsyncIteration:
                    break
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    stream = {"schema": {"type": "string", "description": (
        "With stream=true: server-sent events, one `data: <LLMResponse JSON>` per piece of "
        "text (each with its delta and the usage so far), the last with finish_reason "
        "`stop`, then `data: [DONE]`."
    )}}  # fmt: skip
    ok = {"model": LLMResponse, "content": {"text/event-stream": stream}}
    serve(app, "/" + PIPELINE, llm, "genLLM", None, ok=ok)
