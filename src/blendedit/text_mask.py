"""Masks from words: the region a text names, found with the editing model itself (issue 40).

For a few noise draws at a few middle noise levels, the denoiser predicts the image's noise (or
velocity, or v) conditioned on the text and on each reference text:
- where the two predictions differ most is the candidate region (DiffEdit's map, Couairon et
  al. 2023): the mean absolute difference over draws, levels, references and channels,
  normalised by its maximum and thresholded;
- of its connected parts, the one kept is where the text predicts the drawn noise best against
  the references (a local diffusion classifier: the mean of err(reference) - err(text) over the
  part); when the text predicts it worse than the references in every part, the text names
  nothing in the image and :class:`NothingFoundError` says so;
- the part's holes are filled and it is grown by a margin.

References: given, or the text with its colour word swapped for each other basic hue ("a blue
square" against "a red square", "an orange square", ...): the contrast isolates what the
words add. A text with no colour word is contrasted with the empty prompt, which finds less
(benchmarks/results/text_masks/: median IoU 0.00 on Shapes World, against 0.69 with the hues).
The work runs at the model's native scale (the image resized so that its longer side is the
native size): a mask of a 12-MP photo costs what one of a native-size image does.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from .io import pil_to_tensor
from .masks import dilate
from .options import LatentEditOptions

#: The contrast of the default references: a text's hue word is swapped for each other one.
HUES = ("red", "orange", "yellow", "green", "blue", "purple")
#: The kept part is redrawn at this fraction of its own peak difference: over 100 Shapes World
#: scenes 82 % of masks cover their object against 79 % cut at the threshold alone
#: (benchmarks/results/text_masks/).
PEAK_FRACTION = 0.5
#: The connected parts are found on a grid of at most this many cells a side.
GRID = 128


class NothingFoundError(ValueError):
    """The text names no region of the image (the mask would be empty)."""


@dataclass(frozen=True)
class TextMaskOptions:
    """How :func:`mask_from_text` finds the region (CLI: ``--mask-*`` flags)."""

    references: tuple[str, ...] | None = None  # None: the hue swaps of the text, else ""
    noise_levels: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5)  # fractions of the schedule
    num_draws: int = 8  # noise draws per level
    threshold: float = 0.5  # of the normalised difference map
    grow: int | None = None  # margin in image pixels (None: 1/64 of the native size, scaled)
    min_gain: float = 0.3  # below it, the text names nothing (see :func:`region`)
    seed: int = 0

    def check(self, text) -> None:
        if not isinstance(text, str) or not text.strip():
            raise ValueError("mask_prompt: empty; name the region to find, e.g. 'the blue square'")
        if not self.noise_levels or not all(0 < s < 1 for s in self.noise_levels):
            raise ValueError(
                f"mask_noise_levels: each must lie in (0, 1), got {list(self.noise_levels)}"
            )
        if not isinstance(self.num_draws, int) or self.num_draws < 1:
            raise ValueError(f"mask_draws: must be a positive integer, got {self.num_draws!r}")
        if not 0 < self.threshold < 1:
            raise ValueError(f"mask_threshold_map: must lie in (0, 1), got {self.threshold}")
        if not isinstance(self.min_gain, (int, float)) or not self.min_gain < 1:
            raise ValueError(f"mask_min_gain: must be a number below 1, got {self.min_gain!r}")
        if self.grow is not None and (not isinstance(self.grow, int) or self.grow < 0):
            raise ValueError(f"mask_grow: must be a whole number >= 0, got {self.grow!r}")
        if self.references is not None and text.strip() in self.references:
            raise ValueError(
                f"mask_reference: {text!r} is the text itself; a reference is what the region "
                "is not (e.g. the edit's target prompt, or '' for the empty prompt)"
            )


@dataclass
class TextMask:
    """The found region: ``mask`` (PIL "L", the image's size, 255 = the region) and ``info``
    (the text, references, options, the kept part's gain and the mask's area)."""

    mask: Image.Image
    info: dict


def default_references(text: str) -> list[str]:
    """The text with its (first) hue word swapped for each other hue, an "a" / "an" before it
    following the new word; [""] (the empty prompt) without one."""
    hue = next((w for w in re.findall(r"[a-z]+", text.lower()) if w in HUES), None)
    if hue is None:
        return [""]
    swap = re.compile(rf"\b(?:(an?)(\s+))?{hue}\b", re.IGNORECASE)

    def to(other: str):
        def sub(m):
            if m.group(1) is None:
                return other
            article = "an" if other[0] in "aeiou" else "a"
            return (
                (article.capitalize() if m.group(1)[0].isupper() else article) + m.group(2) + other
            )

        return sub

    return [swap.sub(to(other), text, count=1) for other in HUES if other != hue]


def _work_size(pipe, w: int, h: int) -> tuple[int, int]:
    """The image's size at the model's native scale, sides a multiple of its padding."""
    s, k = pipe.native_size / max(w, h), pipe.pad_multiple
    return max(k, round(w * s / k) * k), max(k, round(h * s / k) * k)


@torch.no_grad()
def maps(pipe, image: Image.Image, text: str, references, opts: TextMaskOptions, progress=False):
    """Maps on the latent grid of the image at native scale: the difference between the text's
    predictions and the references', the classifier map (how much lower the text's error is)
    and the references' own error (the classifier map's scale)."""
    fam, device, dtype = pipe.adapter, pipe.device, pipe.dtype
    ww, wh = _work_size(pipe, *image.size)
    x = pil_to_tensor(image.convert("RGB").resize((ww, wh), Image.BICUBIC))
    z, cond = pipe._encode_region(x, torch.ones_like(x[:, :1]))  # an inpainting model: all
    k, hw = opts.num_draws, tuple(z.shape[-2:])
    geometry = (LatentEditOptions.micro_conditioning, (wh, ww), (0, 0, ww, wh), (wh, ww))
    rows = []  # (embeds, added) of every text, k rows each
    for t in [text, *references]:
        embeds, pooled, _ = pipe.encode_prompt(t, "", k, False)
        rows.append((embeds, fam.added(pooled, geometry)))
    g = torch.Generator().manual_seed(opts.seed)
    guidance, steps = pipe.guidance_or_default(None), 50
    diff = torch.zeros(hw, device=device)
    cls = torch.zeros(hw, device=device)
    base = torch.zeros(hw, device=device)
    for level in tqdm(opts.noise_levels, disable=not progress, desc="find", leave=False):
        ts = _at_level(pipe, steps, level, hw)
        noise = torch.randn((k, *z.shape[1:]), generator=g).to(device, dtype)
        z_t = pipe.noised(z.expand(k, -1, -1, -1), noise, ts, 0)
        z_in = fam.model_input(pipe.scheduler, z_t, ts[0])
        target = fam.target(pipe.scheduler, z.expand(k, -1, -1, -1), noise, ts[0]).float()
        preds = _predict(fam, pipe.unet, z_in, ts[0], rows, cond, guidance)
        err = [((p - target) ** 2).mean(1) for p in preds]  # (k, h, w) per text
        for p, e in zip(preds[1:], err[1:]):
            diff += (preds[0] - p).abs().mean((0, 1))
            cls += (e - err[0]).mean(0)
            base += e.mean(0)
    return diff.cpu(), cls.cpu(), base.cpu()


def _at_level(pipe, steps: int, level: float, hw):
    """The schedule from its step nearest to ``level`` x the training timesteps (for a flow
    model: the sigma nearest to ``level``), the scheduler's begin index set there."""
    full = pipe.timesteps_for(steps, 1.0, hw)
    train = pipe.scheduler.config.get("num_train_timesteps", 1000)
    k = int((full.float().cpu() - level * train).abs().argmin())
    return pipe.timesteps_for(steps, (steps - k) / steps, hw)


#: Latent cells that one denoiser call takes (rows x h x w): the toy model's 16 x 16 grid takes
#: every text's draws at once, SD's 64 x 64 four rows a call.
CALL_CELLS = 64 * 64 * 4


def _predict(fam, model, z_in, t, rows, cond, guidance) -> list[torch.Tensor]:
    """The denoiser's prediction for ``z_in`` (k draws) under each text's conditioning: texts of
    one length batched together while a call stays within :data:`CALL_CELLS` latent cells, else
    one text (k rows) a call."""
    k, per = len(z_in), max(1, CALL_CELLS // (z_in.shape[-2] * z_in.shape[-1]))
    same = len({e.shape for e, _ in rows}) == 1 and per >= 2 * k
    if not same:
        return [fam.call(model, z_in, t, e, a, cond, guidance).float() for e, a in rows]
    group = max(1, per // k)  # texts per call
    out = []
    for i in range(0, len(rows), group):
        part = rows[i : i + group]
        embeds = torch.cat([e for e, _ in part])
        added = (
            None
            if part[0][1] is None
            else {key: torch.cat([a[key] for _, a in part]) for key in part[0][1]}
        )
        x = z_in.repeat(len(part), 1, 1, 1)
        out += fam.call(model, x, t, embeds, added, cond, guidance).float().split(k)
    return out


def _reach(seed: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """The cells of ``allowed`` 8-connected to ``seed``."""
    while True:
        grown = F.max_pool2d(seed[None, None].float(), 3, 1, 1)[0, 0].bool() & allowed
        if torch.equal(grown, seed):
            return grown
        seed = grown


def components(b: torch.Tensor) -> list[torch.Tensor]:
    """The 8-connected parts of the boolean map ``b`` (label propagation)."""
    labels = torch.arange(1, b.numel() + 1, dtype=torch.float32).view(b.shape) * b
    while True:
        grown = F.max_pool2d(labels[None, None], 3, 1, 1)[0, 0] * b
        if torch.equal(grown, labels):
            break
        labels = grown
    return [labels == v for v in labels.unique() if v > 0]


def fill_holes(b: torch.Tensor) -> torch.Tensor:
    border = torch.zeros_like(b)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    return ~_reach(border & ~b, ~b)


def region(diff, cls, base, threshold: float, text: str, min_gain: float = 0.3):
    """The kept part (boolean, on the maps' grid) and its gain: the parts of the normalised
    ``diff`` above ``threshold``, the one where ``cls`` is highest on average, then redrawn at
    half its own peak (a faint object's part is not cut at the strongest one's level) and its
    holes filled. Its gain, the fraction of the references' error (``base``) that the text
    removes there, must reach ``min_gain``: else the text names nothing in the image (on
    Shapes World scenes named objects gave 0.46-0.65, absent ones 0.03-0.21)."""
    d = diff / diff.max().clamp_min(1e-12)
    parts = components(d >= threshold)
    big = [c for c in parts if c.sum() >= 0.0012 * d.numel()]  # 20 cells of 128 x 128
    keep = max(big or parts, key=lambda c: float(cls[c].mean())) if parts else None
    gain = float(cls[keep].mean() / base[keep].mean().clamp_min(1e-12)) if parts else 0.0
    if gain < min_gain:
        raise NothingFoundError(
            f"mask_prompt: {text!r} matches nothing in the image (where it fits best, the model "
            f"predicts the image {gain:.0%} better with it than with the references, where "
            f"--mask-min-gain asks {min_gain:.0%}), so the mask would be empty; try other words, "
            "a --mask-reference that the region is not, or paint the mask (--mask)"
        )
    above = d >= PEAK_FRACTION * d[keep].max()
    return fill_holes(_reach(keep & above, above)), gain


def mask_from_text(
    pipe, image: Image.Image, text: str, opts: TextMaskOptions | None = None, progress=False
):
    """The region of ``image`` that ``text`` names, as a :class:`TextMask` (see the module)."""
    opts = opts or TextMaskOptions()
    opts.check(text)
    if opts.references is None:
        references = default_references(text)
    else:
        references = list(opts.references)
    diff, cls, base = maps(pipe, image, text, references, opts, progress)
    (w, h), (ww, wh) = image.size, _work_size(pipe, *image.size)
    s = min(1.0, GRID / max(ww, wh))  # the parts on a grid of at most GRID cells a side
    grid = (max(1, round(wh * s)), max(1, round(ww * s)))
    up = [F.interpolate(m[None, None], size=grid, mode="bilinear")[0, 0] for m in (diff, cls, base)]
    keep, gain = region(*up, opts.threshold, text, opts.min_gain)
    full = F.interpolate(keep[None, None].float(), size=(h, w), mode="bilinear")[0, 0] >= 0.5
    grow = opts.grow
    if grow is None:  # 1/64 of the native size at the native scale, in the image's pixels
        grow = round(pipe.native_size / 64 * w / ww)
    if grow:  # a square margin of ``grow`` px
        full = dilate(full[None, None].float(), 2 * grow + 1)[0, 0] > 0
    arr = (full.numpy() * 255).astype("uint8")
    info = dict(
        text=text,
        references=references,
        options={k: v for k, v in asdict(opts).items() if k != "references"} | {"grow": grow},
        gain=round(gain, 4),
        area=round(float(full.float().mean()), 6),
    )
    return TextMask(Image.fromarray(arr, "L"), info)
