"""What a runner serves, from its environment (the contract in DESIGN.md, "Runner environment").

One model:   PIPELINE, MODEL_ID
Share group: MODELS='[{"pipeline": ..., "model_id": ..., "optimizations": [...],
                      "capacity": 4}, ...]'
Always:      MODEL_DIR (Hugging Face cache layout, default /models), AUTH_TOKEN (optional),
             VERSION (what /version reports, default the ai-runner API version served),
             optimisation flags SFAST, DEEPCACHE, SFAST_WARMUP, BFLOAT16, TORCH_COMPILE,
             and every field of Limits by its upper-case name (CAPACITY, MAX_UPLOAD_BYTES, ...).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

PIPELINES = (
    "text-to-image",
    "image-to-image",
    "image-to-video",
    "upscale",
    "audio-to-text",
    "segment-anything-2",
    "llm",
    "image-to-text",
    "live-video-to-video",
    "text-to-speech",
)
FLAGS = ("SFAST", "DEEPCACHE", "SFAST_WARMUP", "BFLOAT16", "TORCH_COMPILE")
# The ai-runner API this runner implements (its OpenAPI document's info.version): the
# default for /version, so gateways that require a minimum runner version accept us.
AI_RUNNER_API_VERSION = "0.14.1"
MIB = 1024 * 1024


class ConfigError(ValueError):
    """The environment does not say what to serve; the message says what is wrong."""


@dataclass(frozen=True)
class Limits:
    """Every limit the runner applies, each set by the env var of its upper-case name.

    The defaults accept whatever a gateway sends by default and everything ai-runner
    v0.14.1 accepts in practice; they exist so one request cannot take the pod down."""

    # Requests of one model in flight at once (waiting or running): AIModel.spec.capacity.
    # 64 is the most an AIModel may advertise, so an unconfigured runner never refuses
    # what its proxy may send; beyond it a request is refused with a 500 at once.
    capacity: int = 64
    # How long a request may wait for its model to load and then for the device (each).
    wait_timeout_seconds: float = 600.0
    # Request bodies, counted while they stream in, before anything is decoded (413).
    max_upload_bytes: int = 50 * MIB  # images: ai-runner's own image-to-text limit
    max_audio_upload_bytes: int = 512 * MIB  # four hours of compressed audio
    max_json_bytes: int = 16 * MIB
    max_input_pixels: int = 8192 * 8192  # a decoded upload (PIL refuses ~179M itself)
    max_output_pixels: int = 4096 * 4096  # height x width asked of a generator
    max_inference_steps: int = 1000
    max_images_per_prompt: int = 32
    max_new_tokens: int = 32768  # llm max_tokens
    max_speech_characters: int = 10000  # text-to-speech text, as ai-runner's later releases
    max_audio_seconds: int = 4 * 3600
    max_masks_bytes: int = 8 * MIB  # segment-anything-2's encoded masks (then downscaled)
    # Out-of-memory failures in a row that mean the device is unusable (health ERROR).
    max_consecutive_oom: int = 3
    # live-video-to-video: a stream whose input sends no segment for this long is torn
    # down; status events this often (at most 10: gateways drop a stream after 30 s
    # without one); decoded frames waiting for the model before the oldest is dropped.
    live_input_timeout_seconds: float = 60.0
    live_status_interval_seconds: float = 10.0
    live_max_queued_frames: int = 48  # 2 s at 24 fps

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Limits:
        values: dict[str, int | float] = {}
        for f in fields(cls):
            name = f.name.upper()
            if name not in env:
                continue
            kind = float if f.type == "float" else int
            try:
                value = kind(env[name])
            except ValueError:
                raise ConfigError(f"{name} '{env[name]}' is not a {kind.__name__}") from None
            if value <= 0:
                raise ConfigError(f"{name} '{env[name]}' must be positive")
            values[f.name] = value
        return cls(**values)


def flags_from_env(env: Mapping[str, str]) -> frozenset[str]:
    """The optimisation FLAGS set to 1, true or yes."""
    return frozenset(f for f in FLAGS if env.get(f, "").lower() in ("1", "true", "yes"))


@dataclass(frozen=True)
class ModelSpec:
    pipeline: str
    model_id: str
    optimizations: frozenset[str] = frozenset()
    capacity: int | None = None  # None: the runner-wide CAPACITY


@dataclass(frozen=True)
class RunnerConfig:
    models: tuple[ModelSpec, ...]
    model_dir: Path = Path("/models")
    auth_token: str | None = field(default=None, repr=False)
    version: str = AI_RUNNER_API_VERSION
    limits: Limits = Limits()

    def capacity(self, spec: ModelSpec) -> int:
        return spec.capacity or self.limits.capacity

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RunnerConfig:
        env = os.environ if env is None else env
        flags = flags_from_env(env)
        if env.get("MODELS"):
            models = _parse_models(env["MODELS"])
        else:
            missing = [name for name in ("PIPELINE", "MODEL_ID") if not env.get(name)]
            if missing:
                raise ConfigError(
                    f"{' and '.join(missing)} must be set (or MODELS for a share group)"
                )
            models = (ModelSpec(env["PIPELINE"], env["MODEL_ID"], flags),)
        for spec in models:
            if spec.pipeline not in PIPELINES:
                raise ConfigError(
                    f"PIPELINE '{spec.pipeline}' is not a Livepeer pipeline "
                    f"(one of: {', '.join(PIPELINES)})"
                )
        pipelines = [m.pipeline for m in models]
        duplicated = {p for p in pipelines if pipelines.count(p) > 1}
        if duplicated:
            raise ConfigError(
                f"MODELS serves {', '.join(sorted(duplicated))} twice: one model per pipeline"
            )
        return cls(
            models=models,
            model_dir=Path(env.get("MODEL_DIR", "/models")),
            auth_token=env.get("AUTH_TOKEN") or None,
            version=env.get("VERSION") or AI_RUNNER_API_VERSION,
            limits=Limits.from_env(env),
        )

    def with_limits(self, **changes: int | float) -> RunnerConfig:
        return replace(self, limits=replace(self.limits, **changes))


def _parse_models(text: str) -> tuple[ModelSpec, ...]:
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"MODELS is not JSON: {exc}") from None
    if not isinstance(entries, list) or not entries:
        raise ConfigError("MODELS must be a non-empty JSON list")
    models = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not entry.get("pipeline") or not entry.get("model_id"):
            raise ConfigError(f"MODELS[{i}] needs a pipeline and a model_id")
        capacity = entry.get("capacity")
        if capacity is not None and not (isinstance(capacity, int) and capacity > 0):
            raise ConfigError(f"MODELS[{i}].capacity '{capacity}' must be a positive integer")
        models.append(
            ModelSpec(
                entry["pipeline"],
                entry["model_id"],
                frozenset(entry.get("optimizations", [])),
                capacity,
            )
        )
    return tuple(models)
