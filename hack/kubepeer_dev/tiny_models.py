#!/usr/bin/env python3
"""Tiny models with seeded random weights, saved in the Hugging Face cache layout.

The runner loads them through the same `from_pretrained(model_id, cache_dir=MODEL_DIR)`
path as real weights; nothing is fetched from any hub. Shapes are tiny so CPU inference
takes milliseconds; the outputs are noise, but of the right kind and size.

    python -m kubepeer_dev.tiny_models MODEL_DIR [--pipeline text-to-image ...]
    python -m kubepeer_dev.tiny_models MODEL_DIR --model kubepeer-full/sd-turbo   # one model by id

prints `pipeline model_id` (or the model id) for each model it wrote.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import string
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

SEED = 1234
MODEL_IDS = {
    "text-to-image": "kubepeer-tiny/stable-diffusion",
    "image-to-image": "kubepeer-tiny/stable-diffusion",
    "llm": "kubepeer-tiny/llama",
    "image-to-text": "kubepeer-tiny/blip",
    "audio-to-text": "kubepeer-tiny/wav2vec2",
    "text-to-speech": "kubepeer-tiny/vits",
    "upscale": "kubepeer-tiny/x4-upscaler",
    "segment-anything-2": "kubepeer-tiny/sam2",
    "image-to-video": "kubepeer-tiny/svd",
    "live-video-to-video": "noop",
}
# live-video-to-video also serves diffusers image-to-image models frame by frame: the tiny
# one is built with the live pipeline; the full-size one (SD-Turbo's shapes, random
# weights, for a GPU benchmark) only when asked for by name.
LIVE_TINY_MODEL = "kubepeer-tiny/sd-turbo"
LIVE_FULL_MODEL = "kubepeer-full/sd-turbo"


def snapshot_dir(model_dir: Path, model_id: str) -> Path:
    """Make models--org--name/{refs/main, snapshots/<rev>/} and return the snapshot."""
    revision = hashlib.sha1(model_id.encode()).hexdigest()
    repo = model_dir / ("models--" + model_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


def _clip_text_parts(hidden: int = 32):  # noqa: ANN202 - (CLIPTokenizer, CLIPTextModel)
    """The tokenizer (a character vocabulary) and a tiny CLIP text encoder for diffusers."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    symbols = string.ascii_lowercase + string.digits + ".,!?'-"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in symbols:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        tokenizer = CLIPTokenizer(
            str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77
        )
    encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37,
            num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77,
            bos_token_id=0, eos_token_id=1, pad_token_id=1,
        )
    )  # fmt: skip
    return tokenizer, encoder


def build_stable_diffusion(snapshot: Path) -> None:
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(SEED)
    tokenizer, text_encoder = _clip_text_parts()
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=32, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32, sample_size=32,
    )  # fmt: skip
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=EulerDiscreteScheduler(steps_offset=1), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(snapshot)


def build_llama(snapshot: Path) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(SEED)
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = [
        "Livepeer orchestrators serve AI jobs to gateways for tickets.",
        "The quick brown fox jumps over the lazy dog. Hello, world!",
        string.ascii_letters + string.digits + string.punctuation,
    ] * 10
    tok.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False)
    )
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>",
    )  # fmt: skip
    tokenizer.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}"
    )
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    )  # fmt: skip
    model.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)


def build_blip(snapshot: Path) -> None:
    import torch
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    torch.manual_seed(SEED)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *string.ascii_lowercase,
             "a", "photo", "of", "cat", "dog", "the", "on", "grass", "sky"]  # fmt: skip
    vocab = list(dict.fromkeys(words))
    (snapshot / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(str(snapshot / "vocab.txt"), bos_token="[DEC]")
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
    )
    config = BlipConfig(
        text_config={
            "vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 37,
            "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64,
            "pad_token_id": 0, "bos_token_id": 5, "sep_token_id": 3, "eos_token_id": 3,
        },
        vision_config={
            "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
            "num_attention_heads": 4, "image_size": 32, "patch_size": 8,
        },
        projection_dim=32,
    )  # fmt: skip
    BlipForConditionalGeneration(config).save_pretrained(snapshot)
    processor.save_pretrained(snapshot)


def build_wav2vec2(snapshot: Path) -> None:
    """A CTC speech recogniser: the transformers ASR pipeline serves it as it serves Whisper."""
    import torch
    from transformers import (
        Wav2Vec2Config,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2ForCTC,
        Wav2Vec2Processor,
    )

    torch.manual_seed(SEED)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4}
    for c in string.ascii_uppercase + "'":
        vocab[c] = len(vocab)
    (snapshot / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = Wav2Vec2CTCTokenizer(str(snapshot / "vocab.json"), word_delimiter_token="|")
    extractor = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
        return_attention_mask=False,
    )  # fmt: skip
    model = Wav2Vec2ForCTC(
        Wav2Vec2Config(
            vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=37, conv_dim=(32, 32), conv_stride=(5, 4), conv_kernel=(10, 8),
            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, pad_token_id=0,
            ctc_loss_reduction="mean", do_stable_layer_norm=True, feat_extract_norm="layer",
        )
    )  # fmt: skip
    model.save_pretrained(snapshot)
    Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(snapshot)


def build_vits(snapshot: Path) -> None:
    """A VITS text-to-speech model with a character vocabulary (no phonemiser needed)."""
    import torch
    from transformers import VitsConfig, VitsModel, VitsTokenizer

    torch.manual_seed(SEED)
    vocab = {c: i for i, c in enumerate(" " + string.ascii_lowercase + ".,!?'-")}
    (snapshot / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = VitsTokenizer(
        str(snapshot / "vocab.json"), add_blank=True, normalize=True, phonemize=False,
        pad_token=" ", unk_token=" ",
    )  # fmt: skip
    config = VitsConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        ffn_dim=32, flow_size=16, spectrogram_bins=33, upsample_initial_channel=32,
        upsample_rates=[8, 8], upsample_kernel_sizes=[16, 16], resblock_kernel_sizes=[3],
        resblock_dilation_sizes=[[1, 3]], prior_encoder_num_flows=2,
        prior_encoder_num_wavenet_layers=2, posterior_encoder_num_wavenet_layers=2,
        duration_predictor_filter_channels=16, depth_separable_num_layers=2,
        sampling_rate=16000,
    )  # fmt: skip
    VitsModel(config).save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)


def build_upscaler(snapshot: Path) -> None:
    """A 4x latent upscaler shaped like stabilityai/stable-diffusion-x4-upscaler."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(SEED)
    tokenizer, text_encoder = _clip_text_parts()
    unet = UNet2DConditionModel(
        block_out_channels=(32, 32, 64), layers_per_block=1, sample_size=32, in_channels=7,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, use_linear_projection=True,
        only_cross_attention=(True, True, False), num_class_embeds=100, norm_num_groups=32,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=[32, 32, 64], in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
        norm_num_groups=32, scaling_factor=0.08333,
    )  # fmt: skip
    StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        low_res_scheduler=DDPMScheduler(), scheduler=DDIMScheduler(prediction_type="v_prediction"),
        max_noise_level=350,
    ).save_pretrained(snapshot)  # fmt: skip


def build_sam2(snapshot: Path) -> None:
    """A SAM2 (Hiera backbone) segmenter at 128x128, shaped like facebook/sam2-hiera-*."""
    import torch
    from transformers import (
        Sam2Config,
        Sam2ImageProcessorFast,
        Sam2Model,
        Sam2Processor,
    )

    torch.manual_seed(SEED)
    size = 128
    config = Sam2Config(
        vision_config={
            "backbone_config": {
                "model_type": "sam2_hiera_det_model", "hidden_size": 12,
                "num_attention_heads": 1, "image_size": [size, size],
                "blocks_per_stage": [1, 2, 2, 1], "embed_dim_per_stage": [12, 24, 48, 96],
                "num_attention_heads_per_stage": [1, 1, 1, 1],
                "window_size_per_stage": [4, 4, 4, 4], "global_attention_blocks": [4],
                "window_positional_embedding_background_size": [4, 4],
            },
            "backbone_channel_list": [96, 48, 24, 12],
            "backbone_feature_sizes": [[size // 4] * 2, [size // 8] * 2, [size // 16] * 2],
            "fpn_hidden_size": 32,
        },
        prompt_encoder_config={"hidden_size": 32, "image_size": size, "patch_size": 16,
                               "mask_input_channels": 4},
        mask_decoder_config={"hidden_size": 32, "mlp_dim": 64, "num_hidden_layers": 2,
                             "num_attention_heads": 2, "iou_head_hidden_dim": 32},
    )  # fmt: skip
    Sam2Model(config).save_pretrained(snapshot)
    Sam2Processor(
        image_processor=Sam2ImageProcessorFast(
            size={"height": size, "width": size},
            mask_size={"height": size // 4, "width": size // 4},
        )
    ).save_pretrained(snapshot)


def build_svd(snapshot: Path) -> None:
    """An image-to-video model shaped like Stable Video Diffusion, three frames long."""
    import torch
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    torch.manual_seed(SEED)
    unet = UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=8,
        out_channels=4, num_frames=3, cross_attention_dim=32, num_attention_heads=8,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        projection_class_embeddings_input_dim=96, addition_time_embed_dim=32,
    )  # fmt: skip
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        interpolation_type="linear", prediction_type="v_prediction", sigma_max=700.0,
        sigma_min=0.002, steps_offset=1, timestep_spacing="leading",
        timestep_type="continuous", use_karras_sigmas=True,
    )  # fmt: skip
    vae = AutoencoderKLTemporalDecoder(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
    )  # fmt: skip
    # SVD resizes the conditioning image to 224x224 itself, so the encoder takes that size.
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4,
            image_size=224, intermediate_size=37, patch_size=16,
        )
    )  # fmt: skip
    StableVideoDiffusionPipeline(
        vae=vae, image_encoder=encoder, unet=unet, scheduler=scheduler,
        feature_extractor=CLIPImageProcessor(crop_size=224, size=224),
    ).save_pretrained(snapshot)  # fmt: skip


def _live_pipeline(snapshot: Path, unet: object, vae: object, text_hidden: int) -> None:
    """Save an image-to-image pipeline as SD-Turbo ships it (Euler, scaled-linear betas)."""
    import torch
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionImg2ImgPipeline

    tokenizer, text_encoder = _clip_text_parts(text_hidden)
    scheduler = EulerAncestralDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        timestep_spacing="trailing", steps_offset=1,
    )  # fmt: skip
    pipe = StableDiffusionImg2ImgPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    if text_hidden > 32:  # the full-size model: half the disk, loaded in fp16 anyway
        pipe.to(torch.float16)
    pipe.save_pretrained(snapshot)


def build_sd_turbo_tiny(snapshot: Path) -> None:
    """A tiny one-step image-to-image model whose VAE downsamples 8x, like SD's, so a
    512x512 frame is a 64x64 latent and a CPU runs it in tens of milliseconds."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(SEED)
    # Attention only at the lowest resolution (16x16 latents at 512x512): attention over
    # every latent pixel is what would make a tiny model slow on a CPU.
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32, 32), norm_num_groups=8, cross_attention_dim=32,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"), attention_head_dim=8,
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, sample_size=512, mid_block_add_attention=False,
    )  # fmt: skip
    _live_pipeline(snapshot, unet, vae, 32)


def build_sd_turbo_full(snapshot: Path) -> None:
    """SD-Turbo's UNet and VAE at full size (the SD 2.1 configs) with random weights; the
    text encoder keeps SD 2.1's width (1024) but only two layers: the prompt is encoded
    once per change, never per frame, so its depth does not touch frame latency."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=768,
    )  # fmt: skip
    _live_pipeline(snapshot, unet, vae, 1024)


BUILDERS: dict[str, Callable[[Path], None]] = {
    LIVE_TINY_MODEL: build_sd_turbo_tiny,
    LIVE_FULL_MODEL: build_sd_turbo_full,
    "kubepeer-tiny/svd": build_svd,
    "kubepeer-tiny/sam2": build_sam2,
    "kubepeer-tiny/x4-upscaler": build_upscaler,
    "kubepeer-tiny/vits": build_vits,
    "kubepeer-tiny/wav2vec2": build_wav2vec2,
    "kubepeer-tiny/stable-diffusion": build_stable_diffusion,
    "kubepeer-tiny/llama": build_llama,
    "kubepeer-tiny/blip": build_blip,
}


def build_model(model_dir: Path, model_id: str) -> None:
    """Write one model under model_dir, unless it is already there."""
    builder = BUILDERS.get(model_id)
    if builder is None:
        return  # e.g. live-video-to-video's noop: nothing to load
    snapshot = snapshot_dir(model_dir, model_id)
    if not (snapshot / ".complete").exists():
        builder(snapshot)
        (snapshot / ".complete").touch()


def build(model_dir: Path, pipelines: list[str] | None = None) -> dict[str, str]:
    """Write the tiny models for `pipelines` (default: all) under model_dir, with the tiny
    live model when live-video-to-video is among them.

    Returns {pipeline: model_id}. A model already present is not rebuilt."""
    chosen = {p: MODEL_IDS[p] for p in (pipelines or MODEL_IDS)}
    extra = [LIVE_TINY_MODEL] if "live-video-to-video" in chosen else []
    for model_id in sorted({*chosen.values(), *extra}):
        build_model(model_dir, model_id)
    return chosen


def cached_dir() -> Path:
    """The shared cache's model dir, keyed by this script and the libraries that build the
    models, so a change of either builds afresh (the tests and `make demo` both use it)."""
    import os
    from importlib.metadata import version

    cache = Path(os.environ.get("KUBEPEER_CACHE", Path.home() / ".cache" / "kubepeer"))
    libs = " ".join(version(p) for p in ("torch", "diffusers", "transformers"))
    key = hashlib.sha256(Path(__file__).read_bytes() + libs.encode()).hexdigest()[:16]
    return cache / "tiny-models" / key


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--pipeline", action="append", choices=sorted(MODEL_IDS))
    parser.add_argument(
        "--model", action="append", choices=sorted(BUILDERS),
        help="build these models by id (the only way to build the full-size live model)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.model:
        for model_id in args.model:
            build_model(args.model_dir, model_id)
            print(model_id)
        return 0
    for pipeline, model_id in build(args.model_dir, args.pipeline).items():
        print(pipeline, model_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
