"""The Shapes World judge: did an edit put the prompted object in the mask, and was the
background kept? It reads pixels only (palette distance, connected components, template
matching of the shape), never a CLIP score, so it is independent of every editor it judges.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .world import COLOURS, R_MIN, SHAPES, Obj, coverage

COLOUR_TOLERANCE = 60.0  # RGB distance to the palette colour
MIN_IOU = 0.6  # template match needed to call the region a shape at all
MIN_FRACTION = 0.75  # the largest region's share of the prompt colour's pixels in the mask
SEAM_WIDTH = 3  # pixels outside the mask edge that count as the seam
_PERIOD = {"circle": 360, "square": 90, "cross": 90, "triangle": 120, "star": 72}
_PROMPT = re.compile(rf"\b({'|'.join(COLOURS)})\s+({'|'.join(SHAPES)})\b", re.IGNORECASE)


@dataclass
class Verdict:
    success: bool
    reason: str  # why it failed, or "ok"
    shape: str | None = None  # best-matching shape of the largest region of the prompt colour
    iou: float = 0.0
    radius: float = 0.0  # circumradius of that region, x S
    fraction: float = 0.0  # its share of the prompt colour's pixels inside the mask
    psnr_outside: float | None = None
    max_err_outside: float | None = None
    psnr_seam: float | None = None
    max_err_seam: float | None = None
    seam_error: float | None = None  # see :func:`seam_error`


def parse_prompt(prompt: str) -> tuple[str, str]:
    """(colour, shape) named by an edit prompt such as 'a small red star'."""
    m = _PROMPT.search(prompt)
    if not m:
        raise ValueError(
            f"prompt: expected '{{colour}} {{shape}}' from Shapes World, got {prompt!r}"
        )
    return m.group(1).lower(), m.group(2).lower()


def colour_labels(img: np.ndarray) -> np.ndarray:
    """Per pixel: index into COLOURS of the nearest object colour within tolerance, else -1."""
    pal = np.array(list(COLOURS.values()), np.float32)
    d = np.linalg.norm(img[..., None, :].astype(np.float32) - pal, axis=-1)  # (H, W, 6)
    lab = d.argmin(-1)
    lab[d.min(-1) > COLOUR_TOLERANCE] = -1
    return lab


def components(binary: np.ndarray) -> np.ndarray:
    """8-connected component labels (0 = background, 1.. per component) by min-propagation."""
    h, w = binary.shape
    big = h * w + 1
    lab = np.where(binary, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:
        p = np.pad(lab, 1, constant_values=big)
        nb = np.min(
            [p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)],
            axis=0,
        )
        new = np.where(binary, np.minimum(lab, nb), big)
        if np.array_equal(new, lab):
            break
        lab = new
    out = np.zeros((h, w), np.int64)
    for i, v in enumerate(np.unique(lab[binary]), 1):
        out[lab == v] = i
    return out


def match_shape(region: np.ndarray) -> tuple[str, float]:
    """Best template (shape, IoU) for a binary region of a square canvas: each shape centred on
    the region's centroid, over scales around the area-matched size and its rotations."""
    size = region.shape[0]
    ys, xs = np.nonzero(region)
    cx, cy = (xs.mean() + 0.5) / size, (ys.mean() + 0.5) / size
    area = region.sum() / size**2
    best = ("", 0.0)
    for shape in SHAPES:
        unit = _unit_area(shape)
        r0 = math.sqrt(area / unit)
        step = 6 if shape != "circle" else 360
        for scale in (0.92, 1.0, 1.08):
            for deg in range(0, _PERIOD[shape], step):
                o = Obj(shape, "red", cx, cy, r0 * scale, math.radians(deg))
                t = coverage(o, size, ss=2) > 0.5
                inter = np.logical_and(t, region).sum()
                iou = inter / max(1, np.logical_or(t, region).sum())
                if iou > best[1]:
                    best = (shape, float(iou))
    return best


_AREAS: dict[str, float] = {}


def _unit_area(shape: str) -> float:
    """Area of the shape with circumradius 1 (measured once on a fine raster)."""
    if shape not in _AREAS:
        _AREAS[shape] = float(
            coverage(Obj(shape, "red", 0.5, 0.5, 0.5), 400, ss=2).sum() / 400**2 / 0.25
        )
    return _AREAS[shape]


def _psnr(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    if a.size == 0:
        return float("inf"), 0.0
    err = a.astype(np.float64) - b.astype(np.float64)
    mse = float((err**2).mean())
    psnr = float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)
    return psnr, float(np.abs(err).max())


def judge(image, mask, prompt: str, source=None) -> Verdict:
    """Judge an edit. ``image``/``source``: PIL or (H, W, 3) uint8; ``mask``: PIL or (H, W),
    nonzero = edit region; ``prompt``: 'a [small|big] {colour} {shape}'."""
    colour, shape = parse_prompt(prompt)
    img = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    m = np.asarray(mask.convert("L") if isinstance(mask, Image.Image) else mask) > 0
    if img.shape[:2] != m.shape or img.shape[0] != img.shape[1]:
        raise ValueError(f"mask: shape {m.shape} does not match square image {img.shape[:2]}")
    size = img.shape[0]
    v = Verdict(False, "")
    if source is not None:
        src = np.asarray(source.convert("RGB") if isinstance(source, Image.Image) else source)
        v.psnr_outside, v.max_err_outside = _psnr(img[~m], src[~m])
        seam = _dilate(m, SEAM_WIDTH) & ~m
        v.psnr_seam, v.max_err_seam = _psnr(img[seam], src[seam])
        v.seam_error = seam_error(img, src, m)

    want = (colour_labels(img) == list(COLOURS).index(colour)) & m
    if not want.any():
        v.reason = f"no {colour} pixels in the mask"
        return v
    comp = components(want)
    counts = np.bincount(comp.ravel())[1:]
    largest = comp == (counts.argmax() + 1)
    v.fraction = float(counts.max() / counts.sum())
    ys, xs = np.nonzero(largest)
    cx, cy = xs.mean(), ys.mean()
    v.radius = float((np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2).max() + 0.5) / size)
    v.shape, v.iou = match_shape(largest)
    if v.radius < R_MIN * 0.9:
        v.reason = f"the {colour} region is too small (r = {v.radius:.3f} S)"
    elif v.fraction < MIN_FRACTION:
        v.reason = f"the {colour} pixels are split ({v.fraction:.0%} in the largest region)"
    elif v.iou < MIN_IOU:
        v.reason = f"the {colour} region has no recognisable shape (best IoU {v.iou:.2f})"
    elif v.shape != shape:
        v.reason = f"the {colour} region is a {v.shape}, not a {shape}"
    else:
        v.success, v.reason = True, "ok"
    return v


def seam_error(image: np.ndarray, source: np.ndarray, mask: np.ndarray) -> float:
    """How visible the mask's border is: for every pair of 4-neighbour pixels with one inside
    the mask and one outside, the step across the border in ``image`` minus the step in
    ``source``, in absolute 0-255 levels, averaged over pairs and channels. Zero when the edit
    continues the source across the border; a pasted result with no blending shows its seam
    here even though every pixel outside the mask is exact (the band outside the mask, the
    ``psnr_seam`` figure, cannot see that)."""
    img, src = image.astype(np.float64), source.astype(np.float64)
    errs = []
    for axis in (0, 1):
        a = [slice(None)] * 2
        b = [slice(None)] * 2
        a[axis], b[axis] = slice(1, None), slice(None, -1)
        a, b = tuple(a), tuple(b)
        cross = mask[a] != mask[b]
        step = (img[a] - img[b]) - (src[a] - src[b])
        errs.append(np.abs(step[cross]))
    err = np.concatenate(errs)
    return float(err.mean()) if err.size else 0.0


def _dilate(m: np.ndarray, k: int) -> np.ndarray:
    out = m.copy()
    p = np.pad(m, k)
    h, w = m.shape
    for dy in range(-k, k + 1):
        for dx in range(-k, k + 1):
            out |= p[k + dy : k + dy + h, k + dx : k + dx + w]
    return out


def read_objects(image) -> list[tuple[str, str, float]]:
    """Every object the judge can read anywhere in ``image``: (colour, shape, radius x S) for
    each connected region of one object colour, large enough (as :func:`judge` requires) and
    matching a shape template with IoU >= ``MIN_IOU``."""
    img = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    size = img.shape[0]
    labels = colour_labels(img)
    found = []
    for ci, colour in enumerate(COLOURS):
        comp = components(labels == ci)
        for k in range(1, comp.max() + 1):
            region = comp == k
            ys, xs = np.nonzero(region)
            r = float((np.sqrt((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2).max() + 0.5) / size)
            if r < R_MIN * 0.9:
                continue
            shape, iou = match_shape(region)
            if iou >= MIN_IOU:
                found.append((colour, shape, r))
    return found


def continuation_psnr(image, task) -> float:
    """How well the background continues inside the mask where no object was asked for: PSNR
    (dB) between ``image`` and the task's ground truth over the mask's pixels farther than
    0.05 S from the target object's bounding circle (its shadow included); inf when the two agree
    there exactly, nan when no such pixel is left."""
    a = np.asarray(image.convert("RGB"), dtype=np.float64)
    truth = np.asarray(task.ground_truth.convert("RGB"), dtype=np.float64)
    size = a.shape[0]
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    o = task.target
    reach = o.r + 0.05 + 0.03  # the object, its shadow's offset and blur, a margin
    away = np.hypot(xx - o.cx - 0.01, yy - o.cy - 0.01) > reach
    region = (np.asarray(task.mask) > 127) & away
    if not region.any():
        return float("nan")
    mse = float(((a - truth)[region] ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)
