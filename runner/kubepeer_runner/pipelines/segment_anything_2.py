"""segment-anything-2: SAM2 in transformers, prompted by points and/or a box.

As ai-runner does, prompts arrive as JSON strings in a multipart form and the masks,
scores and logits go back as JSON strings. Coordinates are pixels of the uploaded image.
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
from kubepeer_runner.serving import Device, bad_request, read_image

PIPELINE = "segment-anything-2"


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
    multimask: bool
    return_logits: bool


def load(spec: ModelSpec, model_dir: Path, device: Device) -> Loaded:
    from transformers import Sam2Model, Sam2Processor

    kwargs = load_kwargs(model_dir, spec.model_id, device)
    processor = Sam2Processor.from_pretrained(spec.model_id, **kwargs)
    model = Sam2Model.from_pretrained(spec.model_id, dtype=device.dtype, **kwargs)
    return Loaded(processor, model.to(device.name).eval(), device)


def _json_field(name: str, text: str) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise bad_request(f"{name} must be JSON, got {text[:40]!r}") from None


def parse_prompt(
    point_coords: str, point_labels: str, box: str, multimask: bool, return_logits: bool
) -> Prompt:
    points = _json_field("point_coords", point_coords)
    labels = _json_field("point_labels", point_labels)
    rect = _json_field("box", box)
    if points is not None and not (
        isinstance(points, list) and all(isinstance(p, list) and len(p) == 2 for p in points)
    ):
        raise bad_request("point_coords must be a list of [x, y] pairs")
    if (points is None) != (labels is None) or (points and len(points) != len(labels)):
        raise bad_request("point_labels must give one label (1 or 0) per point in point_coords")
    if labels is not None and any(label not in (0, 1) for label in labels):
        raise bad_request("point_labels must be 1 (foreground) or 0 (background)")
    if rect is not None and not (isinstance(rect, list) and len(rect) == 4):
        raise bad_request("box must be [x1, y1, x2, y2]")
    if points is None and rect is None:
        raise bad_request("give point_coords with point_labels, or a box")
    return Prompt(points, labels, rect, multimask, return_logits)


def segment(model: Loaded, image: Any, prompt: Prompt) -> MasksResponse:
    import torch

    kwargs: dict[str, Any] = {}
    if prompt.points is not None:
        kwargs["input_points"] = [[[[float(x), float(y)] for x, y in prompt.points]]]
        kwargs["input_labels"] = [[[int(label) for label in prompt.labels]]]
    if prompt.box is not None:
        kwargs["input_boxes"] = [[[float(v) for v in prompt.box]]]
    inputs = model.processor(images=image, return_tensors="pt", **kwargs).to(model.device.name)
    with torch.inference_mode():
        out = model.model(**inputs, multimask_output=prompt.multimask)
    logits = out.pred_masks[0, 0]  # (masks, h, w) at low resolution
    masks = model.processor.post_process_masks(
        out.pred_masks.float().cpu(), inputs["original_sizes"].cpu(), binarize=True
    )[0][0]
    return MasksResponse(
        masks=json.dumps(masks.int().tolist()),
        scores=json.dumps(out.iou_scores[0, 0].float().cpu().tolist()),
        logits=json.dumps(logits.float().cpu().tolist() if prompt.return_logits else []),
    )


def register(app: FastAPI, runner: Any) -> None:
    async def segment_anything_2(
        image: UploadFile = File(...),
        model_id: str = Form(""),
        point_coords: str = Form(""),
        point_labels: str = Form(""),
        box: str = Form(""),
        mask_input: str = Form(""),
        multimask_output: bool = Form(True),
        return_logits: bool = Form(True),
        normalize_coords: bool = Form(True),
    ) -> MasksResponse:
        model = runner.model(PIPELINE, model_id)
        if mask_input:
            raise bad_request("mask_input is not supported by this runner yet")
        prompt = parse_prompt(point_coords, point_labels, box, multimask_output, return_logits)
        picture = read_image(await image.read())
        return await runner.queue.run(segment, model, picture, prompt)

    app.post("/segment-anything-2", response_model=MasksResponse)(segment_anything_2)
    app.post("/segment-anything-2/", include_in_schema=False)(segment_anything_2)
