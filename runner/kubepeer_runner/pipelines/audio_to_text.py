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
from kubepeer_runner.serving import Device, RunnerError, bad_request, off_loop, serve

PIPELINE = "audio-to-text"
TOO_LARGE_STATUS = 413  # ai-runner documents a 413 for this route
BODY_LIMIT = "max_audio_upload_bytes"
SAMPLE_RATE = 16_000
UNSUPPORTED = "Unsupported audio format or malformed file."  # ai-runner's words, with 415


class Chunk(BaseModel):
    timestamp: tuple[float | None, float | None]
    text: str


class TextResponse(BaseModel):
    text: str
    chunks: list[Chunk]


@dataclass
class Loaded:
    asr: Any
    segments: str | bool  # what to ask for sentence timestamps: Whisper True, CTC "word"


def parse_return_timestamps(value: str) -> str | bool:
    """ai-runner's values: 'true', '1' or 'sentence' (the default), 'false' or '0', 'word'."""
    lowered = value.strip().lower()
    if lowered in ("true", "1", "sentence"):
        return True
    if lowered in ("false", "0"):
        return False
    if lowered == "word":
        return "word"
    raise bad_request(f"return_timestamps '{value}' must be 'sentence', 'word', 'true' or 'false'")


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
    # Whisper gives segment timestamps; a CTC model has none coarser than words.
    return Loaded(asr, "word" if ctc else True)


def decode_audio(source: Any, max_seconds: int) -> Any:
    """16 kHz mono float32 samples of any audio file PyAV can read (bytes or a file)."""
    import av
    import numpy as np

    most = max_seconds * SAMPLE_RATE
    try:
        file = io.BytesIO(source) if isinstance(source, bytes) else source
        with av.open(file, mode="r") as container:
            if not container.streams.audio:
                raise RunnerError(415, f"{UNSUPPORTED} (no audio stream)")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            frames, count = [], 0
            for frame in container.decode(audio=0):
                new = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
                frames += new
                count += sum(f.size for f in new)
                if count > most:  # stop decoding: the rest is not needed to refuse it
                    raise RunnerError(
                        413, f"audio is longer than {max_seconds} s (MAX_AUDIO_SECONDS)"
                    )
            frames += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    except av.error.FFmpegError:
        raise RunnerError(415, UNSUPPORTED) from None
    samples = np.concatenate(frames) if frames else np.zeros(0, dtype=np.float32)
    if samples.size == 0:
        raise RunnerError(415, f"{UNSUPPORTED} (no audio samples)")
    return samples


def transcribe(model: Loaded, samples: Any, timestamps: str | bool) -> TextResponse:
    # A CTC model refuses return_timestamps=False: not asking is how to say no.
    kind = model.segments if timestamps is True else timestamps
    wanted = {"return_timestamps": kind} if timestamps else {}
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
        model = await runner.model(PIPELINE, model_id)
        timestamps = parse_return_timestamps(return_timestamps)
        try:
            json.loads(metadata)
        except json.JSONDecodeError:
            raise bad_request(f"metadata must be JSON, got {metadata[:40]!r}") from None
        audio.file.seek(0)
        samples = await off_loop(decode_audio, audio.file, runner.limits.max_audio_seconds)
        return await runner.queue.run(transcribe, model, samples, timestamps)

    serve(
        app, "/" + PIPELINE, audio_to_text, "genAudioToText", TextResponse, (TOO_LARGE_STATUS, 415)
    )
