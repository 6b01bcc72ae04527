"""upscale: a diffusers latent upscaler (x4) over an uploaded image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, UploadFile

from kubepeer_runner.config import ModelSpec
from kubepeer_runner.hf import DiffusersModel, load_diffusers
from kubepeer_runner.pipelines.text_to_image import (
    ImageResponse,
    generators,
    image_response,
    seeds,
)
from kubepeer_runner.serving import Device, bad_request, read_image

PIPELINE = "upscale"
SCALE = 4
MAX_INPUT_PIXELS = 512 * 512  # the output is 16 times larger


def load(spec: ModelSpec, model_dir: Path, device: Device) -> DiffusersModel:
    from diffusers import StableDiffusionUpscalePipeline

    return load_diffusers(StableDiffusionUpscalePipeline, spec.model_id, model_dir, device)


def upscale(
    model: DiffusersModel, prompt: str, image: Any, seed: int | None, steps: int
) -> ImageResponse:
    chosen = seeds(seed, 1)
    output = model.pipe(
        prompt=prompt,
        image=image,
        num_inference_steps=steps,
        generator=generators(model.device, chosen),
    )
    return image_response(output.images, chosen)


def register(app: FastAPI, runner: Any) -> None:
    async def upscale_route(
        prompt: str = Form(...),
        image: UploadFile = File(...),
        model_id: str = Form(""),
        safety_check: bool = Form(True),
        seed: int | None = Form(None, ge=0, lt=2**63),
        num_inference_steps: int = Form(75, ge=1, le=500),
    ) -> ImageResponse:
        model = runner.model(PIPELINE, model_id)
        if not prompt.strip():
            raise bad_request("prompt must not be empty")
        picture = read_image(await image.read())
        if picture.width * picture.height > MAX_INPUT_PIXELS:
            raise bad_request(
                f"image {picture.width}x{picture.height} is larger than the "
                f"{MAX_INPUT_PIXELS} pixels an x{SCALE} upscale accepts"
            )
        return await runner.queue.run(upscale, model, prompt, picture, seed, num_inference_steps)

    app.post("/upscale", response_model=ImageResponse)(upscale_route)
    app.post("/upscale/", include_in_schema=False)(upscale_route)
