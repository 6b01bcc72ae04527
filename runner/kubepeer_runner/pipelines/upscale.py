"""upscale: a diffusers latent upscaler (x4) over an uploaded image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, UploadFile

from kubepeer_runner.config import ModelSpec
from kubepeer_runner.hf import DiffusersModel, load_diffusers
from kubepeer_runner.pipelines.text_to_image import (
    SEED_RANGE,
    ImageResponse,
    generators,
    image_response,
    seeds,
)
from kubepeer_runner.serving import Device, at_most, bad_request, read_upload, serve

PIPELINE = "upscale"
BODY_LIMIT = "max_upload_bytes"
SCALE = 4


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
        seed: int | None = Form(None, **SEED_RANGE),
        num_inference_steps: int = Form(75, ge=1),
    ) -> ImageResponse:
        model = await runner.model(PIPELINE, model_id)
        if not prompt.strip():
            raise bad_request("prompt must not be empty")
        at_most(runner.limits, num_inference_steps=num_inference_steps)
        picture = await read_upload(image, runner.limits)
        most = runner.limits.max_output_pixels
        if picture.width * picture.height * SCALE * SCALE > most:
            raise bad_request(
                f"image {picture.width}x{picture.height} upscaled x{SCALE} is more than the "
                f"{most} pixels this runner generates (MAX_OUTPUT_PIXELS)"
            )
        return await runner.queue.run(upscale, model, prompt, picture, seed, num_inference_steps)

    serve(app, "/" + PIPELINE, upscale_route, "genUpscale", ImageResponse)
