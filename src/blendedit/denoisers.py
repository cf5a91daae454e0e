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


def pack(z: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, (h/2)(w/2), 4C): Flux's 2x2 patches, row-major."""
    b, c, h, w = z.shape
    z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return z.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack` for an (h, w) latent grid."""
    b, _, d = x.shape
    x = x.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


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
