"""The runner's pure parts: failure classification, device health, limits, mask encoding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kubepeer_runner.config import ConfigError, Limits, RunnerConfig
from kubepeer_runner.pipelines.audio_to_text import parse_return_timestamps
from kubepeer_runner.pipelines.segment_anything_2 import encode_masks, rle
from kubepeer_runner.serving import DeviceHealth, RunnerError, classify


@pytest.mark.parametrize(
    ("exc", "status", "oom", "fault"),
    [
        (torch.AcceleratorError("CUDA error: an illegal memory access was encountered"), 500,
         False, True),
        (RuntimeError("CUDA error: device-side assert triggered"), 500, False, True),
        (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasGemmEx"), 500, False,
         True),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), 500, True, False),
        (ValueError("`height` must be divisible by 8"), 400, False, False),
        (RuntimeError("shape mismatch"), 500, False, False),
        (RunnerError(413, "too big"), 413, False, False),
    ],
)  # fmt: skip
def test_classify_tells_bad_input_from_a_broken_device(exc, status, oom, fault):
    failure = classify(exc)
    assert (failure.error.status, failure.out_of_memory, failure.device_fault) == (
        status, oom, fault)  # fmt: skip


def test_device_health_breaks_on_a_fault_or_oom_in_a_row_only():
    health = DeviceHealth(max_consecutive_oom=2)
    oom = classify(torch.OutOfMemoryError("CUDA out of memory."))
    health.record(oom)
    health.record(None)
    health.record(oom)
    assert health.broken is None
    health.record(oom)
    assert health.broken == "2 out-of-memory failures in a row"
    faulty = DeviceHealth(max_consecutive_oom=2)
    faulty.record(classify(RuntimeError("CUDA error: misaligned address")))
    assert "misaligned address" in (faulty.broken or "")


def test_limits_come_from_env_by_name_and_refuse_nonsense():
    limits = Limits.from_env({"CAPACITY": "16", "WAIT_TIMEOUT_SECONDS": "2.5"})
    assert (limits.capacity, limits.wait_timeout_seconds) == (16, 2.5)
    assert limits.max_upload_bytes == Limits().max_upload_bytes
    with pytest.raises(ConfigError, match="CAPACITY 'x' is not a"):
        Limits.from_env({"CAPACITY": "x"})
    with pytest.raises(ConfigError, match="must be positive"):
        Limits.from_env({"MAX_JSON_BYTES": "-1"})


def test_the_process_environment_is_read_by_one_settings_object(monkeypatch):
    """RunnerSettings reads the real environment (any case, empty means unset): what it
    serves, where it listens, its flags and limits; a bad value names the variable."""
    for name, value in {"PIPELINE": "llm", "model_id": "a/b", "PORT": "9001", "HOST": "127.0.0.1",
                        "BFLOAT16": "yes", "SFAST": "", "Capacity": "7"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    config = RunnerConfig.from_env()
    assert [(m.pipeline, m.model_id, m.optimizations) for m in config.models] == [
        ("llm", "a/b", frozenset({"BFLOAT16"}))
    ]
    assert (config.host, config.port, config.limits.capacity) == ("127.0.0.1", 9001, 7)
    assert config.limits.max_json_bytes == Limits().max_json_bytes  # the default, written once
    monkeypatch.setenv("TORCH_COMPILE", "perhaps")
    with pytest.raises(ConfigError, match="TORCH_COMPILE 'perhaps' is not a boolean"):
        RunnerConfig.from_env()
    monkeypatch.setenv("TORCH_COMPILE", "0")
    monkeypatch.setenv("PORT", "70000")
    with pytest.raises(ConfigError, match="PORT '70000'"):
        RunnerConfig.from_env()


def test_per_model_capacity_overrides_the_runner_wide_one():
    models = json.dumps([{"pipeline": "llm", "model_id": "a/b", "capacity": 3},
                         {"pipeline": "text-to-image", "model_id": "c/d"}])  # fmt: skip
    config = RunnerConfig.from_env({"MODELS": models, "CAPACITY": "5"})
    assert [config.capacity(m) for m in config.models] == [3, 5]
    assert config.version == "0.14.1"
    with pytest.raises(ConfigError, match="capacity '0'"):
        RunnerConfig.from_env({"MODELS": '[{"pipeline": "llm", "model_id": "a/b", "capacity": 0}]'})


def test_return_timestamps_takes_ai_runners_values():
    values = ("true", "1", "Sentence", "false", "0", "word")
    parsed = [parse_return_timestamps(v) for v in values]
    assert parsed == [True, True, True, False, False, "word"]
    with pytest.raises(RunnerError, match="'char'"):
        parse_return_timestamps("char")


def decode_rle(encoded: dict) -> np.ndarray:
    height, width = encoded["size"]
    flat = np.concatenate([np.full(n, i % 2, np.uint8) for i, n in enumerate(encoded["counts"])])
    return flat.reshape((height, width), order="F")


@pytest.mark.parametrize("seed", range(5))
def test_rle_round_trips_in_cocos_column_major_order(seed):
    mask = (np.random.default_rng(seed).random((7, 11)) > 0.5).astype(np.uint8)
    encoded = rle(mask)
    assert encoded["size"] == [7, 11]
    assert sum(encoded["counts"]) == 77
    assert (decode_rle(encoded) == mask).all()


def test_rle_of_a_mask_starting_with_foreground_starts_with_an_empty_run():
    assert rle(np.ones((2, 2), np.uint8)) == {"size": [2, 2], "counts": [0, 4]}


def test_masks_over_the_byte_budget_are_halved_until_they_fit():
    noisy = (np.random.default_rng(0).random((3, 400, 600)) > 0.5).astype(np.uint8)
    text = encode_masks(noisy, max_bytes=50_000)
    assert len(text) <= 50_000
    masks = json.loads(text)
    assert len(masks) == 3
    height, width = masks[0]["size"]
    assert (400 // height, 600 // width) in {(2**k, 2**k) for k in range(1, 9)}
    small = encode_masks(noisy[:, :8, :8], max_bytes=50_000)
    assert json.loads(small)[0]["size"] == [8, 8]


def test_an_oversized_body_gets_a_status_ai_runner_documents_for_its_route():
    from kubepeer_runner.app import route_policies
    from kubepeer_runner.config import PIPELINES, ModelSpec
    from tests.runners import ai_runner_spec

    spec = ai_runner_spec()
    config = RunnerConfig(models=tuple(ModelSpec(p, "a/b") for p in PIPELINES))
    policies = route_policies(config)
    for pipeline in PIPELINES:
        status = policies["/" + pipeline].too_large_status
        assert str(status) in spec["paths"]["/" + pipeline]["post"]["responses"], pipeline
    assert policies["/audio-to-text"].too_large_status == 413
    assert policies["/image-to-image"].too_large_status == 400
