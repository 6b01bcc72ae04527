"""image-to-video: a diffusers image-to-video pipeline (Stable Video Diffusion-class).

Frames go back as PNG data URLs, one list per generated video, as ai-runner returns them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, UploadFile
from pydantic import BaseModel

from kubepeer_runner.config import ModelSpec
from kubepeer_runner.hf import DiffusersModel, load_diffusers
from kubepeer_runner.pipelines.text_to_image import SEED_RANGE, Media, generators, seeds
from kubepeer_runner.serving import (
    Device,
    at_most,
    check_size,
    png_data_url,
    read_upload,
    serve,
)

PIPELINE = "image-to-video"
BODY_LIMIT = "max_upload_bytes"


class VideoResponse(BaseModel):
    frames: list[list[Media]]


@dataclass(frozen=True)
class VideoRequest:
    image: Any
    height: int
    width: int
    fps: int
    motion_bucket_id: int
    noise_aug_strength: float
    seed: int | None
    num_inference_steps: int


def load(spec: ModelSpec, model_dir: Path, device: Device) -> DiffusersModel:
    from diffusers import DiffusionPipeline

    return load_diffusers(DiffusionPipeline, spec.model_id, model_dir, device)


def animate(model: DiffusersModel, req: VideoRequest) -> VideoResponse:
    chosen = seeds(req.seed, 1)
    frames = model.pipe(
        req.image.resize((req.width, req.height)),
        height=req.height,
        width=req.width,
        fps=req.fps,
        motion_bucket_id=req.motion_bucket_id,
        noise_aug_strength=req.noise_aug_strength,
        num_inference_steps=req.num_inference_steps,
        decode_chunk_size=8,
        generator=generators(model.device, chosen),
    ).frames
    return VideoResponse(
        frames=[
            [Media(url=png_data_url(f), seed=chosen[0], nsfw=False) for f in video]
            for video in frames
        ]
    )


def register(app: FastAPI, runner: Any) -> None:
    async def image_to_video(
        image: UploadFile = File(...),
        model_id: str = Form(""),
        height: int = Form(576),
        width: int = Form(1024),
        fps: int = Form(6, ge=1),
        motion_bucket_id: int = Form(127),
        noise_aug_strength: float = Form(0.02),
        safety_check: bool = Form(True),
        seed: int | None = Form(None, **SEED_RANGE),
        num_inference_steps: int = Form(25, ge=1),
    ) -> VideoResponse:
        model = await runner.model(PIPELINE, model_id)
        check_size(height, width, runner.limits.max_output_pixels)
        at_most(runner.limits, num_inference_steps=num_inference_steps)
        picture = await read_upload(image, runner.limits)
        req = VideoRequest(
            picture, height, width, fps, motion_bucket_id, noise_aug_strength, seed,
            num_inference_steps,
        )  # fmt: skip
        return await runner.queue.run(animate, model, req)

    serve(app, "/" + PIPELINE, image_to_video, "genImageToVideo", VideoResponse)
