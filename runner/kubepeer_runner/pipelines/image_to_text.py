"""image-to-text: a transformers captioning model (BLIP-class) over an uploaded image."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, UploadFile
from pydantic import BaseModel

from kubepeer_runner.config import ModelSpec
from kubepeer_runner.hf import load_kwargs
from kubepeer_runner.serving import Device, read_upload, serve

PIPELINE = "image-to-text"
TOO_LARGE_STATUS = 413  # ai-runner documents a 413 for this route
BODY_LIMIT = "max_upload_bytes"
MAX_NEW_TOKENS = 64


class ImageToTextResponse(BaseModel):
    text: str


@dataclass
class Loaded:
    processor: Any
    model: Any
    device: Device


def load(spec: ModelSpec, model_dir: Path, device: Device) -> Loaded:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    kwargs = load_kwargs(model_dir, spec.model_id, device)
    processor = AutoProcessor.from_pretrained(spec.model_id, **kwargs)
    model = AutoModelForImageTextToText.from_pretrained(spec.model_id, dtype=device.dtype, **kwargs)
    return Loaded(processor, model.to(device.name).eval(), device)


def caption(model: Loaded, image: Any, prompt: str) -> ImageToTextResponse:
    import torch

    inputs = model.processor(images=image, text=prompt or None, return_tensors="pt")
    inputs = {
        k: v.to(model.device.name, model.device.dtype)
        if v.is_floating_point()
        else v.to(model.device.name)
        for k, v in inputs.items()
    }
    with torch.inference_mode():
        out = model.model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return ImageToTextResponse(
        text=model.processor.decode(out[0], skip_special_tokens=True).strip()
    )


def register(app: FastAPI, runner: Any) -> None:
    async def image_to_text(
        image: UploadFile = File(...), prompt: str = Form(""), model_id: str = Form("")
    ) -> ImageToTextResponse:
        model = await runner.model(PIPELINE, model_id)
        picture = await read_upload(image, runner.limits)
        return await runner.queue.run(caption, model, picture, prompt)

    serve(
        app,
        "/" + PIPELINE,
        image_to_text,
        "genImageToText",
        ImageToTextResponse,
        (TOO_LARGE_STATUS,),
    )
