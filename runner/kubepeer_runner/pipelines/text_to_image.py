"""text-to-image: a diffusers text-to-image pipeline (SD, SDXL, ... by model_index.json)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field

from kubepeer_runner.config import ModelSpec
from kubepeer_runner.hf import DiffusersModel, load_diffusers
from kubepeer_runner.serving import Device, check_size, png_data_url

PIPELINE = "text-to-image"


class Media(BaseModel):
    url: str
    seed: int
    nsfw: bool


class ImageResponse(BaseModel):
    images: list[Media]


class TextToImageRequest(BaseModel):
    prompt: str = Field(min_length=1)
    model_id: str = ""
    loras: str = ""
    height: int = 576
    width: int = 1024
    guidance_scale: float = Field(default=7.5, ge=0, le=50)
    negative_prompt: str = ""
    safety_check: bool = True
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    num_inference_steps: int = Field(default=50, ge=1, le=500)
    num_images_per_prompt: int = Field(default=1, ge=1, le=8)


def load(spec: ModelSpec, model_dir: Path, device: Device) -> DiffusersModel:
    from diffusers import AutoPipelineForText2Image

    return load_diffusers(AutoPipelineForText2Image, spec.model_id, model_dir, device)


def seeds(seed: int | None, count: int) -> list[int]:
    first = seed if seed is not None else random.randrange(2**32)
    return [first + i for i in range(count)]


def generators(device: Device, chosen: list[int]) -> list[Any]:
    import torch

    return [torch.Generator(device.name).manual_seed(s) for s in chosen]


def image_response(images: list[Any], chosen: list[int]) -> ImageResponse:
    # No safety checker ships with these weights: nsfw is reported as not detected.
    return ImageResponse(
        images=[
            Media(url=png_data_url(img), seed=s, nsfw=False)
            for img, s in zip(images, chosen, strict=True)
        ]
    )


def generate(model: DiffusersModel, req: TextToImageRequest) -> ImageResponse:
    chosen = seeds(req.seed, req.num_images_per_prompt)
    output = model.pipe(
        prompt=req.prompt,
        negative_prompt=req.negative_prompt or None,
        height=req.height,
        width=req.width,
        guidance_scale=req.guidance_scale,
        num_inference_steps=req.num_inference_steps,
        num_images_per_prompt=req.num_images_per_prompt,
        generator=generators(model.device, chosen),
    )
    return image_response(output.images, chosen)


def register(app: FastAPI, runner: Any) -> None:
    async def text_to_image(req: TextToImageRequest) -> ImageResponse:
        model = runner.model(PIPELINE, req.model_id)
        check_size(req.height, req.width)
        return await runner.queue.run(generate, model, req)

    app.post("/text-to-image", response_model=ImageResponse)(text_to_image)
    app.post("/text-to-image/", include_in_schema=False)(text_to_image)
