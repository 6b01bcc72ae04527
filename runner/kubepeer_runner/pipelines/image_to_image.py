"""image-to-image: a diffusers image-to-image pipeline over an uploaded image."""

from __future__ import annotations

from dataclasses import dataclass
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
from kubepeer_runner.serving import Device, at_most, bad_request, check_size, read_upload, serve

PIPELINE = "image-to-image"
BODY_LIMIT = "max_upload_bytes"


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
        strength: float = Form(0.8),
        guidance_scale: float = Form(7.5),
        image_guidance_scale: float = Form(1.5),
        negative_prompt: str = Form(""),
        safety_check: bool = Form(True),
        seed: int | None = Form(None, **SEED_RANGE),
        num_inference_steps: int = Form(100, ge=1),
        num_images_per_prompt: int = Form(1, ge=1),
    ) -> ImageResponse:
        model = await runner.model(PIPELINE, model_id)
        if not prompt.strip():
            raise bad_request("prompt must not be empty")
        if not 0 <= strength <= 1:
            raise bad_request(f"strength {strength} must be between 0 and 1")
        at_most(
            runner.limits,
            num_inference_steps=num_inference_steps,
            num_images_per_prompt=num_images_per_prompt,
        )
        picture = await read_upload(image, runner.limits)
        # Diffusion works on multiples of 8: trim the odd edge pixels.
        width, height = picture.width // 8 * 8, picture.height // 8 * 8
        check_size(height, width, runner.limits.max_output_pixels)
        picture = picture.crop((0, 0, width, height))
        req = ImageToImageRequest(
            prompt, picture, strength, guidance_scale, image_guidance_scale, negative_prompt,
            seed, num_inference_steps, num_images_per_prompt,
        )  # fmt: skip
        return await runner.queue.run(generate, model, req)

    serve(app, "/" + PIPELINE, image_to_image, "genImageToImage", ImageResponse)
