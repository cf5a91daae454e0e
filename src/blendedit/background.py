"""Background reconstruction after decoding (Blended Latent Diffusion, step 6).

Decoding blended latents does not give back the original pixels outside the mask (the VAE is
lossy). A reconstruction method takes the decoded edits, the source and the mask (and, for
``decoder``, the latents and the VAE) and returns the final images:

- ``paste``: original pixels outside the mask, the edit feathered just inside its edge;
- ``poisson``: seamless cloning: inside the mask, the function whose gradients are the edit's
  and whose values on the mask's border are the source's (a discrete Poisson equation, solved
  by conjugate gradients); outside the mask, the source exactly;
- ``decoder`` (the paper): fine-tune a copy of the VAE decoder on this image so that it decodes
  the edited latents to the edit inside the mask and to the source outside it
  (MSE(D(z) m, edit m) + lambda MSE(D(z) (1 - m), x (1 - m))); ``latents`` mode optimizes z
  instead of the decoder's weights. The loaded VAE is never changed;
- ``none``: the raw decode, for studies.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import masks as M

BACKGROUND_METHODS = ("paste", "poisson", "decoder", "none")
DECODER_MODES = ("weights", "latents")
#: Which decoder weights ``decoder`` fine-tunes: all (the paper), the last up block and the
#: output head, or the output head (norm + conv) alone. With fewer, the layers before the tuned
#: ones run once, without gradients, and their output is reused at every step.
DECODER_LAYERS = ("all", "last", "head")
#: Adam's learning rate by layers tuned, when none is given: the paper's 1e-4 for the whole
#: decoder; fewer layers, fed features that do not move, take a larger step
#: (benchmarks/results/decoder_cost.md).
DECODER_LR = {"all": 1e-4, "last": 1e-3, "head": 3e-3}


def unscale_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """The VAE's own latents from the denoiser's: z / scaling_factor + shift_factor (SD3's and
    Flux's VAEs have a shift; SD's none)."""
    return z / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)


def paste(
    edit: torch.Tensor, source: torch.Tensor, mask: torch.Tensor, feather: int
) -> torch.Tensor:
    """Original pixels outside the mask; the edit inside, feathered over ``feather`` pixels just
    inside the mask edge. Every pixel with mask 0 equals the source exactly.

    ``edit`` (N, 3, H, W), ``source`` (1, 3, H, W), ``mask`` (1, 1, H, W), all in [0, 1].
    """
    w = M.feather(mask, feather).to(edit)
    return w * edit + (1 - w) * source


def keep_outside(images: torch.Tensor, source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``images`` where ``mask > 0``, the ``source``'s pixels exactly everywhere else."""
    return torch.where(mask > 0, images, source)


def none(
    edit: torch.Tensor, source: torch.Tensor, mask: torch.Tensor, feather: int
) -> torch.Tensor:
    """The raw decode, for studies of what the latent blend alone keeps."""
    return edit


# --- Poisson (seamless cloning) -------------------------------------------------------------


def _neighbours(x: torch.Tensor) -> list[torch.Tensor]:
    """The 4 neighbours of every pixel (zero-padded): up, down, left, right."""
    p = F.pad(x, (1, 1, 1, 1))
    return [p[..., :-2, 1:-1], p[..., 2:, 1:-1], p[..., 1:-1, :-2], p[..., 1:-1, 2:]]


def poisson(
    edit: torch.Tensor,
    source: torch.Tensor,
    mask: torch.Tensor,
    feather: int = 0,
    *,
    max_iter: int = 3000,
    tol: float = 1e-6,
) -> torch.Tensor:
    """Seamless cloning of ``edit`` into ``source`` over the region ``mask > 0``.

    Inside the region solves sum_q (f_p - f_q) = sum_q (e_p - e_q) over the in-image 4-neighbours
    q, with f_q = source_q for neighbours outside the region (Dirichlet) and no term past the
    image border (Neumann); outside the region the result is the source exactly. Matrix-free
    conjugate gradients on every (sample, channel) at once; ``feather`` is unused.
    """
    region = (mask > 0).to(edit)  # (1, 1, H, W)
    if not region.any():
        return source.expand_as(edit).clone()
    if bool((region > 0).all()):  # no border to anchor to: the edit itself
        return edit.clone()
    inside = _neighbours(torch.ones_like(region))  # 1 where the neighbour lies in the image
    degree = sum(inside)
    e, s = edit.double(), source.double().expand_as(edit)
    r, deg = region.double(), degree.double()
    # b = sum over in-image neighbours of (e_p - e_q) + source values of neighbours outside
    b = deg * e - sum(n * k for n, k in zip(_neighbours(e), inside))
    b = b + sum(n * k for n, k in zip(_neighbours(s * (1 - r)), inside))
    b = b * r

    def A(f):  # the Laplacian restricted to the region
        f = f * r
        return (deg * f - sum(n * k for n, k in zip(_neighbours(f), inside))) * r

    f = e * r
    res = b - A(f)
    p = res.clone()
    rs = (res * res).sum(dim=(-2, -1), keepdim=True)
    b_norm = (b * b).sum(dim=(-2, -1), keepdim=True).clamp_min(1e-30)
    for _ in range(max_iter):
        if bool((rs <= tol * tol * b_norm).all()):
            break
        ap = A(p)
        alpha = rs / (p * ap).sum(dim=(-2, -1), keepdim=True).clamp_min(1e-30)
        f = f + alpha * p
        res = res - alpha * ap
        rs_new = (res * res).sum(dim=(-2, -1), keepdim=True)
        p = res + (rs_new / rs.clamp_min(1e-30)) * p
        rs = rs_new
    out = f * r + s * (1 - r)
    return out.clamp(0, 1).to(edit.dtype)


# --- decoder fine-tuning ---------------------------------------------------------------------


@dataclass
class DecoderTuning:
    """What one ``decoder`` reconstruction did (per sample): the loss before and after each
    step, the crop it worked on and its time."""

    losses: list[list[float]] = field(default_factory=list)
    latent_box: tuple[int, int, int, int] = (0, 0, 0, 0)
    seconds: float = 0.0


class _Decode(torch.nn.Module):
    """post_quant_conv + decoder of an AutoencoderKL: latents (unscaled) -> pixels in [-1, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.post_quant_conv = getattr(vae, "post_quant_conv", None)
        self.decoder = vae.decoder

    def forward(self, z):
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


def check_decoder_options(mode: str, layers: str) -> None:
    """``ValueError`` naming a bad ``decoder_mode`` / ``decoder_layers`` or a bad pair."""
    if mode not in DECODER_MODES:
        raise ValueError(f"decoder_mode: expected one of {DECODER_MODES}, got {mode!r}")
    if layers not in DECODER_LAYERS:
        raise ValueError(f"decoder_layers: expected one of {DECODER_LAYERS}, got {layers!r}")
    if mode == "latents" and layers != "all":
        raise ValueError(
            "decoder_layers: the latents mode optimizes z through the whole decoder; "
            f"use decoder_layers='all', not {layers!r}"
        )


class _Head(torch.nn.Module):
    """The decoder from up block ``start`` on (``start = len(up_blocks)``: the output head)."""

    def __init__(self, decoder, start: int):
        super().__init__()
        self.blocks = torch.nn.ModuleList(list(decoder.up_blocks)[start:])
        self.norm, self.act, self.conv = decoder.conv_norm_out, decoder.conv_act, decoder.conv_out

    def forward(self, h):
        for block in self.blocks:
            h = block(h, None)
        return self.conv(self.act(self.norm(h)))


def _split_decoder(vae, layers: str):
    """(frozen prefix: z -> features, the module to tune: features -> pixels, the prefix's
    upscale factor), both in the default layout: the loaded decoder's modules, or a copy where
    they are channels-last (the pipeline's layout on the CPU), since torch 2.13's CPU backward
    through that layout crashed on some odd sizes. The loaded decoder is never changed."""
    whole = _Decode(vae)
    if any(p.dim() == 4 and not p.is_contiguous() for p in whole.parameters()):
        whole = copy.deepcopy(whole).to(memory_format=torch.contiguous_format)
    if layers == "all":
        return (lambda z: z), whole, 1
    dec = whole.decoder
    if not all(hasattr(dec, a) for a in ("conv_in", "mid_block", "up_blocks", "conv_out")):
        raise ValueError(
            f"decoder_layers: {layers!r} needs a diffusers AutoencoderKL decoder; use 'all'"
        )
    start = len(dec.up_blocks) - (1 if layers == "last" else 0)
    factor = 2 ** sum(getattr(b, "upsamplers", None) is not None for b in dec.up_blocks[:start])

    @torch.no_grad()
    def prefix(z):
        z = z.to(dec.conv_in.weight.dtype)
        if whole.post_quant_conv is not None:
            z = whole.post_quant_conv(z)
        h = dec.mid_block(dec.conv_in(z), None)
        for block in list(dec.up_blocks)[:start]:
            h = block(h, None)
        return h.float()

    return prefix, _Head(dec, start), factor


class _FixedGroupNorm(torch.nn.Module):
    """A GroupNorm that normalizes with given per-(sample, group) statistics instead of its
    input's: the whole frame's, so that a crop decodes as it does inside the frame."""

    def __init__(self, norm: torch.nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor):
        super().__init__()
        self.norm = norm
        self.register_buffer("mean", mean[..., None])
        self.register_buffer("inv_std", torch.rsqrt(var[..., None] + norm.eps))

    def forward(self, x):
        n, c = x.shape[:2]
        y = ((x.reshape(n, self.norm.num_groups, -1) - self.mean) * self.inv_std).reshape(x.shape)
        if self.norm.affine:
            shape = (1, c) + (1,) * (x.dim() - 2)
            y = y * self.norm.weight.reshape(shape) + self.norm.bias.reshape(shape)
        return y


@torch.no_grad()
def fix_group_norms(module: torch.nn.Module, frame: torch.Tensor) -> torch.nn.Module:
    """Run ``module`` on ``frame`` (the whole frame's input) and replace, in place, each of its
    GroupNorms by a :class:`_FixedGroupNorm` holding the statistics it saw. A convolutional
    decoder then decodes a crop of ``frame`` to the matching crop of the whole frame's decode
    (up to the crop's border), where a plain GroupNorm would normalize by the crop's own
    statistics and change the colours of everything in it. Returns ``module``."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = []
    for name, sub in module.named_modules():
        if isinstance(sub, torch.nn.GroupNorm):

            def hook(norm, args, _out, name=name):
                x = args[0].reshape(args[0].shape[0], norm.num_groups, -1).float()
                seen[name] = (x.mean(-1), x.var(-1, unbiased=False))

            hooks.append(sub.register_forward_hook(hook))
    try:
        module(frame)
    finally:
        for h in hooks:
            h.remove()
    for name, (mean, var) in seen.items():
        *path, last = name.split(".")
        parent = module.get_submodule(".".join(path))
        setattr(parent, last, _FixedGroupNorm(getattr(parent, last), mean, var))
    return module


def latent_crop(m_lat: torch.Tensor, margin: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the latent mask's box grown by ``margin`` cells, within the frame."""
    ys, xs = torch.nonzero(m_lat[0, 0] > 0, as_tuple=True)
    h, w = m_lat.shape[-2:]
    return (
        max(0, int(xs.min()) - margin),
        max(0, int(ys.min()) - margin),
        min(w, int(xs.max()) + 1 + margin),
        min(h, int(ys.max()) + 1 + margin),
    )


def decoder_finetune(
    vae,
    latents: torch.Tensor,
    source: torch.Tensor,
    mask: torch.Tensor,
    edit: torch.Tensor,
    *,
    steps: int = 75,
    lr: float | None = None,
    lam: float = 100.0,
    mode: str = "weights",
    crop_margin: int | None = 1,
    layers: str = "last",
) -> tuple[torch.Tensor, DecoderTuning]:
    """The paper's background reconstruction, one sample at a time on a copy of the decoder.

    ``latents`` (N, 4, h, w) scaled as the UNet sees them, ``source`` (1, 3, 8h, 8w) and
    ``edit`` (N, 3, 8h, 8w) in [0, 1], ``mask`` (1, 1, 8h, 8w). Minimizes
    MSE(D(z) m, edit m) + lam MSE(D(z) (1 - m), x (1 - m)) with Adam (``lr``, ``steps``) over the
    decoder's weights (``mode='weights'``) or over z (``'latents'``). With ``crop_margin`` it works
    on the latent box of the mask grown by that many cells, and the pixels outside the box are
    the source's (a convolutional decoder's output there depends little on what lies far away):
    the layers before the tuned ones run once on the whole frame, and every GroupNorm of the
    tuned copy normalizes by the whole frame's statistics (:func:`fix_group_norms`), so that
    before any step the crop decodes as it does inside the frame.
    ``layers`` (:data:`DECODER_LAYERS`): which weights are tuned; ``lr`` None takes
    :data:`DECODER_LR` for them.
    Returns the images (N, 3, 8h, 8w) in [0, 1] and a :class:`DecoderTuning`.
    """
    check_decoder_options(mode, layers)
    if lr is None:
        lr = DECODER_LR[layers]
    t0 = time.perf_counter()
    f = source.shape[-1] // latents.shape[-1]  # the VAE's downscale factor
    m_lat = F.max_pool2d(mask.float(), f, f)
    box = (0, 0, latents.shape[-1], latents.shape[-2])
    if crop_margin is not None and bool((m_lat > 0).any()):
        box = latent_crop(m_lat, crop_margin)
    lx0, ly0, lx1, ly1 = box
    px = (lx0 * f, ly0 * f, lx1 * f, ly1 * f)

    cropped = box != (0, 0, latents.shape[-1], latents.shape[-2])
    device = latents.device
    prefix, base, up = _split_decoder(vae, layers)
    x = (source[..., px[1] : px[3], px[0] : px[2]] * 2 - 1).to(device, torch.float32)
    m = mask[..., px[1] : px[3], px[0] : px[2]].to(device, torch.float32)
    out = source.expand(latents.shape[0], -1, -1, -1).clone().float()
    info = DecoderTuning(latent_box=box)
    for k in range(latents.shape[0]):
        target = (edit[k : k + 1, :, px[1] : px[3], px[0] : px[2]] * 2 - 1).to(device).float()
        dec = copy.deepcopy(base).float().train(False)  # one sample's own copy
        # the frozen layers run once, on the whole frame (identity for layers='all')
        z = prefix(unscale_latents(vae, latents[k : k + 1]).to(device, torch.float32))
        z = z.contiguous()  # the default layout, as the decoder's copy
        if cropped:  # normalize the crop by the whole frame's statistics, then crop
            fix_group_norms(dec, z)
            z = z[..., ly0 * up : ly1 * up, lx0 * up : lx1 * up]
        if mode == "weights":
            params = list(dec.parameters())
            for p in params:
                p.requires_grad_(True)
        else:
            for p in dec.parameters():
                p.requires_grad_(False)
            z = z.clone().requires_grad_(True)
            params = [z]
        opt = torch.optim.Adam(params, lr=lr)
        losses = []
        with torch.enable_grad():
            for step in range(steps + 1):  # the last pass only decodes and measures
                y = dec(z)
                loss = F.mse_loss(y * m, target * m) + lam * F.mse_loss(y * (1 - m), x * (1 - m))
                losses.append(loss.item())
                if step == steps:
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        info.losses.append(losses)
        out[k, :, px[1] : px[3], px[0] : px[2]] = ((y.detach() + 1) / 2).clamp(0, 1).cpu()[0]
        del dec, opt
    info.seconds = time.perf_counter() - t0
    return out, info


def reconstruct(
    method: str,
    edit: torch.Tensor,
    source: torch.Tensor,
    mask: torch.Tensor,
    *,
    feather: int,
    vae=None,
    latents: torch.Tensor | None = None,
    decoder_options: dict | None = None,
) -> tuple[torch.Tensor, DecoderTuning | None]:
    """Dispatch to a background method by name; ``decoder`` needs ``vae`` and ``latents``.
    Returns the images and, for ``decoder``, what the tuning did."""
    if method == "decoder":
        if vae is None or latents is None:
            raise ValueError("background: 'decoder' needs the VAE and the edited latents")
        return decoder_finetune(vae, latents, source, mask, edit, **(decoder_options or {}))
    fns = {"paste": paste, "none": none, "poisson": poisson}
    if method not in fns:
        raise ValueError(f"background: expected one of {BACKGROUND_METHODS}, got {method!r}")
    return fns[method](edit, source, mask, feather), None
