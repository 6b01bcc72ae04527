"""What a runner serves, from its environment (the contract in DESIGN.md, "Runner environment").

One settings object, `RunnerSettings` (pydantic-settings, ai-runner's names, no prefix):
each default is written once, on its field; a bad value is a ConfigError naming the
variable and the value.

One model:   PIPELINE, MODEL_ID
Share group: MODELS='[{"pipeline": ..., "model_id": ..., "optimizations": [...],
                      "capacity": 4}, ...]'
Always:      MODEL_DIR (Hugging Face cache layout, default /models), AUTH_TOKEN (optional),
             VERSION (what /version reports, default the ai-runner API version served),
             HOST and PORT (where it listens, 0.0.0.0:8000), optimisation flags SFAST,
             DEEPCACHE, SFAST_WARMUP, BFLOAT16, TORCH_COMPILE,
             and every field of Limits by its upper-case name (CAPACITY, MAX_UPLOAD_BYTES, ...).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Self

from pydantic import Field, PositiveFloat, PositiveInt, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

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


_SETTINGS = SettingsConfigDict(case_sensitive=False, extra="ignore", frozen=True,
                               env_ignore_empty=True)  # fmt: skip


class Limits(BaseSettings):
    """Every limit the runner applies, each set by the env var of its upper-case name.

    The defaults accept whatever a gateway sends by default and everything ai-runner
    v0.14.1 accepts in practice; they exist so one request cannot take the pod down."""

    model_config = _SETTINGS

    # Requests of one model in flight at once (waiting or running): AIModel.spec.capacity.
    # 64 is the most an AIModel may advertise, so an unconfigured runner never refuses
    # what its proxy may send; beyond it a request is refused with a 500 at once.
    capacity: PositiveInt = 64
    # How long a request may wait for its model to load and then for the device (each).
    wait_timeout_seconds: PositiveFloat = 600.0
    # Request bodies, counted while they stream in, before anything is decoded (413).
    max_upload_bytes: PositiveInt = 50 * MIB  # images: ai-runner's own image-to-text limit
    max_audio_upload_bytes: PositiveInt = 512 * MIB  # four hours of compressed audio
    max_json_bytes: PositiveInt = 16 * MIB
    max_input_pixels: PositiveInt = 8192 * 8192  # a decoded upload (PIL refuses ~179M itself)
    max_output_pixels: PositiveInt = 4096 * 4096  # height x width asked of a generator
    max_inference_steps: PositiveInt = 1000
    max_images_per_prompt: PositiveInt = 32
    max_new_tokens: PositiveInt = 32768  # llm max_tokens
    max_speech_characters: PositiveInt = 10000  # text-to-speech text, as later ai-runners
    max_audio_seconds: PositiveInt = 4 * 3600
    max_masks_bytes: PositiveInt = 8 * MIB  # segment-anything-2's encoded masks (downscaled)
    # Out-of-memory failures in a row that mean the device is unusable (health ERROR).
    max_consecutive_oom: PositiveInt = 3
    # live-video-to-video: a stream whose input sends no segment for this long is torn
    # down; status events this often (at most 10: gateways drop a stream after 30 s
    # without one); decoded frames waiting for the model before the oldest is dropped.
    live_input_timeout_seconds: PositiveFloat = 60.0
    live_status_interval_seconds: PositiveFloat = 10.0
    live_max_queued_frames: PositiveInt = 48  # 2 s at 24 fps

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Self:
        """The settings `env` gives, read as the process's environment would be (names in
        any case, empty values unset); a bad value is a ConfigError."""
        names = {name.upper(): name for name in cls.model_fields}
        given = {names[k.upper()]: v for k, v in env.items() if k.upper() in names and v != ""}
        try:
            return cls.model_validate(given)
        except ValidationError as exc:
            raise ConfigError(_said(exc)) from None


class RunnerSettings(Limits):
    """The runner's whole environment: what it serves, where it listens, and its Limits."""

    pipeline: str = ""
    model_id: str = ""
    models: str = ""  # a share group: a JSON list (_parse_models names a bad entry)
    model_dir: Path = Path("/models")
    auth_token: str = Field("", repr=False)
    version: str = AI_RUNNER_API_VERSION  # what /version reports
    host: str = "0.0.0.0"
    port: int = Field(8000, gt=0, lt=65536)
    sfast: bool = False
    deepcache: bool = False
    sfast_warmup: bool = False
    bfloat16: bool = False
    torch_compile: bool = False

    @classmethod
    def read(cls, env: Mapping[str, str] | None = None) -> RunnerSettings:
        """From the process's environment, or from `env`; a bad value is a ConfigError."""
        if env is not None:
            return cls.from_env(env)
        try:
            return cls()
        except ValidationError as exc:
            raise ConfigError(_said(exc)) from None

    @property
    def flags(self) -> frozenset[str]:
        """The optimisation FLAGS that are set."""
        return frozenset(flag for flag in FLAGS if getattr(self, flag.lower()))

    @property
    def limits(self) -> Limits:
        return Limits.model_validate(self.model_dump(include=set(Limits.model_fields)))


def _said(exc: ValidationError) -> str:
    """A settings error as the runner says it: the variable, the value, what is wrong."""
    error = exc.errors()[0]
    name, value = str(error["loc"][0]).upper(), error.get("input")
    kinds = {"int_parsing": "an integer", "float_parsing": "a number", "bool_parsing": "a boolean"}
    if error["type"] in kinds:
        return f"{name} '{value}' is not {kinds[error['type']]}"
    if error["type"] == "greater_than":
        return f"{name} '{value}' must be positive"
    return f"{name} '{value}': {error['msg']}"


@dataclass(frozen=True)
class ModelSpec:
    pipeline: str
    model_id: str
    optimizations: frozenset[str] = frozenset()
    capacity: int | None = None  # None: the runner-wide CAPACITY


@dataclass(frozen=True)
class RunnerConfig:
    """What the runner serves and how, as its settings say it."""

    models: tuple[ModelSpec, ...]
    model_dir: Path = RunnerSettings.model_fields["model_dir"].default
    auth_token: str | None = field(default=None, repr=False)
    version: str = AI_RUNNER_API_VERSION
    limits: Limits = field(default_factory=lambda: Limits.from_env({}))
    host: str = RunnerSettings.model_fields["host"].default
    port: int = RunnerSettings.model_fields["port"].default

    def capacity(self, spec: ModelSpec) -> int:
        return spec.capacity or self.limits.capacity

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RunnerConfig:
        """What the environment (or `env`) says to serve; ConfigError when it cannot."""
        settings = RunnerSettings.read(env)
        if settings.models:
            models = _parse_models(settings.models)
        else:
            missing = [name for name in ("PIPELINE", "MODEL_ID")
                       if not getattr(settings, name.lower())]  # fmt: skip
            if missing:
                raise ConfigError(
                    f"{' and '.join(missing)} must be set (or MODELS for a share group)"
                )
            models = (ModelSpec(settings.pipeline, settings.model_id, settings.flags),)
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
            model_dir=settings.model_dir,
            auth_token=settings.auth_token or None,
            version=settings.version,
            limits=settings.limits,
            host=settings.host,
            port=settings.port,
        )

    def with_limits(self, **changes: int | float) -> RunnerConfig:
        return replace(self, limits=self.limits.model_copy(update=changes))


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
