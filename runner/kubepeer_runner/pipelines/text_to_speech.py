"""text-to-speech: a transformers text-to-waveform model (VITS/MMS-class), WAV out.

ai-runner's Parler-TTS also takes a voice `description`; models that have no use for one
(VITS) accept and ignore it.
"""

from __future__ import annotations

import base64
import io
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field

from kubepeer_runner.config import ModelSpec
from kubepeer_runner.hf import load_kwargs
from kubepeer_runner.serving import Device

PIPELINE = "text-to-speech"
MAX_CHARACTERS = 2000


class TextToSpeechRequest(BaseModel):
    model_id: str = ""
    text: str = Field(min_length=1, max_length=MAX_CHARACTERS)
    description: str = ""


class AudioUrl(BaseModel):
    url: str


class AudioResponse(BaseModel):
    audio: AudioUrl


@dataclass
class Loaded:
    tokenizer: Any
    model: Any
    device: Device


def load(spec: ModelSpec, model_dir: Path, device: Device) -> Loaded:
    from transformers import AutoModelForTextToWaveform, AutoTokenizer

    kwargs = load_kwargs(model_dir, spec.model_id, device)
    tokenizer = AutoTokenizer.from_pretrained(spec.model_id, **kwargs)
    model = AutoModelForTextToWaveform.from_pretrained(spec.model_id, dtype=device.dtype, **kwargs)
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


def speak(model: Loaded, req: TextToSpeechRequest) -> AudioResponse:
    import torch

    inputs = model.tokenizer(req.text, return_tensors="pt").to(model.device.name)
    with torch.inference_mode():
        waveform = model.model(**inputs).waveform[0].float().cpu().numpy()
    rate = model.model.config.sampling_rate
    return AudioResponse(audio=AudioUrl(url=wav_data_url(waveform, rate)))


def register(app: FastAPI, runner: Any) -> None:
    async def text_to_speech(req: TextToSpeechRequest) -> AudioResponse:
        model = runner.model(PIPELINE, req.model_id)
        return await runner.queue.run(speak, model, req)

    app.post("/text-to-speech", response_model=AudioResponse)(text_to_speech)
    app.post("/text-to-speech/", include_in_schema=False)(text_to_speech)
