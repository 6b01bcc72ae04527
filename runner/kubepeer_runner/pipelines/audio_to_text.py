"""audio-to-text: the transformers speech-recognition pipeline (Whisper, CTC models, ...).

Audio in any container or codec is decoded with PyAV (FFmpeg inside the wheel) to 16 kHz
mono; its duration in milliseconds is what a gateway is billed for.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, UploadFile
from pydantic import BaseModel

from kubepeer_runner.config import ModelSpec
from kubepeer_runner.hf import load_kwargs
from kubepeer_runner.serving import Device, bad_request

PIPELINE = "audio-to-text"
SAMPLE_RATE = 16_000
MAX_SECONDS = 4 * 3600


class Chunk(BaseModel):
    timestamp: tuple[float | None, float | None]
    text: str


class TextResponse(BaseModel):
    text: str
    chunks: list[Chunk]


@dataclass
class Loaded:
    asr: Any
    timestamps: str | bool  # what to ask the pipeline for: Whisper "segment" or CTC "word"


def load(spec: ModelSpec, model_dir: Path, device: Device) -> Loaded:
    from transformers import (
        AutoConfig,
        AutoModelForCTC,
        AutoModelForSpeechSeq2Seq,
        AutoProcessor,
        pipeline,
    )

    kwargs = load_kwargs(model_dir, spec.model_id, device)
    config = AutoConfig.from_pretrained(spec.model_id, **kwargs)
    ctc = any(a.endswith("ForCTC") for a in config.architectures or [])
    model_class = AutoModelForCTC if ctc else AutoModelForSpeechSeq2Seq
    model = model_class.from_pretrained(spec.model_id, dtype=device.dtype, **kwargs)
    processor = AutoProcessor.from_pretrained(spec.model_id, **kwargs)
    asr = pipeline(
        "automatic-speech-recognition",
        model=model.to(device.name).eval(),
        tokenizer=processor.tokenizer,
        feature_extractor=processor.feature_extractor,
        device=device.name,
    )
    # Whisper gives segment timestamps; a CTC model gives them per word.
    return Loaded(asr, "word" if ctc else True)


def decode_audio(data: bytes) -> Any:
    """16 kHz mono float32 samples of any audio file PyAV can read."""
    import av
    import numpy as np

    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.audio:
                raise bad_request("audio has no audio stream")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            frames = []
            for frame in container.decode(audio=0):
                frames += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
            frames += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    except av.error.FFmpegError:
        raise bad_request("audio is not an audio file FFmpeg can decode") from None
    samples = np.concatenate(frames) if frames else np.zeros(0, dtype=np.float32)
    if samples.size == 0:
        raise bad_request("audio is empty")
    if samples.size > MAX_SECONDS * SAMPLE_RATE:
        raise bad_request(f"audio is longer than {MAX_SECONDS} s")
    return samples


def transcribe(model: Loaded, samples: Any, return_timestamps: bool) -> TextResponse:
    # A CTC model refuses return_timestamps=False: not asking is how to say no.
    wanted = {"return_timestamps": model.timestamps} if return_timestamps else {}
    out = model.asr({"raw": samples, "sampling_rate": SAMPLE_RATE}, **wanted)
    chunks = [
        Chunk(timestamp=tuple(c.get("timestamp", (None, None))), text=c["text"])
        for c in out.get("chunks", [])
    ]
    return TextResponse(text=out["text"], chunks=chunks)


def register(app: FastAPI, runner: Any) -> None:
    async def audio_to_text(
        audio: UploadFile = File(...),
        model_id: str = Form(""),
        return_timestamps: str = Form("true"),
        metadata: str = Form("{}"),
    ) -> TextResponse:
        model = runner.model(PIPELINE, model_id)
        try:
            json.loads(metadata)
        except json.JSONDecodeError:
            raise bad_request("metadata must be a JSON object") from None
        samples = decode_audio(await audio.read())
        wanted = return_timestamps.strip().lower() not in ("false", "0", "no", "")
        return await runner.queue.run(transcribe, model, samples, wanted)

    app.post("/audio-to-text", response_model=TextResponse)(audio_to_text)
    app.post("/audio-to-text/", include_in_schema=False)(audio_to_text)
