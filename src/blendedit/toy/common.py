"""What the Shapes World trainers and their evaluation share: prompts, pixels, tokens, x0."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import SceneData
from .world import COLOURS, SHAPES, article

CLIP_IMAGE_SIZE = 64


CLIP_MEAN = CLIP_STD = (0.5, 0.5, 0.5)


TEXT_MAX_LENGTH = 32


CLASS_PROMPTS = [f"{article(c)} {c} {s}" for c in COLOURS for s in SHAPES]  # "an orange star"


MEASURED = "# Measured by `python -m blendedit.toy.evaluate`"  # the card's last section


def image_batch(data: SceneData, idx) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> float (B, 3, S, S) in [-1, 1]."""
    x = torch.from_numpy(data.batch(idx).copy()).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1


def clip_pixels(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images of any size -> the toy CLIP's input (as ClipRanker preprocesses)."""
    x = F.interpolate(
        (x + 1) / 2, size=(CLIP_IMAGE_SIZE,) * 2, mode="bicubic", antialias=True
    ).clamp(0, 1)
    return (x - 0.5) / 0.5


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(
        texts,
        padding="max_length",
        max_length=TEXT_MAX_LENGTH,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def predict_x0(unet, text_encoder, tokenizer, scheduler, zt, t, texts) -> torch.Tensor:
    """The UNet's one-step prediction of the clean latents from ``zt`` at steps ``t`` (one per
    latent) with ``texts``, no guidance: x0 from its epsilon, or from its v where ``scheduler``
    says v_prediction (a `unet --zero-snr` UNet's)."""
    ids = tokenize(tokenizer, texts).to(zt.device)
    out = unet(zt, t, text_encoder(ids)[0]).sample  # encoder_hidden_states
    a = scheduler.alphas_cumprod.to(t.device)[t].float().view(-1, 1, 1, 1)
    if scheduler.config.prediction_type == "v_prediction":
        return a.sqrt() * zt - (1 - a).sqrt() * out
    return (zt - (1 - a).sqrt() * out) / a.sqrt()
