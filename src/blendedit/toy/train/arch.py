"""Architectures of the Shapes World models: configs, schedules, the CLIP vision classifier."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...tiny import SD_SCHEDULER, special_ids
from ..common import CLASS_PROMPTS, CLIP_IMAGE_SIZE, CLIP_MEAN, CLIP_STD, TEXT_MAX_LENGTH
from ..world import COLOURS, PATTERN_WORDS, SHAPES

TEXT_ENCODER = "text_encoder"  # a jointly trained UNet's text encoder, inside its model/


def world_words() -> list[str]:
    """Every word a Shapes World caption uses (one token each in the toy tokenizer)."""
    words = "a an and on big small background".split()
    words += list(COLOURS) + list(SHAPES) + list(PATTERN_WORDS.values())
    words += "cream light gray charcoal tan slate".split()
    return sorted(set(words))


def clip_vision_config(patch_size: int = 8) -> dict:
    """The toy CLIP's vision tower: ViT at 64 px, 4 layers of 128 wide."""
    return dict(
        hidden_size=128,
        intermediate_size=512,
        num_attention_heads=4,
        num_hidden_layers=4,
        image_size=CLIP_IMAGE_SIZE,
        patch_size=patch_size,
    )


def clip_config(tokenizer, patch_size: int = 8):
    from transformers import CLIPConfig

    ids = special_ids(tokenizer)
    return CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=512,
            num_attention_heads=4,
            num_hidden_layers=4,
            max_position_embeddings=TEXT_MAX_LENGTH,
            **ids,
        ),
        vision_config=clip_vision_config(patch_size),
        projection_dim=128,
    )


VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(32, 64, 128, 128),
    layers_per_block=1,
    norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    mid_block_add_attention=False,  # fully convolutional: trains on crops, runs at any size
    sample_size=128,
)


VAE_FACTORS = (8, 4)


def vae_config(factor: int = 8) -> dict:
    """VAE_CONFIG, or with ``factor`` 4 (`vae --factor 4`) its first three levels with two layers
    each: downscale 4 (128 px -> 32x32x4 latents), as the LDM paper's f=4 models, so that an
    object spans tens of latent cells as it does in Stable Diffusion at 512 px."""
    if factor not in VAE_FACTORS:
        raise SystemExit(f"--factor: the VAE's downscale, one of {VAE_FACTORS}; got {factor}")
    cfg = dict(VAE_CONFIG)
    if factor == 4:
        cfg.update(
            block_out_channels=tuple(cfg["block_out_channels"][:3]),
            layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
        )
    return cfg


def vae_factor(config) -> int:
    """The downscale of a VAE config (a dict or a diffusers config): 2 per level after the first."""
    blocks = config["block_out_channels"] if isinstance(config, dict) else config.block_out_channels
    return 2 ** (len(blocks) - 1)


UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(64, 128, 192),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=128,
    attention_head_dim=8,
    norm_num_groups=32,
)


# `unet --pooled-text`: the text's attention-pooled hidden states also join the time embedding
# (DeepFloyd IF's `addition_embed_type="text"`), so every ResNet block sees what was asked for
# the UNet on a 32x32 latent grid (an f=4 VAE's latents): the same widths, its first level at
# 32x32 and without attention, cross-attention at 16x16 and 8x8; the same parameters, and a
# step costs about twice the 16x16 UNet's
UNET_GRID32 = dict(
    sample_size=32,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
)


UNET_POOLED_TEXT = dict(addition_embed_type="text", addition_embed_type_num_heads=4)


PIXEL_CONFIG = dict(
    sample_size=64,
    in_channels=3,
    out_channels=3,
    layers_per_block=1,
    block_out_channels=(32, 64, 64, 128),
    down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
    norm_num_groups=16,
)


LATENT_SCHEDULER = SD_SCHEDULER  # Stable Diffusion 1.x's noise schedule


PIXEL_SCHEDULER = dict(  # DDPM's (Ho et al.)
    num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear"
)


def _latent_ddpm(zero_snr: bool = False):
    """The latent UNet's training scheduler: Stable Diffusion's schedule as DDPM; with
    ``zero_snr`` its betas rescaled so that the last step is pure noise, and v-prediction (which
    stays defined there; Lin et al. 2024)."""
    from diffusers import DDPMScheduler

    cfg = {k: v for k, v in LATENT_SCHEDULER.items() if k != "set_alpha_to_one"}
    if zero_snr:
        cfg.update(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    return DDPMScheduler(**cfg)


def _unet_config(
    pooled_text: bool, channels=None, layers: int | None = None, grid: int = 16
) -> dict:
    """UNET_CONFIG, with UNET_POOLED_TEXT for `unet --pooled-text`, the widths and depth of
    `unet --channels/--layers`, and UNET_GRID32's layout for a 32x32 latent grid (``grid``: the
    side of the VAE's latents at 128 px)."""
    if grid not in (16, 32):
        raise SystemExit(f"the VAE's latents are {grid}x{grid} at 128 px; the UNet takes 16 or 32")
    cfg = dict(UNET_CONFIG, **(UNET_POOLED_TEXT if pooled_text else {}))
    if grid == 32:
        cfg.update(UNET_GRID32)
    if channels:
        cfg["block_out_channels"] = tuple(channels)
    if layers:
        cfg["layers_per_block"] = layers
    return cfg


# what a pipeline's scheduler needs for a `unet --zero-snr` UNet
ZERO_SNR_SAMPLING = dict(
    prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"
)


SAMPLING_FILE = "sampling.json"  # beside such a UNet's weights: `assemble` gives it that scheduler


UNET_RUN_CONFIG = "unet_config.json"  # a UNet run's architecture, for snapshots


class VisionClassifier(torch.nn.Module):
    """The CLIP vision tower with a linear head over the 30 'a {colour} {shape}' classes: the
    first stage of the CLIP recipe (a ViT learns shape slowly from captions alone)."""

    def __init__(self, patch_size: int = 8):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        config = CLIPVisionConfig(**clip_vision_config(patch_size))
        self.tower = CLIPVisionModel(config)
        self.head = torch.nn.Linear(config.hidden_size, len(CLASS_PROMPTS))

    def save(self, folder: Path) -> None:
        """``folder``: the tower as a CLIPVisionModel, the head in head.safetensors."""
        from safetensors.torch import save_file

        self.tower.save_pretrained(folder)
        head = {k: v.contiguous() for k, v in self.head.state_dict().items()}
        save_file(head, str(Path(folder) / "head.safetensors"))

    @classmethod
    def load(cls, folder: Path) -> VisionClassifier:
        """A model written by :meth:`save` (a vision run's model/ or snapshot/)."""
        from safetensors.torch import load_file
        from transformers import CLIPVisionModel

        tower = CLIPVisionModel.from_pretrained(folder, dtype=torch.float32)
        model = cls(tower.config.patch_size)
        model.tower = tower
        model.head.load_state_dict(load_file(Path(folder) / "head.safetensors"))
        return model.eval()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.tower(pixel_values=pixel_values).pooler_output)


VISION_PATCH_KEY = "tower.embeddings.patch_embedding.weight"


def write_preprocessor(folder: Path) -> None:
    (Path(folder) / "preprocessor_config.json").write_text(
        json.dumps(
            dict(
                image_processor_type="CLIPImageProcessor",
                do_resize=True,
                size={"shortest_edge": CLIP_IMAGE_SIZE},
                do_center_crop=True,
                crop_size={"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE},
                do_normalize=True,
                image_mean=list(CLIP_MEAN),
                image_std=list(CLIP_STD),
                resample=3,
            ),
            indent=2,
        )
    )
