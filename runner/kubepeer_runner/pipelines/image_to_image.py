"""image-to-image: a diffusers image-to-image pipeline over an uploaded image."""

from __future__ import annotations

from dataclasses import dataclass
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
from kubepeer_runner.serving import Device, bad_request, check_size, read_image

PIPELINE = "image-to-image"


@dataclass(frozen=True)
class ImageToImageRequest:
    prompt: str
    image: Any
    strength: float
    guidance_scale: float
    image_guidance_scale: float
    negative_prompt: str
    seed: int | None
    num_inference_steps: int
    num_images_per_prompt: int


def load(spec: ModelSpec, model_dir: Path, device: Device) -> DiffusersModel:
    from diffusers import AutoPipelineForImage2Image

    return load_diffusers(AutoPipelineForImage2Image, spec.model_id, model_dir, device)


def generate(model: DiffusersModel, req: ImageToImageRequest) -> ImageResponse:
    chosen = seeds(req.seed, req.num_images_per_prompt)
    kwargs: dict[str, Any] = {}
    if "image_guidance_scale" in model.pipe.__call__.__code__.co_varnames:
        kwargs["image_guidance_scale"] = req.image_guidance_scale  # instruct-pix2pix
    output = model.pipe(
        prompt=req.prompt,
        image=req.image,
        strength=req.strength,
        guidance_scale=req.guidance_scale,
        negative_prompt=req.negative_prompt or None,
        num_inference_steps=req.num_inference_steps,
        num_images_per_prompt=req.num_images_per_prompt,
        generator=generators(model.device, chosen),
        **kwargs,
    )
    return image_response(output.images, chosen)


def register(app: FastAPI, runner: Any) -> None:
    async def image_to_image(
        prompt: str = Form(...),
        image: UploadFile = File(...),
        model_id: str = Form(""),
        loras: str = Form(""),
        strength: float = Form(0.8, gt=0, le=1),
        guidance_scale: float = Form(7.5, ge=0, le=50),
        image_guidance_scale: float = Form(1.5, ge=0, le=50),
        negative_prompt: str = Form(""),
        safety_check: bool = Form(True),
        seed: int | None = Form(None, ge=0, lt=2**63),
        num_inference_steps: int = Form(100, ge=1, le=500),
        num_images_per_prompt: int = Form(1, ge=1, le=8),
    ) -> ImageResponse:
        model = runner.model(PIPELINE, model_id)
        if not prompt.strip():
            raise bad_request("prompt must not be empty")
        picture = read_image(await image.read())
        # Diffusion works on multiples of 8: trim the odd edge pixels.
        width, height = picture.width // 8 * 8, picture.height // 8 * 8
        check_size(height, width)
        picture = picture.crop((0, 0, width, height))
        req = ImageToImageRequest(
            prompt, picture, strength, guidance_scale, image_guidance_scale, negative_prompt,
            seed, num_inference_steps, num_images_per_prompt,
        )  # fmt: skip
        return await runner.queue.run(generate, model, req)

    app.post("/image-to-image", response_model=ImageResponse)(image_to_image)
    app.post("/image-to-image/", include_in_schema=False)(image_to_image)
