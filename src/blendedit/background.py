"""Background reconstruction after decoding (Blended Latent Diffusion, step 6).

Decoding blended latents does not give back the original pixels outside the mask (the VAE is
lossy). A reconstruction method takes the decoded edits, the source and the mask and returns the
final images. Methods share one signature so that new ones (``decoder`` fine-tuning, ``poisson``
cloning) plug in beside these.
"""

from __future__ import annotations

import torch

from . import masks as M

BACKGROUND_METHODS = ("paste", "none")
PLANNED_BACKGROUND_METHODS = ("decoder", "poisson")


def paste(
    edit: torch.Tensor, source: torch.Tensor, mask: torch.Tensor, feather: int
) -> torch.Tensor:
    """Original pixels outside the mask; the edit inside, feathered over ``feather`` pixels just
    inside the mask edge. Every pixel with mask 0 equals the source exactly.

    ``edit`` (N, 3, H, W), ``source`` (1, 3, H, W), ``mask`` (1, 1, H, W), all in [0, 1].
    """
    w = M.feather(mask, feather).to(edit)
    return w * edit + (1 - w) * source


def none(
    edit: torch.Tensor, source: torch.Tensor, mask: torch.Tensor, feather: int
) -> torch.Tensor:
    """The raw decode, for studies of what the latent blend alone keeps."""
    return edit


def reconstruct(
    method: str, edit: torch.Tensor, source: torch.Tensor, mask: torch.Tensor, *, feather: int
) -> torch.Tensor:
    """Dispatch to a background method by name."""
    fns = {"paste": paste, "none": none}
    if method not in fns:
        raise ValueError(f"background: expected one of {BACKGROUND_METHODS}, got {method!r}")
    return fns[method](edit, source, mask, feather)
