"""What a runner serves, from its environment (the contract in DESIGN.md, "Runner environment").

One model:   PIPELINE, MODEL_ID
Share group: MODELS='[{"pipeline": ..., "model_id": ..., "optimizations": [...]}, ...]'
Always:      MODEL_DIR (Hugging Face cache layout, default /models), AUTH_TOKEN (optional),
             optimisation flags SFAST, DEEPCACHE, SFAST_WARMUP, BFLOAT16, TORCH_COMPILE.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
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


class ConfigError(ValueError):
    """The environment does not say what to serve; the message says what is wrong."""


@dataclass(frozen=True)
class ModelSpec:
    pipeline: str
    model_id: str
    optimizations: frozenset[str] = frozenset()


@dataclass(frozen=True)
class RunnerConfig:
    models: tuple[ModelSpec, ...]
    model_dir: Path = Path("/models")
    auth_token: str | None = field(default=None, repr=False)
    max_queue: int = 8  # requests waiting for the device beyond the one running

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RunnerConfig:
        env = os.environ if env is None else env
        flags = frozenset(f for f in FLAGS if env.get(f, "").lower() in ("1", "true", "yes"))
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
        try:
            max_queue = int(env.get("MAX_QUEUE", "8"))
        except ValueError:
            raise ConfigError(f"MAX_QUEUE '{env['MAX_QUEUE']}' is not a whole number") from None
        return cls(
            models=models,
            model_dir=Path(env.get("MODEL_DIR", "/models")),
            auth_token=env.get("AUTH_TOKEN") or None,
            max_queue=max_queue,
        )


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
        models.append(
            ModelSpec(
                entry["pipeline"], entry["model_id"], frozenset(entry.get("optimizations", []))
            )
        )
    return tuple(models)
