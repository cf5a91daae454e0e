"""Argument checks shared by both methods: prompts, generators, numbers, images and masks as
the library takes them (PIL, arrays, tensors, paths). Each raises ``ValueError`` naming the
argument."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from .io import load_image, load_mask, mask_to_tensor, tensor_to_pil


def check_prompt(prompt) -> None:
    """A prompt is a string with something in it."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt: expected a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError(
            "prompt: is empty; say what the masked region should show (e.g. 'a red ball')"
        )


def check_negative_prompt(negative_prompt, distilled: bool) -> None:
    """A negative prompt is a string; a guidance-distilled model (FLUX.1-dev: the guidance
    scale is its input) makes no unconditional pass for one to replace, so none is taken."""
    if not isinstance(negative_prompt, str):
        raise ValueError(f"negative_prompt: expected a string, got {negative_prompt!r}")
    if distilled and negative_prompt.strip():
        raise ValueError(
            "negative_prompt: this Flux model is guidance-distilled (it takes the guidance scale "
            "as an input and runs one pass per step), so a negative prompt would have no effect; "
            "leave it out"
        )


def check_flow_scheduler(name: str, family: str) -> None:
    """Flow-matching models (SD3, Flux) sample with their own flow-matching Euler sampler;
    only the default name is taken for them."""
    if name != "ddim":
        raise ValueError(
            f"scheduler: {name!r} is a sampler for Stable Diffusion 1.x/2.x and SDXL; this "
            f"{family.upper()} model samples with its own flow-matching Euler sampler (leave "
            "--scheduler out)"
        )


def check_generator(generator, n: int, what: str) -> None:
    """``generator``: None, one ``torch.Generator``, or a list of ``n`` (``what`` names n)."""
    if isinstance(generator, list):
        if len(generator) != n or not all(isinstance(g, torch.Generator) for g in generator):
            raise ValueError(
                f"generator: a list must hold {what} torch.Generator objects, got "
                f"{len(generator)} items"
            )
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator: expected a torch.Generator, got {type(generator).__name__}")


def _check_int(name: str, v, lo: int, hi: int) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
        raise ValueError(f"{name}: expected an integer in [{lo}, {hi}], got {v!r}")


def _check_float(name: str, v, lo: float, hi: float, low_open: bool = False) -> None:
    ok = isinstance(v, (int, float, np.floating)) and not isinstance(v, bool)
    ok = ok and math.isfinite(v) and (lo < v if low_open else lo <= v) and v <= hi
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name}: expected a number in {bracket}{lo}, {hi}], got {v!r}")


def _as_pil(image, name: str) -> Image.Image:
    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 3 or t.shape[0] != 3:
            raise ValueError(
                f"{name}: tensor must be (3, H, W) or (1, 3, H, W), got {tuple(image.shape)}"
            )
        if not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1:
            raise ValueError(f"{name}: tensor values must be finite and in [0, 1]")
        return tensor_to_pil(t[None])[0]
    return load_image(image)


def _as_mask(mask, image: Image.Image) -> torch.Tensor:
    """Mask as (1, 1, H, W) float in [0, 1]; same size as the image; not empty."""
    if isinstance(mask, torch.Tensor):
        t = mask.detach().float().cpu()
        while t.ndim > 2 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 2:
            raise ValueError(
                f"mask: tensor must be (H, W) or (1, 1, H, W), got {tuple(mask.shape)}"
            )
        if not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1:
            raise ValueError("mask: tensor values must be finite and in [0, 1]")
        if (t.shape[1], t.shape[0]) != image.size:
            raise ValueError(
                f"mask: size {t.shape[1]}x{t.shape[0]} differs from the image's "
                f"{image.width}x{image.height}"
            )
        if not (t > 0).any():
            raise ValueError("mask: the mask is empty (no pixel to edit)")
        return t[None, None]
    m = load_mask(mask, image=image, threshold=None)
    return mask_to_tensor(m)
