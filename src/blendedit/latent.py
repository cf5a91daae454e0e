"""Blended Latent Diffusion (Avrahami, Fried, Lischinski, SIGGRAPH 2023, arXiv 2206.02779).

Notation follows the paper and DESIGN.md: ``x`` image, ``m`` mask (1 = edit), ``z`` latent,
``z_src = E(x)``, ``q(z_src, t)`` forward noising to level ``t``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from . import background as B
from . import checks
from . import conditioning as C
from . import masks as M
from .checks import _as_mask, _as_pil, _check_float, _check_int, check_generator, check_prompt
from .io import mask_to_tensor, pil_to_tensor, tensor_to_mask, tensor_to_pil
from .latent_model import Generator, LatentModel, OnUNet, _randn, _sync  # noqa: F401
from .options import (  # noqa: F401 (the options' names, where users import them from)
    _D,
    BACKGROUND_NOISE_MODES,
    BACKGROUND_OPTIONS,
    CROP_MODES,
    DEFAULT_GUIDANCE_SCALE,
    SCHEDULERS,
    LatentEditOptions,
    _opt,
    options_fields,
)
from .ranking import RANK_REGIONS
from .sharing import edit_cache

#: crop_to_mask="auto" zooms (generates the box at the native size and resizes it back) where
#: the box around the mask at native scale holds more than this many times the native area
AUTO_ZOOM_AREA = 1.5
#: the detail pass (``detail_strength``) of a zoomed edit runs at up to this many times the
#: native size a side (the box's own size where smaller): 2x, the web UIs' "hires fix" scale;
#: tiles of native size at the box's full scale (6x on big frames) measured worse: the shipped
#: model drew small objects in every tile (docs/benchmarks.md#big-frames-issue-44)
DETAIL_SCALE = 2


@dataclass
class BlendedLatentDiffusionOutput:
    """Result of an edit. Lists are in ranked order (best first) when a ranker is set."""

    images: list[Image.Image]
    scores: list[float] | None
    order: list[int]  # sample index of each image
    latents: torch.Tensor  # (N, 4, h, w) final latents, ranked order
    source_latents: torch.Tensor  # (1, 4, h, w) = E(x) of the edited region
    mask: Image.Image  # pixel mask used
    latent_mask: torch.Tensor  # (1, 1, h, w) exact latent mask
    mask_schedule: list[torch.Tensor]  # progressive shrinking, most dilated first
    crop_box: tuple[int, int, int, int]  # (x0, y0, x1, y1) of the region that was edited
    timings: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    reconstruction: Any = None  # background="decoder": a background.DecoderTuning (losses ...)
    zoomed: bool = False  # crop_to_mask="zoom": crop_box was resized to the native size and back
    detailed: bool = False  # a detail pass ran on the zoomed region (not in ``latents``)
    mask_info: dict | None = None  # mask_prompt: how the mask was found (TextMask.info)


# --- the math, as small functions over tensors -----------------------------------------------


def blend(z: torch.Tensor, z_bg: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Latent blend (Blended Latent Diffusion, Alg. 1, line 7): m * z + (1 - m) * z_bg."""
    return m * z + (1 - m) * z_bg


# --- the pipeline --------------------------------------------------------------------------


class BlendedLatentDiffusionPipeline(LatentModel):
    """Blended Latent Diffusion over any Stable Diffusion model (diffusers components).

    >>> pipe = BlendedLatentDiffusionPipeline.from_pretrained(
    ...     "stable-diffusion-v1-5/stable-diffusion-v1-5")
    >>> out = pipe("a red ball", image, mask, generator=torch.Generator().manual_seed(0))
    >>> out.images[0].save("edit.png")
    """

    # -- input checking ------------------------------------------------------------------

    def check_inputs(self, prompt, image, mask, opts: LatentEditOptions, generator, callback):
        """Validate every argument once; returns (PIL image, float mask (1, 1, H, W))."""
        self.check_options(prompt, opts, generator, callback)
        image = _as_pil(image, "image")
        return image, _as_mask(mask, image)

    def check_options(self, prompt, opts: LatentEditOptions, generator, callback) -> None:
        """Validate every argument but the image and the mask (before a mask is searched for)."""
        check_prompt(prompt)
        checks.check_negative_prompt(opts.negative_prompt, self.distilled_guidance)
        _check_int("num_inference_steps", opts.num_inference_steps, 1, 10_000)
        _check_int("num_images_per_prompt", opts.num_images_per_prompt, 1, 1024)
        if opts.shrink_iterations != "auto":
            _check_int("shrink_iterations", opts.shrink_iterations, 0, 64)
        _check_int("feather", opts.feather, 0, 1024)
        _check_float("guidance_scale", self.guidance_or_default(opts.guidance_scale), 0.0, 1000.0)
        _check_float("crop_context", opts.crop_context, 0.0, 100.0)
        _check_float("refiner_fraction", opts.refiner_fraction, 0.0, 1.0)
        _check_float("detail_strength", opts.detail_strength, 0.0, 1.0)
        if opts.detail_strength and int(opts.num_inference_steps * opts.detail_strength) < 1:
            raise ValueError(
                f"detail_strength: {opts.detail_strength} x num_inference_steps "
                f"{opts.num_inference_steps} runs no step; raise either, or 0 for no detail pass"
            )
        _check_float("strength", opts.strength, 0.0, 1.0, low_open=True)
        if int(opts.num_inference_steps * opts.strength) < 1:
            raise ValueError(
                f"strength: {opts.strength} x num_inference_steps {opts.num_inference_steps} "
                "runs no step; raise either"
            )
        for name, choices in (
            ("background", B.BACKGROUND_METHODS),
            ("mask_downsample", M.MASK_DOWNSAMPLE_MODES),
            ("background_noise", BACKGROUND_NOISE_MODES),
            ("rank_region", RANK_REGIONS),
        ):
            if getattr(opts, name) not in choices:
                raise ValueError(f"{name}: expected one of {choices}, got {getattr(opts, name)!r}")
        B.check_decoder_options(opts.decoder_mode, opts.decoder_layers)
        _check_int("decoder_steps", opts.decoder_steps, 0, 100_000)
        if opts.decoder_lr is not None:
            _check_float("decoder_lr", opts.decoder_lr, 0.0, 10.0, low_open=True)
        _check_float("decoder_lambda", opts.decoder_lambda, 0.0, 1e9)
        _check_int("decoder_crop_margin", opts.decoder_crop_margin, -1, 10_000)
        if opts.crop_to_mask not in CROP_MODES:
            raise ValueError(
                f"crop_to_mask: expected 'auto', 'crop' (True), False or 'zoom', got "
                f"{opts.crop_to_mask!r}"
            )
        n = opts.num_images_per_prompt
        check_generator(generator, n, f"num_images_per_prompt={n}")
        if callback is not None and not callable(callback):
            raise ValueError(f"callback: expected a callable, got {type(callback).__name__}")

    # -- the edit ------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        image,
        mask=None,
        *,
        mask_prompt: str | None = None,
        mask_options: dict | None = None,
        negative_prompt: str | None = None,
        num_inference_steps: int = _D.num_inference_steps,
        guidance_scale: float | None = _D.guidance_scale,
        strength: float = _D.strength,
        num_images_per_prompt: int = _D.num_images_per_prompt,
        generator: Generator = None,
        mask_downsample: str = _D.mask_downsample,
        shrink_iterations: int | str = _D.shrink_iterations,
        background: str = _D.background,
        background_noise: str = _D.background_noise,
        feather: int = _D.feather,
        decoder_steps: int = _D.decoder_steps,
        decoder_lr: float | None = _D.decoder_lr,
        decoder_lambda: float = _D.decoder_lambda,
        decoder_mode: str = _D.decoder_mode,
        decoder_layers: str = _D.decoder_layers,
        decoder_crop_margin: int = _D.decoder_crop_margin,
        crop_to_mask: Any = _D.crop_to_mask,
        crop_context: float = _D.crop_context,
        detail_strength: float = _D.detail_strength,
        rank_region: str = _D.rank_region,
        micro_conditioning: str = _D.micro_conditioning,
        refiner_fraction: float = _D.refiner_fraction,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        progress: bool = False,
    ) -> BlendedLatentDiffusionOutput:
        """Edit ``image`` inside ``mask`` to match ``prompt`` (Blended Latent Diffusion, Alg. 1).

        ``image``: PIL image, HxWx3 array or (1, 3, H, W) tensor in [0, 1]. ``mask``: PIL image,
        HxW array or tensor, nonzero = edit (soft values are used as blend weights).
        ``generator``: one ``torch.Generator`` or a list of ``num_images_per_prompt`` (sample i
        then depends only on generator i). ``callback(step, t, latents)`` runs after every step.
        ``mask_prompt``: in place of ``mask``, a text naming the region to edit; the mask is
        found with this model (:meth:`mask_from_text`, with ``mask_options``; the output's
        ``mask_info`` says how).
        See :class:`LatentEditOptions` for the other arguments.
        """
        t_total = time.perf_counter()
        opts = LatentEditOptions(
            negative_prompt="" if negative_prompt is None else negative_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=self.guidance_or_default(guidance_scale),
            strength=strength,
            num_images_per_prompt=num_images_per_prompt,
            mask_downsample=mask_downsample,
            shrink_iterations=shrink_iterations,
            background=background,
            background_noise=background_noise,
            feather=feather,
            decoder_steps=decoder_steps,
            decoder_lr=decoder_lr,
            decoder_lambda=decoder_lambda,
            decoder_mode=decoder_mode,
            decoder_layers=decoder_layers,
            decoder_crop_margin=decoder_crop_margin,
            crop_to_mask=crop_to_mask,
            crop_context=crop_context,
            detail_strength=detail_strength,
            rank_region=rank_region,
            micro_conditioning=micro_conditioning,
            refiner_fraction=refiner_fraction,
        )
        # 1. Check inputs (the options before any mask is searched for from words)
        found = None
        if (mask is None) == (mask_prompt is None):
            raise ValueError("mask: give either a mask or a mask_prompt (a text naming the region)")
        self.check_options(prompt, opts, generator, callback)
        if mask_prompt is not None:
            found = self.mask_from_text(image, mask_prompt, progress, **(mask_options or {}))
            mask = found.mask
        image = _as_pil(image, "image")
        mask_full = _as_mask(mask, image)
        device, dtype, n = self.device, self.dtype, num_images_per_prompt
        timings: dict[str, float] = {}
        warnings: list[str] = []
        if bool((mask_full > 0).all()):
            warnings.append(
                "mask: covers the whole image, so nothing of it is kept (text-to-image)"
            )

        # 2. Region to edit: the whole frame, a box around the mask at native size, or (zoom)
        # the box of the mask and its context resized to the native size
        x_full = pil_to_tensor(image)  # (1, 3, H, W)
        W, H = image.size
        zoom = crop_to_mask == "zoom"
        crop = crop_to_mask if crop_to_mask != "auto" else max(W, H) > self.native_size
        box = (0, 0, W, H)
        zoom_side = max(self.vae_scale_factor, self.native_size // 8)  # at most 8x magnified
        if crop:
            side = zoom_side if zoom else self.native_size
            box = M.crop_box(M.mask_bbox(mask_full), (W, H), side, crop_context)
            if crop_to_mask == "auto" and M.box_area(box) > AUTO_ZOOM_AREA * self.native_size**2:
                # the box at native scale would be generated far above the model's own scale
                # (duplicated objects, minutes on the CPU): resized to the native size and back
                zoom = True
                box = M.crop_box(M.mask_bbox(mask_full), (W, H), zoom_side, crop_context)
        largest = self.adapter.largest_side(self.vae_scale_factor)
        if not zoom and largest and max(box[2] - box[0], box[3] - box[1]) > largest:
            zoom = True  # beyond the denoiser's position table (SD3): generated at native size
            warnings.append(
                f"image: the region to edit is {box[2] - box[0]}x{box[3] - box[1]} px, more than "
                f"this model takes ({largest} px a side); it was generated at "
                f"{'x'.join(map(str, self.zoom_size(box)[::-1]))} and resized back"
            )
        x_pad, m_pad, (h, w) = self._region(x_full, mask_full, box, zoom)

        # 3. Encode the prompt
        cfg = opts.guidance_scale > 1.0 and not self.distilled_guidance
        embeds, pooled, truncated = self.encode_prompt(prompt, opts.negative_prompt, n, cfg)
        if truncated:
            warnings.append("prompt: longer than the text encoder's limit; truncated")
        geometry = (opts.micro_conditioning, (H, W), box, tuple(x_pad.shape[-2:]))
        fam = self.adapter
        added = fam.added(pooled, geometry)  # SDXL's micro-conditioning, SD3's pooled text
        models = [(self.unet, embeds, added)]  # the last steps on the refiner's, if any
        if self.refiner is not None:
            models.append(C.refiner_conditioning(self.refiner, prompt, opts, n, cfg, geometry))

        # 4. Encode the image: z_src = E(x)
        _sync(device)
        t0 = time.perf_counter()
        z_src, cond = self._encode_region(x_pad, m_pad)  # (1, 4, h/8, w/8)
        _sync(device)
        timings["encode"] = time.perf_counter() - t0

        # 5. Latent mask and its progressive-shrinking schedule
        m_lat = M.downsample_mask(m_pad, self.vae_scale_factor, mask_downsample)
        if not (m_lat > 0).any():
            raise ValueError(
                f"mask: covers no latent cell with mask_downsample={mask_downsample!r}; "
                "use mask_downsample='max' or a larger mask"
            )
        if shrink_iterations == "auto":
            shrink_iterations = M.auto_shrink_iterations(*m_lat.shape[-2:])
        schedule = [s.to(device, dtype) for s in M.shrink_schedule(m_lat, shrink_iterations)]

        # 6-7. Timesteps, the start z = q(z_src, t_start), and the denoising, blending after
        # every step with the background at the same noise level
        timesteps = self.timesteps_for(num_inference_steps, strength, z_src.shape[-2:])
        t0 = time.perf_counter()
        z = self._denoise(
            z_src, schedule, timesteps, models, cond, opts, generator, n, callback, progress
        )
        _sync(device)
        timings["sample"] = time.perf_counter() - t0

        detail = None
        size = self._detail_size(box, (h, w)) if zoom and opts.detail_strength > 0 else None
        if size is not None:
            box_of = (..., slice(box[1], box[3]), slice(box[0], box[2]))

            def detail(region):
                return self._detail(
                    region, x_full[box_of], mask_full[box_of], size, models, opts, generator
                )

        # 8-10. Decode, reconstruct the background, paste into the frame, rank
        frames, order, scores, info = self._finish(
            z, x_full, box, x_pad, m_pad, (h, w), mask_full, prompt, opts, timings, zoom, detail
        )
        timings["total"] = time.perf_counter() - t_total

        # 11. Output
        return BlendedLatentDiffusionOutput(
            images=tensor_to_pil(frames, order),
            scores=scores,
            order=order,
            latents=z[order].cpu(),
            source_latents=z_src.cpu(),
            mask=tensor_to_mask(mask_full),
            latent_mask=m_lat.cpu(),
            mask_schedule=[s.cpu() for s in schedule],
            crop_box=box,
            timings=timings,
            warnings=warnings,
            reconstruction=_reordered(info, order),
            zoomed=zoom,
            detailed=detail is not None,
            mask_info=found.info if found else None,
        )

    def _encode_region(self, x_pad, m_pad):
        """z_src = E(x) of N region images (N, 3, H, W) and, for an inpainting denoiser, the
        channels it takes beside the latents (its mask and E of the masked image; else None)."""
        fam, k = self.adapter, len(x_pad)
        # an inpainting model also sees the masked image (encode_image takes both)
        masked = fam.masked_image(x_pad, m_pad)
        z_both = self.encode_image(x_pad if masked is None else torch.cat([x_pad, masked]))
        z_src = z_both[:k].to(self.dtype)
        m = m_pad.to(self.device)
        return z_src, fam.inpaint_condition(z_both[k:].to(self.dtype), m, z_src.shape[-2:])

    def _denoise(
        self, z_src, schedule, timesteps, models, cond, opts, generator, n, callback, progress
    ):
        """Blended Latent Diffusion's loop (Alg. 1): from z = q(z_src, t_start) (``z_src`` one
        latent, or one per sample), denoise over ``timesteps`` and after every step blend with
        the background at the same noise level under the mask ``schedule``; returns the final
        (n, C, h, w) latents (inference mode: no autograd bookkeeping per op; cloned out of it
        at the end, as decoder fine-tuning backpropagates through D(z); the per-edit work of the
        denoisers' calls kept for the loop, :mod:`blendedit.sharing`)."""
        fam, device, dtype = self.adapter, self.device, self.dtype
        noise = _randn((n, *z_src.shape[1:]), generator, device, dtype)  # (N, 4, h, w)
        z = self.noised(z_src.expand(n, -1, -1, -1), noise, timesteps, 0)
        steps = len(timesteps)
        switch = steps - round(steps * opts.refiner_fraction) if self.refiner else steps
        with torch.inference_mode(), edit_cache():
            for i, t in enumerate(tqdm(timesteps, disable=not progress, desc="edit", leave=False)):
                z_in = fam.model_input(self.scheduler, z, t)
                unet, emb, add = models[int(i >= switch)]
                c = cond if unet is self.unet else None  # the refiner: a text-to-image UNet
                eps = fam.guided(unet, z_in, t, emb, opts.guidance_scale, add, c)
                z = self.scheduler.step(eps, t, z).prev_sample
                if i + 1 < steps:
                    bg_noise = (
                        noise
                        if opts.background_noise == "fixed"
                        else _randn(noise.shape, generator, device, dtype)
                    )
                    z_bg = self.noised(z_src, bg_noise, timesteps, i + 1)
                else:
                    z_bg = z_src  # clean background after the last step
                z = blend(z, z_bg, schedule[M.schedule_index(i, steps, len(schedule))])
                if callback is not None:
                    callback(i, int(t), z)
        return z.clone()

    def _detail(self, region, x_box, m_box, size, models, opts, generator):
        """The detail pass of a zoomed edit: ``region`` (N, 3, h, w), the edit at the native
        size, goes up to ``size`` (:meth:`_detail_size`), the source's pixels outside the mask,
        and through a second blended pass of ``detail_strength`` of the schedule there, the
        exact mask and no shrinking. Returns the (N, 3, *size) region."""
        x_src = _resize(x_box, size)
        m = _resize_mask(m_box, size)
        x = m * _resize(region, size) + (1 - m) * x_src
        z_src, cond = self._encode_region(x, m)
        m_lat = M.downsample_mask(m, self.vae_scale_factor, opts.mask_downsample)
        m_lat = m_lat.to(self.device, self.dtype)
        timesteps = self.timesteps_for(
            opts.num_inference_steps, opts.detail_strength, z_src.shape[-2:]
        )
        n = len(region)
        z = self._denoise(z_src, [m_lat], timesteps, models, cond, opts, generator, n, None, False)
        return self.decode_latents(z).cpu()  # size is a multiple of the VAE's factor

    def _detail_size(self, box, zoomed_hw) -> tuple[int, int] | None:
        """(h, w) of the detail pass over ``box``, zoomed to ``zoomed_hw``: up to
        :data:`DETAIL_SCALE` x the native size, the box's own where smaller; None where that is
        not larger than ``zoomed_hw`` (nothing to gain)."""
        scale = min(DETAIL_SCALE, max(box[2] - box[0], box[3] - box[1]) / self.native_size)
        size = self.zoom_size(box, scale)
        return size if size[0] * size[1] > zoomed_hw[0] * zoomed_hw[1] else None

    def zoom_size(self, box, scale: float = 1.0) -> tuple[int, int]:
        """(h, w) that ``box`` is resized to by ``crop_to_mask="zoom"``: its longer side the
        native size (x ``scale``), the other in proportion, both multiples of the VAE's
        factor."""
        f, n = self.pad_multiple, self.native_size * scale
        bh, bw = box[3] - box[1], box[2] - box[0]
        return tuple(max(f, round(s * n / max(bh, bw) / f) * f) for s in (bh, bw))

    def _region(self, x_full, mask_full, box, zoom: bool = False):
        """The image and mask in ``box``, padded to sizes the VAE takes (reflect / zeros), or
        with ``zoom`` resized to :meth:`zoom_size`; returns (x_pad, m_pad, (h, w)), (h, w) the
        size before padding."""
        x0, y0, x1, y1 = box
        x, m = x_full[..., y0:y1, x0:x1], mask_full[..., y0:y1, x0:x1]
        if zoom:
            size = self.zoom_size(box)
            return _resize(x, size), _resize_mask(m, size), size
        x_pad, hw = M.pad_to_multiple(x, self.pad_multiple, "reflect")
        m_pad, _ = M.pad_to_multiple(m, self.pad_multiple, "constant")
        return x_pad, m_pad, hw

    def _finish(
        self, z, x_full, box, x_pad, m_pad, hw, mask_full, prompt, opts, timings, zoom, detail=None
    ):
        """Steps 8-10 of an edit: decode ``z``, reconstruct the background of the edited region,
        paste it into the frame and rank. With ``zoom`` the region goes through ``detail`` (the
        detail pass, if any) and is resized back to ``box`` and, but for background="none",
        keeps the source's pixels outside the mask.
        Returns (frames, order, scores, decoder info)."""
        (h, w), (x0, y0, x1, y1), n = hw, box, z.shape[0]
        _sync(self.device)
        t0 = time.perf_counter()
        edit = self.decode_latents(z).cpu()  # (N, 3, H_pad, W_pad)
        timings["decode"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        if opts.background == "decoder":  # on the padded frame the latents cover
            margin = opts.decoder_crop_margin
            region, info = B.reconstruct(
                "decoder",
                edit,
                x_pad,
                (m_pad > 0).float(),
                feather=opts.feather,
                vae=self.vae,
                latents=z,
                decoder_options=dict(
                    steps=opts.decoder_steps,
                    lr=opts.decoder_lr,
                    lam=opts.decoder_lambda,
                    mode=opts.decoder_mode,
                    layers=opts.decoder_layers,
                    crop_margin=None if margin < 0 else margin,
                ),
            )
            region = region[..., :h, :w]
        else:
            crop = (..., slice(0, h), slice(0, w))
            region, info = B.reconstruct(
                opts.background, edit[crop], x_pad[crop], m_pad[crop], feather=opts.feather
            )
        if zoom:
            if detail is not None:
                t1 = time.perf_counter()
                region = detail(region)
                timings["detail"] = time.perf_counter() - t1
            region = _resize(region, (y1 - y0, x1 - x0))
            if opts.background != "none":
                box_of = (..., slice(y0, y1), slice(x0, x1))
                region = B.keep_outside(region, x_full[box_of], mask_full[box_of])
        frames = x_full.expand(n, -1, -1, -1).clone()
        # what is saved is what gets ranked: the region rounded to 8 bits (the rest of the
        # frame is the source's 8-bit values already)
        frames[..., y0:y1, x0:x1] = (region * 255).round() / 255
        _sync(self.device)
        timings["background"] = time.perf_counter() - t0 - timings.get("detail", 0.0)

        t0 = time.perf_counter()
        scores, order = None, list(range(n))
        if self.ranker is not None and prompt is not None:
            s = self.ranker.score(frames, prompt, mask_full, opts.rank_region)
            order = torch.argsort(s, descending=True, stable=True).tolist()
            scores = [float(s[k]) for k in order]
        timings["rank"] = time.perf_counter() - t0
        return frames, order, scores, info

    @torch.no_grad()
    def reconstruct_background(
        self,
        output: BlendedLatentDiffusionOutput,
        image,
        prompt: str | None = None,
        **options,
    ) -> BlendedLatentDiffusionOutput:
        """Redo the background step of an earlier edit without sampling again (the public
        code's separate reconstruction step): decode ``output.latents`` and reconstruct with
        the given options (``background``, ``feather``, ``decoder_*``; the others are ignored).
        ``image`` is the edit's source image. The order stays ``output``'s; with ``prompt`` and a
        ranker the new images are scored and ranked again."""
        t_total = time.perf_counter()
        unknown = sorted(set(options) - set(BACKGROUND_OPTIONS))
        if unknown:
            raise ValueError(f"options: not background options: {', '.join(unknown)}")
        opts = LatentEditOptions(**options)
        if output.detailed:
            raise ValueError(
                "reconstruct: this edit ran a detail pass (detail_strength), whose results its "
                "latents do not hold; edit again with the background options instead"
            )
        image = _as_pil(image, "image")
        if image.size != output.mask.size:
            raise ValueError(
                f"image: size {image.width}x{image.height} differs from the edit's mask "
                f"{output.mask.width}x{output.mask.height}; pass the edit's source image"
            )
        self.check_inputs(prompt or "x", image, output.mask, opts, None, None)
        x_full = pil_to_tensor(image)
        mask_full = mask_to_tensor(output.mask)
        box = output.crop_box
        x_pad, m_pad, (h, w) = self._region(x_full, mask_full, box, output.zoomed)
        timings: dict[str, float] = {}
        z = output.latents.to(self.device, self.dtype)
        frames, order, scores, info = self._finish(
            z, x_full, box, x_pad, m_pad, (h, w), mask_full, prompt, opts, timings, output.zoomed
        )
        timings["total"] = time.perf_counter() - t_total
        return replace(
            output,
            images=tensor_to_pil(frames, order),
            scores=scores,
            order=[output.order[k] for k in order],
            latents=z[order].cpu(),
            timings=timings,
            warnings=list(output.warnings),
            reconstruction=_reordered(info, order),
        )


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Images (N, C, H, W) in [0, 1] to ``size`` (h, w): bicubic, antialiased when shrunk."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def _resize_mask(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A mask to ``size``: exact pixel centres when magnified, coverage when shrunk (no spread
    into latent cells the mask does not reach)."""
    mode = "nearest-exact" if size[0] >= m.shape[-2] else "area"
    return F.interpolate(m, size, mode=mode)


def _reordered(info, order):
    """A decoder tuning's per-sample losses in ranked order (None passes through)."""
    if info is not None:
        info.losses = [info.losses[k] for k in order]
    return info
