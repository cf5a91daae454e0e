"""CLIP scoring and ranking of edit results (DESIGN.md, "Ranking").

The reference implementations zero the background and score the whole frame; the paper notes that
this can be fooled when the object spills past the mask. Region modes:

- ``crop`` (default): the mask's bounding box with ``context`` of its side around it.
- ``masked``: the whole frame with everything outside the mask set to zero (the references).
- ``full``: the whole frame.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from . import masks as M

RANK_REGIONS = ("crop", "masked", "full")
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def builtin_ranker(clip, tokenizer=None) -> ClipRanker:
    """The ranker a built-in model brings (:mod:`blendedit.models`): a spec such as ``"toy"``,
    loaded offline, or a ``CLIPModel`` and its ``tokenizer``."""
    if isinstance(clip, ClipRanker):
        return clip
    if isinstance(clip, str):
        return ClipRanker.from_pretrained(clip, local_files_only=True)
    return ClipRanker(clip, tokenizer)


class ClipRanker:
    """A ``transformers.CLIPModel`` and its tokenizer, scoring images against a prompt."""

    def __init__(self, model, tokenizer, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    @classmethod
    def from_pretrained(cls, spec: str, **kwargs) -> ClipRanker:
        """Load a CLIP model by hub id or local folder (see :func:`blendedit.models.load_clip`)."""
        from .models import load_clip

        model, tokenizer, folder = load_clip(spec, **kwargs)
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        cfg = Path(folder) / "preprocessor_config.json" if folder else None
        if cfg is not None and cfg.exists():
            pp = json.loads(cfg.read_text())
            mean, std = pp.get("image_mean", mean), pp.get("image_std", std)
        return cls(model, tokenizer, mean, std)

    def to(self, device=None, dtype=None) -> ClipRanker:
        self.model.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> CLIP input: resize short side, centre crop, normalise."""
        size = self.model.config.vision_config.image_size
        h, w = x.shape[-2:]
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[..., top : top + size, left : left + size].clamp(0, 1)
        return (x - self.mean.to(x)) / self.std.to(x)

    @torch.no_grad()
    def score(
        self,
        images: torch.Tensor,
        prompt: str,
        mask: torch.Tensor,
        region: str = "crop",
        context: float = 0.25,
    ) -> torch.Tensor:
        """Cosine similarity between ``prompt`` and each image's edited region.

        ``images`` (B, 3, H, W) in [0, 1]; ``mask`` (1, 1, H, W). Returns (B,) floats.
        """
        if region not in RANK_REGIONS:
            raise ValueError(f"rank_region: expected one of {RANK_REGIONS}, got {region!r}")
        if region == "masked":
            images = images * (mask > 0).to(images)
        elif region == "crop":
            x0, y0, x1, y1 = M.crop_box(
                M.mask_bbox(mask), (images.shape[-1], images.shape[-2]), 1, context
            )
            images = images[..., y0:y1, x0:x1]
        img, txt = self.embed_images(images), self.embed_text(prompt)
        return (F.normalize(img.float(), dim=-1) @ F.normalize(txt.float(), dim=-1).T)[:, 0].cpu()

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings of (B, 3, H, W) in [0, 1]; differentiable in ``images``."""
        dtype = next(self.model.parameters()).dtype
        pixels = self._preprocess(images.float()).to(self.device, dtype)
        return _features(self.model.get_image_features(pixel_values=pixels))

    @torch.no_grad()
    def embed_text(self, prompt: str) -> torch.Tensor:
        """CLIP text embedding (1, D) of ``prompt``."""
        tokens = self.tokenizer(
            [prompt],
            padding="max_length",
            truncation=True,
            return_tensors="pt",
            max_length=self.model.config.text_config.max_position_embeddings,
        ).to(self.device)
        return _features(self.model.get_text_features(input_ids=tokens.input_ids))


def _features(out) -> torch.Tensor:
    """transformers 5 may return a model output where 4.x returned a tensor."""
    if isinstance(out, torch.Tensor):
        return out
    return getattr(out, "pooler_output", None) if out.pooler_output is not None else out[0]
