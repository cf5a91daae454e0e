"""Mask arithmetic: latent downsampling, progressive shrinking, feathering and crop boxes.

All functions take and return float tensors of shape (B, 1, H, W) with values in [0, 1]
(1 = edit), except the box helpers, which work in pixel coordinates.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MASK_DOWNSAMPLE_MODES = ("max", "nearest")


def downsample_mask(mask: torch.Tensor, factor: int, mode: str = "max") -> torch.Tensor:
    """Mask at latent resolution (Blended Latent Diffusion, step 2).

    ``max``: a latent cell is masked when any of its ``factor x factor`` pixels is, so thin masks
    never vanish. ``nearest``: the reference implementation's choice (one pixel per cell).
    ``mask`` (B, 1, H, W) with H, W divisible by ``factor`` -> (B, 1, H/factor, W/factor).
    """
    assert mask.shape[-1] % factor == 0 and mask.shape[-2] % factor == 0, mask.shape
    if mode == "max":
        return F.max_pool2d(mask, kernel_size=factor, stride=factor)
    if mode == "nearest":
        return F.interpolate(mask, scale_factor=1 / factor, mode="nearest")
    raise ValueError(f"mask_downsample: expected one of {MASK_DOWNSAMPLE_MODES}, got {mode!r}")


def dilate(mask: torch.Tensor, kernel: int) -> torch.Tensor:
    """Dilation with a square ``kernel x kernel`` structuring element (kernel odd), as a row
    then a column maximum (the same result, and cheap for wide kernels on big masks)."""
    assert kernel % 2 == 1, kernel
    if kernel == 1:
        return mask
    r = kernel // 2
    rows = F.max_pool2d(mask, kernel_size=(1, kernel), stride=1, padding=(0, r))
    return F.max_pool2d(rows, kernel_size=(kernel, 1), stride=1, padding=(r, 0))


def erode(mask: torch.Tensor, kernel: int) -> torch.Tensor:
    """Erosion with a square structuring element; outside the frame counts as masked."""
    return -dilate(-mask, kernel)


def shrink_schedule(latent_mask: torch.Tensor, iterations: int) -> list[torch.Tensor]:
    """Progressive mask shrinking (Blended Latent Diffusion, Sec. 4.2).

    Returns ``iterations + 1`` masks, most dilated first and the exact mask last: kernels
    ``2k+1, 2k-1, ..., 3`` then the exact mask (k = 3 gives the paper's 7, 5, 3, exact).
    """
    if iterations < 0:
        raise ValueError(f"shrink_iterations: must be >= 0, got {iterations}")
    kernels = [2 * (iterations - j) + 1 for j in range(iterations)]
    return [dilate(latent_mask, k) for k in kernels] + [latent_mask]


#: The paper's shrinking: k = 3 dilations on Stable Diffusion's 64x64 latent grid (512 px).
PAPER_SHRINK_ITERATIONS, PAPER_LATENT_SIDE = 3, 64


def auto_shrink_iterations(latent_h: int, latent_w: int) -> int:
    """``shrink_iterations="auto"``: the paper's k = 3 on a 64x64 latent grid, and on a smaller
    grid as many dilations as keep the most dilated mask's growth (k cells each side) within the
    same share of the grid, 3/64: k = floor(3 x side / 64), at most 3. So 2 at 48, 1 at 32 (256
    px) and 0 at 16x16 (the shipped 128 px toy model), where a 7x7 dilation would grow a mask by
    a fifth of the frame and shrinking measured worse than none (benchmarks/results)."""
    side = min(latent_h, latent_w)
    return min(PAPER_SHRINK_ITERATIONS, PAPER_SHRINK_ITERATIONS * side // PAPER_LATENT_SIDE)


def schedule_index(step: int, num_steps: int, num_masks: int) -> int:
    """Which mask of a shrink schedule applies at ``step`` of ``num_steps`` (equal parts)."""
    return min(step * num_masks // num_steps, num_masks - 1)


def feather(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Blend weights for pasting an edit: 0 outside the mask, rising to 1 inside it.

    The ramp lies *inside* the mask, so every pixel outside the mask keeps the original value
    exactly. A pixel's weight is (number of erosions it survives, at most ``radius``) / radius,
    so the mask's border pixels get 1/radius and a 1-pixel line still shows the edit.
    """
    if radius <= 0:
        return mask
    binary = (mask > 0).to(mask.dtype)
    depth = torch.zeros_like(binary)
    rows, cols = (binary.amax(dim=(0, 1, k)).nonzero() for k in (3, 2))
    if len(rows) == 0:
        return mask * depth
    # the erosions run on the mask's box and a ring of 1 px of the unmasked frame around it
    # (the frame's own border counts as masked, as in the whole frame): the same depths, at
    # the cost of the box instead of the frame (a small mask on a 12-MP photo)
    y0, x0 = max(int(rows[0]) - 1, 0), max(int(cols[0]) - 1, 0)
    box = (..., slice(y0, int(rows[-1]) + 2), slice(x0, int(cols[-1]) + 2))
    current = binary[box]
    for _ in range(radius):
        depth[box] += current
        current = erode(current, 3)
    return mask * (depth / radius)


def pad_to_multiple(x: torch.Tensor, multiple: int, mode: str = "reflect") -> tuple:
    """Pad (B, C, H, W) at the bottom/right so H and W are multiples; returns (x, (H, W))."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x, (h, w)
    if mode == "reflect" and (ph >= h or pw >= w):
        mode = "replicate"
    if mode == "constant":
        return F.pad(x, (0, pw, 0, ph), mode="constant", value=0.0), (h, w)
    return F.pad(x, (0, pw, 0, ph), mode=mode), (h, w)


def mask_bbox(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """Bounding box (x0, y0, x1, y1), end-exclusive, of the nonzero pixels of (..., H, W)."""
    m = mask.reshape(mask.shape[-2:]) > 0
    ys = torch.nonzero(m.any(dim=1)).flatten()
    xs = torch.nonzero(m.any(dim=0)).flatten()
    assert len(ys) and len(xs), "empty mask"
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1


def box_area(box: tuple[int, int, int, int]) -> int:
    """Pixels in (x0, y0, x1, y1)."""
    return (box[2] - box[0]) * (box[3] - box[1])


def crop_box(
    bbox: tuple[int, int, int, int],
    image_size: tuple[int, int],
    min_side: int,
    context: float,
) -> tuple[int, int, int, int]:
    """A square box around ``bbox`` with ``context`` x its side added on every side, at least
    ``min_side`` wide, shifted (not shrunk) to lie inside the image, clipped only where the image
    is smaller. ``image_size`` is (W, H); returns (x0, y0, x1, y1)."""
    W, H = image_size
    x0, y0, x1, y1 = bbox
    side = max(x1 - x0, y1 - y0)
    side = max(min_side, math.ceil(side * (1 + 2 * context)))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2

    def span(c: float, n: int) -> tuple[int, int]:
        s = min(side, n)
        a = int(round(c - s / 2))
        a = max(0, min(a, n - s))
        return a, a + s

    bx0, bx1 = span(cx, W)
    by0, by1 = span(cy, H)
    return bx0, by0, bx1, by1
