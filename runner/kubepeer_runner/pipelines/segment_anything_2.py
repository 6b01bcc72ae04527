"""segment-anything-2: SAM2 in transformers, prompted by points, a box and/or a mask.

As ai-runner does, prompts arrive as JSON strings in a multipart form and the masks, scores
and logits go back as JSON strings. Coordinates are pixels of the uploaded image, or
fractions of its width and height with normalize_coords=false.

Masks are compact: ai-runner's schema makes `masks` a string, and a nested list of a photo's
pixels is hundreds of MB, so each mask is COCO's uncompressed run-length encoding
`{"size": [height, width], "counts": [...]}` (column-major, starting with a run of zeros;
pycocotools' `frPyObjects` reads it). Should the encoded masks still exceed MAX_MASKS_BYTES,
they are halved in resolution until they fit, and `size` says so. `logits` are the model's
low-resolution (256x256) mask logits, the input `mask_input` takes on a refining pass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, UploadFile
from pydantic import BaseModel

from kubepeer_runner.config import ModelSpec
from kubepeer_runner.hf import load_kwargs
from kubepeer_runner.serving import Device, bad_request, read_upload, serve

PIPELINE = "segment-anything-2"
BODY_LIMIT = "max_upload_bytes"
MAX_MASK_INPUT_SIDE = 1024


class MasksResponse(BaseModel):
    masks: str
    scores: str
    logits: str


@dataclass
class Loaded:
    processor: Any
    model: Any
    device: Device


@dataclass(frozen=True)
class Prompt:
    points: list[list[float]] | None
    labels: list[int] | None
    box: list[float] | None
    mask: list[list[float]] | None  # H x W low-resolution logits
    multimask: bool
    return_logits: bool
    normalized: bool  # coordinates are fractions of the image's width and height


def load(spec: ModelSpec, model_dir: Path, device: Device) -> Loaded:
    from transformers import Sam2Model, Sam2Processor

    kwargs = load_kwargs(model_dir, spec.model_id, device)
    processor = Sam2Processor.from_pretrained(spec.model_id, **kwargs)
    model = Sam2Model.from_pretrained(spec.model_id, dtype=device.dtype, **kwargs)
    return Loaded(processor, model.to(device.name).eval(), device)


def _json_field(name: str, text: str | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise bad_request(f"{name} must be JSON, got {text[:40]!r}") from None


def _numbers(values: Any) -> bool:
    return isinstance(values, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
    )


def _mask_grid(mask: Any) -> list[list[float]] | None:
    """mask_input as H x W rows: ai-runner's 1xHxW form, or HxW."""
    if mask is None:
        return None
    nested = isinstance(mask, list) and len(mask) == 1 and isinstance(mask[0], list)
    if nested and mask[0] and isinstance(mask[0][0], list):
        mask = mask[0]
    if not (isinstance(mask, list) and mask and all(_numbers(row) for row in mask)):
        raise bad_request("mask_input must be a 1xHxW (or HxW) array of numbers")
    height, width = len(mask), len(mask[0])
    if any(len(row) != width for row in mask) or width == 0:
        raise bad_request("mask_input rows must all have the same length")
    if max(height, width) > MAX_MASK_INPUT_SIDE:
        raise bad_request(
            f"mask_input is {height}x{width}, more than {MAX_MASK_INPUT_SIDE} on a side "
            "(SAM2 takes a 256x256 low-resolution mask)"
        )
    return mask


def parse_prompt(
    point_coords: str | None, point_labels: str | None, box: str | None, mask_input: str | None,
    multimask: bool, return_logits: bool, normalize_coords: bool,
) -> Prompt:  # fmt: skip
    points = _json_field("point_coords", point_coords)
    labels = _json_field("point_labels", point_labels)
    rect = _json_field("box", box)
    mask = _mask_grid(_json_field("mask_input", mask_input))
    if points is not None and not (
        isinstance(points, list) and points and all(_numbers(p) and len(p) == 2 for p in points)
    ):
        raise bad_request(f"point_coords must be a list of [x, y] pairs, got {point_coords!r}")
    if (points is None) != (labels is None) or (points and len(points) != len(labels)):
        raise bad_request("point_labels must give one label (1 or 0) per point in point_coords")
    if labels is not None and any(label not in (0, 1) for label in labels):
        raise bad_request(f"point_labels must be 1 (foreground) or 0 (background), got {labels}")
    if rect is not None and not (_numbers(rect) and len(rect) == 4):
        raise bad_request(f"box must be [x1, y1, x2, y2], got {box!r}")
    if points is None and rect is None and mask is None:
        raise bad_request("give point_coords with point_labels, a box, or a mask_input")
    return Prompt(points, labels, rect, mask, multimask, return_logits, not normalize_coords)


def rle(mask: Any) -> dict[str, Any]:
    """COCO's uncompressed run-length encoding of a binary mask (column-major, zeros first)."""
    import numpy as np

    flat = np.asarray(mask, dtype=np.uint8).ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate(([0], changes, [flat.size]))).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": list(mask.shape), "counts": counts}


def encode_masks(masks: Any, max_bytes: int) -> str:
    """The masks as a JSON list of RLEs, halved in resolution until within max_bytes."""
    while True:
        text = json.dumps([rle(m) for m in masks], separators=(",", ":"))
        if len(text) <= max_bytes or min(masks.shape[-2:]) <= 1:
            return text
        masks = masks[..., ::2, ::2]


def segment(model: Loaded, image: Any, prompt: Prompt, max_bytes: int) -> MasksResponse:
    import torch

    scale = (image.width, image.height) if prompt.normalized else (1, 1)
    kwargs: dict[str, Any] = {}
    if prompt.points is not None:
        points = [[float(x) * scale[0], float(y) * scale[1]] for x, y in prompt.points]
        kwargs["input_points"] = [[points]]
        kwargs["input_labels"] = [[[int(label) for label in prompt.labels or []]]]
    if prompt.box is not None:
        x1, y1, x2, y2 = (float(v) for v in prompt.box)
        kwargs["input_boxes"] = [[[x1 * scale[0], y1 * scale[1], x2 * scale[0], y2 * scale[1]]]]
    inputs = model.processor(images=image, return_tensors="pt", **kwargs).to(model.device.name)
    if prompt.mask is not None:
        grid = torch.tensor(prompt.mask, dtype=model.device.dtype, device=model.device.name)
        inputs["input_masks"] = grid[None, None]
    with torch.inference_mode():
        out = model.model(**inputs, multimask_output=prompt.multimask)
    logits = out.pred_masks[0, 0]  # (masks, 256, 256): low resolution
    masks = model.processor.post_process_masks(
        out.pred_masks.float().cpu(), inputs["original_sizes"].cpu(), binarize=True
    )[0][0]
    low_res = logits.float().cpu().numpy().round(3).tolist() if prompt.return_logits else []
    return MasksResponse(
        masks=encode_masks(masks.numpy().astype("uint8"), max_bytes),
        scores=json.dumps(out.iou_scores[0, 0].float().cpu().tolist()),
        logits=json.dumps(low_res, separators=(",", ":")),
    )


def register(app: FastAPI, runner: Any) -> None:
    async def segment_anything_2(
        image: UploadFile = File(...),
        model_id: str = Form(""),
        point_coords: str | None = Form(None),
        point_labels: str | None = Form(None),
        box: str | None = Form(None),
        mask_input: str | None = Form(None),
        multimask_output: bool = Form(True),
        return_logits: bool = Form(True),
        normalize_coords: bool = Form(True),
    ) -> MasksResponse:
        model = await runner.model(PIPELINE, model_id)
        prompt = parse_prompt(
            point_coords, point_labels, box, mask_input, multimask_output, return_logits,
            normalize_coords,
        )  # fmt: skip
        picture = await read_upload(image, runner.limits)
        limit = runner.limits.max_masks_bytes
        return await runner.queue.run(segment, model, picture, prompt, limit)

    serve(app, "/" + PIPELINE, segment_anything_2, "genSegmentAnything2", MasksResponse)
