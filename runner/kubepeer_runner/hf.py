"""Loading from a local Hugging Face cache (MODEL_DIR), never from a hub."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubepeer_runner.serving import Device


def snapshot(model_dir: Path, model_id: str) -> Path:
    """The directory `from_pretrained(model_id, cache_dir=model_dir)` reads from."""
    repo = model_dir / ("models--" + model_id.replace("/", "--"))
    ref = repo / "refs" / "main"
    if not ref.is_file():
        raise FileNotFoundError(
            f"{model_id} is not in {model_dir} (expected {ref}): download it into the model "
            "cache first; the runner never fetches weights"
        )
    return repo / "snapshots" / ref.read_text().strip()


def load_kwargs(model_dir: Path, model_id: str, device: Device) -> dict[str, Any]:
    """from_pretrained arguments: the local cache only, fp16 weights on a GPU when present."""
    kwargs: dict[str, Any] = {"cache_dir": str(model_dir), "local_files_only": True}
    files = snapshot(model_dir, model_id)  # a clear error when the weights are not there
    if device.name == "cuda" and any(files.rglob("*.fp16.safetensors")):
        kwargs["variant"] = "fp16"
    return kwargs


@dataclass
class DiffusersModel:
    pipe: Any
    device: Device


def load_diffusers(
    pipeline_class: Any, model_id: str, model_dir: Path, device: Device
) -> DiffusersModel:
    """A diffusers pipeline from the cache, on the device, without progress bars."""
    pipe = pipeline_class.from_pretrained(
        model_id, torch_dtype=device.dtype, **load_kwargs(model_dir, model_id, device)
    )
    pipe.to(device.name)
    pipe.set_progress_bar_config(disable=True)
    return DiffusersModel(pipe, device)
