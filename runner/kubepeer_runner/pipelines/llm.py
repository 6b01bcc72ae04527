"""llm: a transformers causal LM behind an OpenAI-style chat API, streamed as SSE on request."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from kubepeer_runner.config import ModelSpec
from kubepeer_runner.hf import load_kwargs
from kubepeer_runner.serving import Device

PIPELINE = "llm"


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class LLMRequest(BaseModel):
    messages: list[Message] = Field(min_length=1)
    model: str = ""
    temperature: float = Field(default=0.7, ge=0, le=2)
    max_tokens: int = Field(default=256, ge=1, le=8192)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=-1, ge=-1)
    stream: bool = False


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


def load(spec: ModelSpec, model_dir: Path, device: Device) -> Loaded:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = load_kwargs(model_dir, spec.model_id, device)
    tokenizer = AutoTokenizer.from_pretrained(spec.model_id, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(spec.model_id, dtype=device.dtype, **kwargs)
    return Loaded(tokenizer, model.to(device.name).eval(), device, spec.model_id)


def complete(
    model: Loaded, req: LLMRequest, emit: Callable[[str], None] | None = None
) -> Completion:
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

    class Emitter(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text and emit is not None:
                emit(text)

    streamer = Emitter(model.tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.inference_mode():
        out = model.model.generate(
            **inputs,
            max_new_tokens=req.max_tokens,
            pad_token_id=model.tokenizer.pad_token_id or model.tokenizer.eos_token_id,
            streamer=streamer if emit else None,
            **sampling,
        )
    prompt_tokens = inputs["input_ids"].shape[1]
    generated = out[0][prompt_tokens:]
    return Completion(
        text=model.tokenizer.decode(generated, skip_special_tokens=True),
        prompt_tokens=prompt_tokens,
        completion_tokens=len(generated),
    )


def _usage(c: Completion) -> dict[str, int]:
    return {
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "total_tokens": c.prompt_tokens + c.completion_tokens,
    }


def register(app: FastAPI, runner: Any) -> None:
    async def llm(req: LLMRequest) -> Any:
        model = runner.model(PIPELINE, req.model)
        created, request_id = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
        if not req.stream:
            done = await runner.queue.run(complete, model, req)
            return {
                "id": request_id,
                "object": "chat.completion",
                "created": created,
                "model": model.model_id,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": done.text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": _usage(done),
            }

        def chunk(delta: dict[str, str], finish: str | None, usage: dict | None = None) -> str:
            body: dict[str, Any] = {
                "id": request_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model.model_id,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        items = runner.queue.stream(lambda emit, r: emit(complete(model, r, emit)), req)
        first = await anext(items)  # errors before the first byte are still a clean 4xx/5xx

        async def events() -> AsyncIterator[str]:
            yield chunk({"role": "assistant", "content": ""}, None)
            item = first
            while True:
                if isinstance(item, Completion):
                    yield chunk({}, "stop", _usage(item))
                    break
                yield chunk({"content": item}, None)
                try:
                    item = await anext(items)
                except StopAsyncIteration:
                    break
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    app.post("/llm")(llm)
    app.post("/llm/", include_in_schema=False)(llm)
