"""CLIP guidance for Blended Diffusion: differentiable augmentations, CLIP distances, range and
background losses, and the gradient of their sum through a batch of augmented copies without
holding every copy's activations at once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DISTANCES = ("spherical", "cosine")


def random_homographies(
    n: int,
    generator: torch.Generator | None,
    *,
    degrees=30.0,
    translate=0.1,
    scale=(0.8, 1.1),
    distortion=0.5,
    p=0.8,
) -> torch.Tensor:
    """``n`` random 3x3 maps in normalised coordinates ([-1, 1]^2): the first is the identity
    (the plain copy, as the reference keeps one); each other one is, with probability ``p``
    each, a random affine map (rotation, translation, scale) and a random perspective
    (corners moved by up to ``distortion`` / 2 of the side)."""
    out = torch.eye(3).repeat(n, 1, 1)

    def u(lo, hi, size=()):
        return lo + (hi - lo) * torch.rand(size, generator=generator)

    for k in range(1, n):
        H = torch.eye(3)
        if float(u(0, 1)) < p:
            a = math.radians(float(u(-degrees, degrees)))
            s = float(u(*scale))
            tx, ty = (float(u(-2 * translate, 2 * translate)) for _ in range(2))
            H = torch.tensor(
                [
                    [s * math.cos(a), -s * math.sin(a), tx],
                    [s * math.sin(a), s * math.cos(a), ty],
                    [0.0, 0.0, 1.0],
                ]
            )
        if float(u(0, 1)) < p:
            src = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
            dst = src + u(-distortion, distortion, (4, 2))
            H = _homography(src, dst) @ H
        out[k] = H
    return out


def _homography(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """The 3x3 map taking the 4 points ``src`` to ``dst`` (direct linear solve)."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src.tolist(), dst.tolist()):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    h = torch.linalg.solve(torch.tensor(rows, dtype=torch.float64), torch.tensor(rhs).double())
    return torch.cat([h, h.new_ones(1)]).view(3, 3).float()


def warp(x: torch.Tensor, H: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """Warp (B, C, h, w) by (B, 3, 3) maps (output pixel p samples x at H^-1 p), border
    padding, differentiable in ``x``; output ``size`` x ``size`` (default: x's size)."""
    b = x.shape[0]
    oh, ow = (size, size) if size else x.shape[-2:]
    ys = torch.linspace(-1, 1, oh, device=x.device)
    xs = torch.linspace(-1, 1, ow, device=x.device)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    pts = torch.stack([gx, gy, torch.ones_like(gx)], -1).view(1, -1, 3)
    inv = torch.linalg.inv(H.to(x.device, torch.float32))
    src = pts @ inv.transpose(1, 2)
    src = src[..., :2] / src[..., 2:].clamp_min(1e-6)
    grid = src.view(b, oh, ow, 2).to(x.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def clip_distance(img: torch.Tensor, txt: torch.Tensor, kind: str = "spherical") -> torch.Tensor:
    """Distance between image and text embeddings (rows), after normalisation: spherical
    (2 arcsin(|a - b| / 2)^2, the reference's) or cosine (1 - cos)."""
    a, b = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
    if kind == "spherical":
        return (a - b).norm(dim=-1).div(2).clamp(max=1).arcsin().pow(2).mul(2)
    if kind == "cosine":
        return 1 - (a * b).sum(-1)
    raise ValueError(f"clip_distance: expected one of {DISTANCES}, got {kind!r}")


def range_loss(x: torch.Tensor) -> torch.Tensor:
    """Per sample: mean squared excess of ``x`` (in [-1, 1] units) outside [-1, 1]."""
    return (x - x.clamp(-1, 1)).pow(2).mean(dim=(1, 2, 3))


def clip_loss_grad(
    x0: torch.Tensor,
    mask: torch.Tensor,
    text_embed: torch.Tensor,
    embed_images,
    homographies: torch.Tensor,
    *,
    distance: str = "spherical",
    chunk: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP loss of the masked ``x0`` (N, 3, H, W in [-1, 1]) averaged over the augmented copies,
    and its gradient w.r.t. ``x0``. Copies go through CLIP ``chunk`` at a time, each chunk's
    graph freed after its backward, so memory grows with ``chunk``, not with the number of
    copies. ``embed_images`` maps (B, 3, h, w) in [0, 1] to embeddings. Returns (per-sample
    loss (N,), gradient like x0)."""
    leaf = x0.detach().requires_grad_(True)
    n, a = x0.shape[0], homographies.shape[0]
    losses = torch.zeros(n, device=x0.device)
    with torch.enable_grad():
        for s in range(0, a, chunk):
            Hs = homographies[s : s + chunk].to(x0.device)
            k = Hs.shape[0]
            masked = ((leaf + 1) / 2) * mask  # the background zeroed, as in the reference
            # every sample x every copy of this chunk: (n * k, 3, H, W)
            imgs = warp(masked.repeat_interleave(k, 0), Hs.repeat(n, 1, 1))
            d = clip_distance(embed_images(imgs), text_embed.expand(n * k, -1), distance)
            part = d.view(n, k).sum(1) / a
            part.sum().backward()  # gradients of samples are independent: sum is fine
            losses += part.detach()
    return losses, leaf.grad
