"""text-to-speech: a transformers text-to-waveform model (VITS/MMS-class), WAV out.

ai-runner's Parler-TTS also takes a voice `description` (its default one when none is
given); models that have no use for one (VITS) accept and ignore it.
"""

from __future__ import annotations

import base64
import io
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from kubepeer_runner.config import ModelSpec
from kubepeer_runner.hf import load_kwargs
from kubepeer_runner.serving import Device, at_most, bad_request, serve

PIPELINE = "text-to-speech"
BODY_LIMIT = "max_json_bytes"
DEFAULT_DESCRIPTION = (
    "A male speaker delivers a slightly expressive and animated speech with a moderate speed "
    "and pitch."
)


class TextToSpeechParams(BaseModel):
    # Every field optional, as in ai-runner: an empty text is refused by the route (400).
    model_id: str = ""
    text: str = ""
    description: str = DEFAULT_DESCRIPTION


class MediaURL(BaseModel):
    url: str


class AudioResponse(BaseModel):
    audio: MediaURL


@dataclass
class Loaded:
    tokenizer: Any
    model: Any
    device: Device


def load(spec: ModelSpec, model_dir: Path, device: Device) -> Loaded:
    import torch
    from transformers import AutoModelForTextToWaveform, AutoTokenizer

    kwargs = load_kwargs(model_dir, spec.model_id, device)
    tokenizer = AutoTokenizer.from_pretrained(spec.model_id, **kwargs)
    # fp32 even on a GPU: a VITS duration predictor's splines overflow in fp16 (on an H200
    # every request failed with "Discriminant has negative values" over inf/nan), and a
    # model of tens of millions of parameters gains nothing measurable from half precision.
    model = AutoModelForTextToWaveform.from_pretrained(spec.model_id, dtype=torch.float32, **kwargs)
    return Loaded(tokenizer, model.to(device.name).eval(), device)


def wav_data_url(samples: Any, rate: int) -> str:
    import numpy as np

    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes()
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm)
    return "data:audio/wav;base64," + base64.b64encode(buffer.getvalue()).decode()


def speak(model: Loaded, req: TextToSpeechParams) -> AudioResponse:
    import torch

    inputs = model.tokenizer(req.text, return_tensors="pt").to(model.device.name)
    with torch.inference_mode():
        waveform = model.model(**inputs).waveform[0].float().cpu().numpy()
    rate = model.model.config.sampling_rate
    return AudioResponse(audio=MediaURL(url=wav_data_url(waveform, rate)))


def register(app: FastAPI, runner: Any) -> None:
    async def text_to_speech(req: TextToSpeechParams) -> AudioResponse:
        model = await runner.model(PIPELINE, req.model_id)
        if not req.text.strip():
            raise bad_request("Text input must be provided.")
        at_most(runner.limits, text_characters=len(req.text))
        return await runner.queue.run(speak, model, req)

    serve(app, "/" + PIPELINE, text_to_speech, "genTextToSpeech", AudioResponse)
