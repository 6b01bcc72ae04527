"""Frame models for live-video-to-video, and the params that steer them.

`noop` returns each frame as it came (after the resize). Any other model id is a
diffusers image-to-image model from MODEL_DIR run the StreamDiffusion way: one or two
denoising steps per frame from a fixed noise, the prompt encoded once per change, so a
frame costs one VAE encode, one UNet call per step and one VAE decode.
"""

from __future__ import annotations

import logging
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
    """One- or two-step image-to-image diffusion on every frame.

    On CUDA a frame is one replay of a CUDA graph captured for the current (size, steps,
    seed, prompt): the UNet alone is about a thousand kernels, and launching them one by
    one from Python can cost as much as running them. Convolutions run channels-last
    (the layout the tensor cores read), frames cross to and from the GPU through pinned
    host buffers. A capture that fails leaves the model on the plain (eager) path, which
    computes the same function."""

    def __init__(
        self,
        pipe: Any,
        device: Device,
        name: str,
        channels_last: bool | None = None,
        cuda_graph: bool | None = None,
    ) -> None:
        import torch

        self.name, self.device = name, device
        self.vae, self.unet = pipe.vae, pipe.unet
        self.tokenizer, self.text_encoder = pipe.tokenizer, pipe.text_encoder
        self.scaling = float(getattr(pipe.vae.config, "scaling_factor", 0.18215))
        alphas = pipe.scheduler.alphas_cumprod.to(torch.float32)
        self.alphas = alphas.to(device.name)
        self.train_steps = len(alphas)
        on_cuda = device.name == "cuda"
        if on_cuda if channels_last is None else channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        self.cuda_graph = on_cuda if cuda_graph is None else cuda_graph
        self._prompt: tuple[str, Any] | None = None
        self._noise: tuple[tuple[int, tuple[int, ...]], Any] | None = None
        self._graph: tuple[tuple[Any, ...], Any, Any, Any, tuple[Any, ...]] | None = None
        self._host: dict[tuple[int, ...], tuple[Any, Any]] = {}  # shape -> pinned in/out

    def compile(self) -> None:
        """torch.compile the UNet and the VAE decoder (they run inside the CUDA graph); the
        first frame at each size then takes the compiling time."""
        import torch

        self.unet = torch.compile(self.unet)
        self.vae.decoder = torch.compile(self.vae.decoder)

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

    def _latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """The VAE's latent for a frame: each encoder block after the first halves the size
        (8x for SD's VAE and for the tiny one, TAESD)."""
        config = self.vae.config
        blocks = getattr(config, "block_out_channels", None) or config.encoder_block_out_channels
        down = 2 ** (len(blocks) - 1)
        return (1, int(config.latent_channels), height // down, width // down)

    def _encode(self, pixels: Any) -> Any:
        encoded = self.vae.encode(pixels)
        # AutoencoderKL gives a distribution; the tiny VAE (TAESD) its latents directly.
        latents = encoded.latents if hasattr(encoded, "latents") else encoded.latent_dist.mean
        return latents * self.scaling

    def _frame(self, image: Any, embedding: Any, noise: Any, steps: tuple[Any, ...]) -> Any:
        """uint8 HxWx3 on the device -> uint8 HxWx3 on the device, no host sync (so a CUDA
        graph can capture it). `steps`: (timestep tensor, alpha) per denoising step."""
        import torch

        # NHWC permuted to NCHW is channels-last already: no copy.
        pixels = image.unsqueeze(0).permute(0, 3, 1, 2).to(self.device.dtype) / 127.5 - 1
        clean = self._encode(pixels)
        for step, alpha in steps:
            noisy = alpha.sqrt() * clean + (1 - alpha).sqrt() * noise
            eps = self.unet(noisy, step, encoder_hidden_states=embedding).sample
            clean = (noisy - (1 - alpha).sqrt() * eps) / alpha.sqrt()
        decoded = self.vae.decode(clean / self.scaling).sample
        out = ((decoded[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return out.permute(1, 2, 0).contiguous()

    def _inputs(self, image_shape: tuple[int, ...], params: LiveParams) -> tuple[Any, ...]:
        import torch

        embedding = self._embedding(params.prompt)
        noise = self._fixed_noise(params.seed, self._latent_shape(*image_shape[:2]))
        steps = tuple(
            (torch.tensor([t], device=self.device.name), self.alphas[t])
            for t in self.timesteps(params)
        )
        return embedding, noise, steps

    def _replay(self, frame: Any, params: LiveParams) -> Any:
        """The graph for these params (captured on first use), fed `frame`; its output
        buffer, valid until the next replay."""
        import torch

        key = (tuple(frame.shape), tuple(self.timesteps(params)), params.seed, params.prompt)
        if self._graph is None or self._graph[0] != key:
            self._graph = None  # free the old graph's memory before capturing anew
            inputs = self._inputs(tuple(frame.shape), params)
            static_in = frame.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: lazy inits stay out of the capture
                for _ in range(2):
                    self._frame(static_in, *inputs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the runner's other threads (health, stats) may touch CUDA meanwhile.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                static_out = self._frame(static_in, *inputs)
            # The inputs stay referenced: the graph reads their memory on every replay.
            self._graph = (key, graph, static_in, static_out, inputs)
        _, graph, static_in, static_out, _ = self._graph
        static_in.copy_(frame)
        graph.replay()
        return static_out

    def __call__(self, image: np.ndarray, params: LiveParams) -> np.ndarray:
        import torch

        with torch.inference_mode():
            if self.device.name != "cuda":
                frame = torch.from_numpy(image)
                return self._frame(frame, *self._inputs(image.shape, params)).numpy()
            shape = tuple(image.shape)
            if shape not in self._host:
                pinned = [torch.empty(shape, dtype=torch.uint8).pin_memory() for _ in "io"]
                self._host = {shape: (pinned[0], pinned[1])}
            host_in, host_out = self._host[shape]
            host_in.numpy()[...] = image
            frame = host_in.to(self.device.name, non_blocking=True)
            out = None
            if self.cuda_graph:
                try:
                    out = self._replay(frame, params)
                except RuntimeError as exc:  # capture refused: the eager path, same function
                    self._graph, self.cuda_graph = None, False
                    logging.getLogger(__name__).warning(
                        "live model %s: CUDA graph capture failed, running eagerly: %s",
                        self.name, exc,
                    )  # fmt: skip
            if out is None:
                out = self._frame(frame, *self._inputs(shape, params))
            host_out.copy_(out, non_blocking=True)
            torch.cuda.current_stream().synchronize()
            return host_out.numpy().copy()  # the pinned buffer is reused by the next frame


def load_model(
    model_id: str, model_dir: Path, device: Device, optimizations: frozenset[str] = frozenset()
) -> NoopModel | DiffusionModel:
    """The frame model. With TORCH_COMPILE on CUDA the UNet and the VAE decoder are
    compiled (inside the CUDA graph: 46 -> 26 ms a 512x512 frame on an H200,
    hack/bench/live_model.py), and one default-sized frame runs here, while /health still
    says LOADING, so that the minute of compiling never lands on a stream's first frame."""
    if model_id == NOOP:
        return NoopModel()
    from diffusers import AutoPipelineForImage2Image

    from kubepeer_runner.hf import load_diffusers

    loaded = load_diffusers(AutoPipelineForImage2Image, model_id, model_dir, device)
    model = DiffusionModel(loaded.pipe, device, model_id)
    if "TORCH_COMPILE" in optimizations and device.name == "cuda":
        model.compile()
        params = LiveParams()
        model(np.zeros((params.height, params.width, 3), dtype=np.uint8), params)
    return model
