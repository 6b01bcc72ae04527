"""Frame models for live-video-to-video, and the params that steer them.

`noop` returns each frame as it came (after the resize). Any other model id is a
diffusers image-to-image model from MODEL_DIR run the StreamDiffusion way: one or two
denoising steps per frame from a fixed noise, the prompt encoded once per change, so a
frame costs one VAE encode, one UNet call per step and one VAE decode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kubepeer_runner.serving import Device

NOOP = "noop"


class LiveParams(BaseModel):
    """What a gateway may set at start (`params`) and later on the control channel.

    Unknown keys are kept as given and ignored (apps send pipeline-specific extras)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    width: int = Field(512, ge=64, le=2048, multiple_of=8)
    height: int = Field(512, ge=64, le=2048, multiple_of=8)
    prompt: str = ""
    seed: int = Field(42, ge=0, lt=2**32)
    strength: float = Field(0.5, gt=0, le=1)  # how far from the input frame
    num_inference_steps: int = Field(1, ge=1, le=4)

    def updated(self, changes: dict[str, Any]) -> LiveParams:
        return LiveParams.model_validate({**self.model_dump(), **changes})


def params_error(exc: ValidationError) -> str:
    """One line naming each field and the value it was given."""
    parts = []
    for error in exc.errors():
        field = ".".join(str(p) for p in error["loc"]) or "params"
        parts.append(f"params.{field} {error.get('input')!r}: {error['msg']}")
    return "; ".join(parts)


class NoopModel:
    name = NOOP

    def __call__(self, image: np.ndarray, params: LiveParams) -> np.ndarray:
        return image


class DiffusionModel:
    """One- or two-step image-to-image diffusion on every frame."""

    def __init__(self, pipe: Any, device: Device, name: str) -> None:
        import torch

        self.name, self.device = name, device
        self.vae, self.unet = pipe.vae, pipe.unet
        self.tokenizer, self.text_encoder = pipe.tokenizer, pipe.text_encoder
        self.scaling = float(getattr(pipe.vae.config, "scaling_factor", 0.18215))
        alphas = pipe.scheduler.alphas_cumprod.to(torch.float32)
        self.alphas = alphas.to(device.name)
        self.train_steps = len(alphas)
        self._prompt: tuple[str, Any] | None = None
        self._noise: tuple[tuple[int, tuple[int, ...]], Any] | None = None

    def _embedding(self, prompt: str) -> Any:
        if self._prompt is None or self._prompt[0] != prompt:
            tokens = self.tokenizer(
                prompt, padding="max_length", truncation=True,
                max_length=self.tokenizer.model_max_length, return_tensors="pt",
            ).input_ids.to(self.device.name)  # fmt: skip
            self._prompt = (prompt, self.text_encoder(tokens)[0])
        return self._prompt[1]

    def _fixed_noise(self, seed: int, shape: tuple[int, ...]) -> Any:
        """The same noise for every frame of a stream: neighbouring frames stay alike."""
        import torch

        if self._noise is None or self._noise[0] != (seed, shape):
            generator = torch.Generator("cpu").manual_seed(seed)
            noise = torch.randn(shape, generator=generator, dtype=torch.float32)
            self._noise = ((seed, shape), noise.to(self.device.name, self.device.dtype))
        return self._noise[1]

    def timesteps(self, params: LiveParams) -> list[int]:
        first = round((self.train_steps - 1) * params.strength)
        n = params.num_inference_steps
        return [max(1, first * (n - i) // n) for i in range(n)]

    def __call__(self, image: np.ndarray, params: LiveParams) -> np.ndarray:
        import torch

        with torch.inference_mode():
            pixels = torch.from_numpy(image).to(self.device.name)
            pixels = pixels.permute(2, 0, 1).unsqueeze(0).to(self.device.dtype) / 127.5 - 1
            clean = self.vae.encode(pixels).latent_dist.mean * self.scaling
            noise = self._fixed_noise(params.seed, tuple(clean.shape))
            embedding = self._embedding(params.prompt)
            for t in self.timesteps(params):
                alpha = self.alphas[t]
                noisy = alpha.sqrt() * clean + (1 - alpha).sqrt() * noise
                step = torch.tensor([t], device=self.device.name)
                eps = self.unet(noisy, step, encoder_hidden_states=embedding).sample
                clean = (noisy - (1 - alpha).sqrt() * eps) / alpha.sqrt()
            decoded = self.vae.decode(clean / self.scaling).sample
            out = ((decoded[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            return out.permute(1, 2, 0).contiguous().cpu().numpy()


def load_model(model_id: str, model_dir: Path, device: Device) -> NoopModel | DiffusionModel:
    if model_id == NOOP:
        return NoopModel()
    from diffusers import AutoPipelineForImage2Image

    from kubepeer_runner.hf import load_diffusers

    loaded = load_diffusers(AutoPipelineForImage2Image, model_id, model_dir, device)
    return DiffusionModel(loaded.pipe, device, model_id)
