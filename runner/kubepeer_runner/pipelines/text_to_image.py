"""text-to-image: a diffusers text-to-image pipeline (SD, SDXL, ... by model_index.json)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field

from kubepeer_runner.config import ModelSpec
from kubepeer_runner.hf import DiffusersModel, load_diffusers
from kubepeer_runner.serving import Device, at_most, bad_request, check_size, png_data_url, serve

PIPELINE = "text-to-image"
BODY_LIMIT = "max_json_bytes"
# torch.Generator.manual_seed takes any value in [-2**63, 2**64).
SEED_RANGE: dict[str, Any] = {"ge": -(2**63), "lt": 2**64}


class Media(BaseModel):
    url: str
    seed: int
    nsfw: bool


class ImageResponse(BaseModel):
    images: list[Media]


class TextToImageParams(BaseModel):
    model_id: str = ""
    loras: str = ""
    prompt: str
    height: int = 576
    width: int = 1024
    guidance_scale: float = 7.5
    negative_prompt: str = ""
    safety_check: bool = True
    seed: int | None = Field(default=None, **SEED_RANGE)
    num_inference_steps: int = Field(default=50, ge=1)
    num_images_per_prompt: int = Field(default=1, ge=1)


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


def generate(model: DiffusersModel, req: TextToImageParams) -> ImageResponse:
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
    async def text_to_image(req: TextToImageParams) -> ImageResponse:
        model = await runner.model(PIPELINE, req.model_id)
        if not req.prompt.strip():
            raise bad_request("prompt must not be empty")
        check_size(req.height, req.width, runner.limits.max_output_pixels)
        at_most(
            runner.limits,
            num_inference_steps=req.num_inference_steps,
            num_images_per_prompt=req.num_images_per_prompt,
        )
        return await runner.queue.run(generate, model, req)

    serve(app, "/" + PIPELINE, text_to_image, "genTextToImage", ImageResponse)
