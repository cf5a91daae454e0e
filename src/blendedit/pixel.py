"""Blended Diffusion (Avrahami, Lischinski, Fried, CVPR 2022, arXiv 2111.14818): CLIP-guided
pixel-space diffusion with the background blended in at every step.

Notation as DESIGN.md: ``x`` image in [-1, 1], ``m`` mask (1 = edit), ``x_src`` the source,
``q(x_src, t)`` forward noising, ``x̂0`` the model's estimate of the clean image.

Each step t -> s (s the next timestep of the respaced schedule; the last step goes to clean):
x̂0 and the posterior come from the model; the guidance loss (CLIP distance of the masked x̂0
to the prompt, averaged over augmented copies, plus a range loss; Algorithm 1 adds background
losses) is differentiated w.r.t. x_t through the model, and shifts the DDPM mean by
-variance * grad, or for DDIM the noise estimate by sqrt(1 - ᾱ_t) * grad (the score form).
Algorithm 2 then sets the outside of the mask to q(x_src, s); at the end the background is
enforced (the source's pixels outside the mask) unless disabled.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from . import background as B
from . import guidance as G
from . import masks as M
from .checks import _as_mask, _as_pil, _check_float, _check_int, check_generator, check_prompt
from .io import pil_to_tensor, tensor_to_mask, tensor_to_pil
from .latent import OnUNet, _randn
from .options import _opt
from .ranking import RANK_REGIONS, ClipRanker, builtin_ranker

SAMPLERS = ("ddpm", "ddim")
PAPER_CLIP_GUIDANCE_SCALE = 1000.0  # the reference's, for a model that names none
ALGORITHMS = (1, 2)


@dataclass
class PixelEditOptions:
    """Options of a Blended Diffusion edit: the one source of the pipeline's defaults and of the
    CLI's pixel flags."""

    num_inference_steps: int = _opt(100, "denoising steps of the full (respaced) schedule")
    skip_timesteps: Any = _opt(
        None, "steps skipped at the start, the source noised to there (None: a quarter)"
    )
    strength: Any = _opt(None, "fraction of the steps that runs; overrides skip_timesteps")
    clip_guidance_scale: float | None = _opt(
        None,
        "weight of the CLIP loss (0: no guidance); unset: the model's own (the shipped toy "
        "model's 500, from its blendedit.json), else the paper's 1000",
    )
    range_scale: float = _opt(50.0, "weight of the loss keeping the estimate in range")
    num_augmentations: int = _opt(8, "augmented copies through CLIP per step (first plain)")
    augmentation_batch_size: int = _opt(8, "copies through CLIP at once (memory vs speed)")
    distance: str = _opt("spherical", "CLIP distance", G.DISTANCES)
    mix_xt: bool = _opt(False, "guide on the public code's mix of the estimate and x_t")
    algorithm: int = _opt(2, "2: blend the background every step; 1: background loss", ALGORITHMS)
    background_mse_scale: float = _opt(0.0, "algorithm 1: weight of the background MSE")
    background_lpips_scale: float = _opt(0.0, "algorithm 1: LPIPS (needs weights: refused)")
    enforce_background: bool = _opt(True, "original pixels outside the mask at the end")
    num_images_per_prompt: int = _opt(1, "samples per batch")
    num_batches: int = _opt(1, "batches; all samples are ranked together")
    sampler: str = _opt("ddpm", "ddpm (mean shift) or ddim (score form)", SAMPLERS)
    recurrence: int = _opt(
        1, "times each step runs, its result noised back between (1: once, as the paper)"
    )
    rank_region: str = _opt("crop", "what CLIP ranking scores", RANK_REGIONS)


_P = PixelEditOptions()


@dataclass
class BlendedDiffusionOutput:
    """Result of a pixel edit. Lists are best first when a ranker is set."""

    images: list[Image.Image]
    scores: list[float] | None
    order: list[int]
    mask: Image.Image
    crop_box: tuple[int, int, int, int]
    timings: dict[str, float]
    clip_losses: list[float] = field(default_factory=list)  # final guidance loss, per image
    warnings: list[str] = field(default_factory=list)


class BlendedDiffusionPipeline(OnUNet):
    """Blended Diffusion over a diffusers ``UNet2DModel`` (epsilon, v or learned-sigma outputs)
    and its DDPM-style scheduler, guided by a ``transformers.CLIPModel``.

    >>> pipe = BlendedDiffusionPipeline.from_pretrained("toy")
    >>> out = pipe("a red circle", image, mask, generator=torch.Generator().manual_seed(0))
    """

    def __init__(self, unet, scheduler, clip: ClipRanker, ranker: ClipRanker | None = None):
        self.unet, self.scheduler, self.clip = unet, scheduler, clip  # ``clip`` guides
        self.ranker = clip if ranker is None else ranker  # by default the same CLIP ranks
        ac = torch.as_tensor(np.asarray(scheduler.alphas_cumprod), dtype=torch.float64)
        self.alphas_cumprod = ac
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")
        self.learned_sigma = unet.config.out_channels == 2 * unet.config.in_channels
        self.default_clip_guidance_scale = PAPER_CLIP_GUIDANCE_SCALE  # from_pretrained: its own

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, spec: str, *, clip: str | ClipRanker | None = None, local_files_only=None
    ) -> BlendedDiffusionPipeline:
        """``spec``: ``toy`` (the shipped 64 px Shapes World model and its CLIP),
        ``tiny-random``, a folder holding ``unet/`` and ``scheduler/`` (a ``DDPMPipeline``
        folder) or a hub id of one. ``clip``: a CLIP folder, hub id or :class:`ClipRanker`
        that guides and ranks (required unless the spec brings its own; ``toy`` brings two:
        one tuned on its x̂0 guides, the clean-image one ranks)."""
        from .models import load_pixel_components

        c = load_pixel_components(spec, local_files_only=local_files_only)
        if isinstance(clip, str):
            clip = ClipRanker.from_pretrained(clip, local_files_only=local_files_only)
        if clip is None:
            if "clip" not in c:
                raise ValueError(
                    f"clip: {spec!r} brings no CLIP model; pass clip=<CLIP folder or hub id> "
                    "(CLI: --rank-model)"
                )
            ranker = builtin_ranker(c["clip"], c.get("clip_tokenizer"))
            guide = builtin_ranker(c["guide_clip"]) if "guide_clip" in c else ranker
            pipe = cls(c["unet"], c["scheduler"], guide, ranker=ranker)
        else:
            pipe = cls(c["unet"], c["scheduler"], clip)
        pipe.default_clip_guidance_scale = c.get("clip_guidance_scale", PAPER_CLIP_GUIDANCE_SCALE)
        return pipe

    def guidance_or_default(self, clip_guidance_scale: float | None) -> float:
        """``clip_guidance_scale``, or when it is None the model's own
        (:attr:`default_clip_guidance_scale`: its folder's ``blendedit.json``, else 1000)."""
        if clip_guidance_scale is None:
            return self.default_clip_guidance_scale
        return clip_guidance_scale

    def to(self, device=None, dtype=None) -> BlendedDiffusionPipeline:
        self.unet.to(device=device, dtype=dtype)
        self.clip.to(device=device)
        if self.ranker is not self.clip:
            self.ranker.to(device=device)
        return self

    @property
    def native_size(self) -> int:
        s = self.unet.config.sample_size
        return int(s if isinstance(s, int) else s[0])

    # -- the diffusion math -------------------------------------------------------------------

    def timesteps(self, num_inference_steps: int) -> list[int]:
        """Evenly respaced timesteps, high to low, ending at 0."""
        T = len(self.alphas_cumprod)
        ts = np.linspace(0, T - 1, num_inference_steps).round().astype(int)
        return sorted(set(ts.tolist()), reverse=True)

    def _abar(self, t: int) -> float:
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def q_sample(self, x0, t: int, noise):
        a = self._abar(t)
        return math.sqrt(a) * x0 + math.sqrt(1 - a) * noise

    def model_step_terms(self, x, t: int, s: int):
        """The model's view of x_t: (eps, x̂0 (clipped to [-1, 1]), log variance of t -> s)."""
        out = self.unet(x.to(self.dtype), t).sample.float()
        if self.learned_sigma:
            out, v = out.chunk(2, dim=1)
        a_t, a_s = self._abar(t), self._abar(s)
        if self.prediction_type == "v_prediction":
            eps = math.sqrt(a_t) * out + math.sqrt(1 - a_t) * x
        elif self.prediction_type == "sample":
            eps = (x - math.sqrt(a_t) * out) / math.sqrt(1 - a_t)
        else:
            eps = out
        x0 = ((x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)).clamp(-1, 1)
        beta = 1 - a_t / a_s  # the respaced step's beta
        small = beta * (1 - a_s) / (1 - a_t)  # posterior variance
        log_small = math.log(max(small, 1e-20))
        if self.learned_sigma:
            frac = (v + 1) / 2
            logvar = frac * math.log(beta) + (1 - frac) * log_small
        else:
            logvar = torch.full_like(x, log_small)
        return eps, x0, logvar

    # -- input checks ---------------------------------------------------------------------

    def check_inputs(self, prompt, image, mask, o: dict, generator):
        check_prompt(prompt)
        _check_int("num_inference_steps", o["num_inference_steps"], 2, 10_000)
        _check_int("num_images_per_prompt", o["num_images_per_prompt"], 1, 256)
        _check_int("num_batches", o["num_batches"], 1, 1024)
        _check_int("num_augmentations", o["num_augmentations"], 1, 256)
        _check_int("augmentation_batch_size", o["augmentation_batch_size"], 1, 256)
        _check_int("recurrence", o["recurrence"], 1, 100)
        for name in ("clip_guidance_scale", "range_scale", "background_mse_scale"):
            _check_float(name, o[name], 0.0, 1e9)
        if o["strength"] is not None:
            _check_float("strength", o["strength"], 0.0, 1.0, low_open=True)
        elif o["skip_timesteps"] is not None:
            _check_int("skip_timesteps", o["skip_timesteps"], 0, o["num_inference_steps"] - 1)
        if o["background_lpips_scale"]:
            raise ValueError(
                "background_lpips_scale: LPIPS needs pretrained VGG/AlexNet weights, which "
                "blendedit does not ship and cannot download here; use background_mse_scale"
            )
        for name, choices in (
            ("sampler", SAMPLERS),
            ("algorithm", ALGORITHMS),
            ("distance", G.DISTANCES),
            ("rank_region", RANK_REGIONS),
        ):
            if o[name] not in choices:
                raise ValueError(f"{name}: expected one of {choices}, got {o[name]!r}")
        total = o["num_images_per_prompt"] * o["num_batches"]
        check_generator(generator, total, f"num_images_per_prompt x num_batches = {total}")
        image = _as_pil(image, "image")
        return image, _as_mask(mask, image)

    # -- one guided step ------------------------------------------------------------------

    def guidance_grad(self, x, t, s, m, text_embed, o, H, x_src):
        """(gradient of the guidance loss w.r.t. x_t, per-sample CLIP loss, model terms)."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            eps, x0, logvar = self.model_step_terms(x, t, s)
            target = x0
            if o["mix_xt"]:  # the public code's mix: x̂0 * sqrt(1 - ᾱ_t) + x_t * (1 - that)
                fac = math.sqrt(1 - self._abar(t))
                target = x0 * fac + x * (1 - fac)
            clip_l, g_x0 = G.clip_loss_grad(
                target,
                m,
                text_embed,
                self.clip.embed_images,
                H,
                distance=o["distance"],
                chunk=o["augmentation_batch_size"],
            )
            total = (g_x0 * o["clip_guidance_scale"] * target).sum()
            total = total + o["range_scale"] * G.range_loss(target).sum()
            if o["algorithm"] == 1 and o["background_mse_scale"]:
                bg = ((target - x_src) * (1 - m)).pow(2).mean(dim=(1, 2, 3))
                total = total + o["background_mse_scale"] * bg.sum()
            (grad,) = torch.autograd.grad(total, x)
        return grad, clip_l, (eps.detach(), x0.detach(), logvar.detach())

    # -- the edit ------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        image,
        mask,
        *,
        num_inference_steps: int = _P.num_inference_steps,
        skip_timesteps: int | None = _P.skip_timesteps,
        strength: float | None = _P.strength,
        clip_guidance_scale: float | None = _P.clip_guidance_scale,
        range_scale: float = _P.range_scale,
        num_augmentations: int = _P.num_augmentations,
        augmentation_batch_size: int = _P.augmentation_batch_size,
        distance: str = _P.distance,
        mix_xt: bool = _P.mix_xt,
        algorithm: int = _P.algorithm,
        background_mse_scale: float = _P.background_mse_scale,
        background_lpips_scale: float = _P.background_lpips_scale,
        enforce_background: bool = _P.enforce_background,
        num_images_per_prompt: int = _P.num_images_per_prompt,
        num_batches: int = _P.num_batches,
        sampler: str = _P.sampler,
        recurrence: int = _P.recurrence,
        rank_region: str = _P.rank_region,
        generator=None,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        progress: bool = False,
    ) -> BlendedDiffusionOutput:
        """Edit ``image`` inside ``mask`` to match ``prompt`` (Blended Diffusion).

        ``skip_timesteps`` of the ``num_inference_steps`` respaced steps are skipped (the start
        is the source noised to that level; default a quarter, the reference's 25 of 100);
        ``strength`` (fraction that runs) overrides it.
        ``clip_guidance_scale`` 0 turns guidance off; None: :meth:`guidance_or_default`.
        ``algorithm=1``: no blending, background losses instead (``background_mse_scale``).
        ``num_augmentations`` copies (the first plain) go through CLIP
        ``augmentation_batch_size`` at a time. ``recurrence``: each step runs that many times,
        its result noised back to the step's level between (self-recurrence).
        ``num_batches`` runs of ``num_images_per_prompt`` samples are ranked together.
        ``generator``: one, or one per image (``num_images_per_prompt * num_batches``).
        """
        t_total = time.perf_counter()
        clip_guidance_scale = self.guidance_or_default(clip_guidance_scale)
        o = dict(locals())
        for k in ("self", "prompt", "image", "mask", "generator", "callback", "progress"):
            o.pop(k)
        image, mask_full = self.check_inputs(prompt, image, mask, o, generator)
        o["guided"] = clip_guidance_scale > 0 or (algorithm == 1 and background_mse_scale > 0)
        n_per, n_batches = num_images_per_prompt, num_batches
        total = n_per * n_batches
        gens = generator if isinstance(generator, list) else None
        device = self.device
        timings = dict(guided_steps=0.0, unguided_steps=0.0)

        # 1. The region: a box around the mask, resized to the model's native size
        W, H = image.size
        size = self.native_size
        box = M.crop_box(M.mask_bbox(mask_full), (W, H), size, 0.5)
        x0_, y0_, x1_, y1_ = box
        x_full = pil_to_tensor(image)
        region = x_full[..., y0_:y1_, x0_:x1_]
        m_region = mask_full[..., y0_:y1_, x0_:x1_]
        resized = region.shape[-2:] != (size, size)
        x_src = F.interpolate(region, (size, size), mode="area") if resized else region
        m = (F.interpolate(m_region, (size, size), mode="area") if resized else m_region) > 0
        x_src = (x_src * 2 - 1).to(device)
        m = m.float().to(device)

        # 2. Schedule and prompt
        ts = self.timesteps(num_inference_steps)
        if strength is not None:
            skip = num_inference_steps - max(1, int(round(num_inference_steps * strength)))
        elif skip_timesteps is None:
            skip = num_inference_steps // 4  # the reference: 25 of 100
        else:
            skip = skip_timesteps
        ts = ts[min(skip, len(ts) - 1) :]
        text_embed = self.clip.embed_text(prompt).float()
        H_all = G.random_homographies(num_augmentations, gens[0] if gens else generator)

        results, losses = [], []
        for b in range(n_batches):
            g = gens[b * n_per : (b + 1) * n_per] if gens else generator
            shape = (n_per, 3, size, size)
            x = self.q_sample(x_src, ts[0], _randn(shape, g, device, torch.float32))
            last_clip = torch.zeros(n_per)
            steps = tqdm(range(len(ts)), disable=not progress, desc=f"edit {b + 1}", leave=False)
            for i in steps:
                t = ts[i]
                s = ts[i + 1] if i + 1 < len(ts) else -1
                t0 = time.perf_counter()
                for r in range(recurrence):
                    if r:  # self-recurrence: x_s noised back to t, and the step again
                        x = self.renoise(x, s, t, _randn(x.shape, g, device, torch.float32))
                    x, last_clip = self._guided_step(x, t, s, m, text_embed, o, H_all, x_src, g)
                    timings["guided_steps" if o["guided"] else "unguided_steps"] += (
                        time.perf_counter() - t0
                    )
                    t0 = time.perf_counter()
                if callback is not None:
                    callback(i, t, x)
            results.append(x.clamp(-1, 1).cpu())
            losses.append(last_clip.cpu())

        # 3. Back to the frame, the background enforced
        edit = (torch.cat(results) + 1) / 2  # (total, 3, size, size) in [0, 1]
        if resized:
            edit = F.interpolate(edit, region.shape[-2:], mode="bicubic", align_corners=False)
        frames = x_full.expand(total, -1, -1, -1).clone()
        frames[..., y0_:y1_, x0_:x1_] = edit.clamp(0, 1)
        if enforce_background:
            frames = B.keep_outside(frames, x_full, mask_full)
        frames = (frames * 255).round() / 255

        # 4. Rank with CLIP
        t0 = time.perf_counter()
        s_all = self.ranker.score(frames, prompt, mask_full, rank_region)
        order = torch.argsort(s_all, descending=True, stable=True).tolist()
        timings["rank"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_total
        clip_l = torch.cat(losses)
        return BlendedDiffusionOutput(
            images=tensor_to_pil(frames, order),
            scores=[float(s_all[k]) for k in order],
            order=order,
            mask=tensor_to_mask(mask_full),
            crop_box=box,
            timings=timings,
            clip_losses=[float(clip_l[k]) for k in order],
        )

    def renoise(self, x_s, s: int, t: int, noise):
        """x_s -> x_t by the forward process between the two steps (s < t; s < 0 is clean)."""
        a = self._abar(t) / self._abar(s)
        return math.sqrt(a) * x_s + math.sqrt(1 - a) * noise

    def _guided_step(self, x, t, s, m, text_embed, o, H, x_src, g):
        """One step x_t -> x_s: guided (when ``o["guided"]``), then Algorithm 2's blend of the
        source noised to s. Returns (x_s, the per-sample CLIP loss or zeros)."""
        last_clip = torch.zeros(x.shape[0])
        if o["guided"]:
            grad, last_clip, (eps, x0, logvar) = self.guidance_grad(
                x, t, s, m, text_embed, o, H, x_src
            )
        else:
            grad = None
            eps, x0, logvar = self.model_step_terms(x, t, s)
        x = self._step(x, t, s, eps, x0, logvar, grad, o["sampler"], g, x.device)
        if o["algorithm"] == 2:  # Algorithm 2: the background at the new step's level
            noise = _randn(x.shape, g, x.device, torch.float32)
            bg = x_src if s < 0 else self.q_sample(x_src, s, noise)
            x = m * x + (1 - m) * bg
        return x, last_clip

    def _step(self, x, t, s, eps, x0, logvar, grad, sampler, g, device):
        """x_t -> x_s with the guidance gradient (DDPM: mean shift; DDIM: score form)."""
        a_t, a_s = self._abar(t), self._abar(s)
        if sampler == "ddim":
            if grad is not None:  # eps' = eps + sqrt(1 - ᾱ_t) grad; x̂0 from eps'
                eps = eps + math.sqrt(1 - a_t) * grad
                x0 = ((x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)).clamp(-1, 1)
            return math.sqrt(a_s) * x0 + math.sqrt(1 - a_s) * eps
        beta = 1 - a_t / a_s
        mean = (math.sqrt(a_s) * beta / (1 - a_t)) * x0 + (
            math.sqrt(1 - beta) * (1 - a_s) / (1 - a_t)
        ) * x
        var = logvar.exp()
        if grad is not None:
            mean = mean - var * grad
        if s < 0:
            return mean
        return mean + var.sqrt() * _randn(x.shape, g, device, torch.float32)
