"""Flux's latent packing and position ids (the denoiser calls themselves are the family
adapters', :mod:`blendedit.families`).

- Stable Diffusion / SDXL: ``UNet2DConditionModel(z, t, encoder_hidden_states, ...)``
  predicts the noise (or v).
- SD3: ``SD3Transformer2DModel`` takes keyword inputs, a timestep per row and the pooled text,
  and predicts a velocity.
- Flux: ``FluxTransformer2DModel`` takes the latents packed in 2x2 patches (a sequence of
  (h/2)(w/2) tokens of 4 x channels), position ids for the image and text tokens, the timestep
  as a fraction (t / 1000) and, when guidance-distilled, the guidance scale as an input instead
  of classifier-free guidance. The pipeline keeps latents unpacked (so the mask blends them cell
  by cell, as packing the mask the same way would); only this call packs and unpacks.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def pack(z: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, (h/2)(w/2), 4C): Flux's 2x2 patches, row-major, each token's features
    channel by channel, 2x2 within (pixel_unshuffle's order; 2-3x faster on the CPU than a 6-d
    permute at 32x32 cells)."""
    return F.pixel_unshuffle(z, 2).flatten(2).transpose(1, 2).contiguous()


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack` for an (h, w) latent grid."""
    b, _, d = x.shape
    return F.pixel_shuffle(x.transpose(1, 2).reshape(b, d, h // 2, w // 2), 2)


@functools.lru_cache(maxsize=8)  # built once per grid, not at every step
def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """((h/2)(w/2), 3) Flux position ids of the packed latents: (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.view(-1, 3).to(device, dtype)


@functools.lru_cache(maxsize=8)
def _text_ids(n: int, device, dtype) -> torch.Tensor:
    """(n, 3) Flux position ids of the text tokens: all zeros."""
    return torch.zeros(n, 3, device=device, dtype=dtype)


def is_guidance_distilled(model) -> bool:
    """A Flux transformer that takes the guidance scale as an input (FLUX.1-dev)."""
    return bool(getattr(model.config, "guidance_embeds", False))
