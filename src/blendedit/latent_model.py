"""The model half of a Blended Latent Diffusion pipeline: its components and what it does with
them one step at a time (load, move, encode the prompt and the image, decode, the schedule and
the forward noising). Family differences are asked of the family adapter
(:mod:`blendedit.families`); the edit itself is :mod:`blendedit.latent`'s."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from os import PathLike
from typing import Any

import torch

from . import background as B
from . import sharing
from .families import Family, adapter
from .options import DEFAULT_GUIDANCE_SCALE, SCHEDULERS
from .ranking import ClipRanker, builtin_ranker

Generator = torch.Generator | list | None
#: a region with more pixels than this many times the native area is encoded and decoded by the
#: VAE in overlapping tiles of the native size (diffusers' tiling): its memory stays that of a
#: tile's (a 2048 px box on SD 1.5 needs some 13 GB untiled); a zoomed edit never needs it
VAE_TILE_AREA = 4


@contextmanager
def _tiled(vae, tile: int, factor: int, on: bool):
    """``vae`` with diffusers' tiling on in ``tile`` px tiles (``tile / factor`` latent cells)
    while ``on``; the VAE's own settings come back after."""
    keep = (vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size)
    if on:
        vae.use_tiling = True
        vae.tile_sample_min_size = tile
        vae.tile_latent_min_size = tile // factor
    try:
        yield vae
    finally:
        vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size = keep


def _randn(shape, generator: Generator, device, dtype) -> torch.Tensor:
    """Gaussian noise (N, ...) drawn per sample from its own generator when a list is given, so
    sample i with generator i is reproducible on its own."""
    if isinstance(generator, list):
        return torch.cat(
            [
                torch.randn((1, *shape[1:]), generator=g, device=g.device).to(device, dtype)
                for g in generator
            ]
        )
    gdev = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gdev).to(device, dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """A copy of (N, C, H, W) in channels-last memory layout with its canonical strides (the
    same values): the CPU's convolutions run faster on it, and a copy (not ``contiguous``, which
    keeps a view that already counts as channels-last, e.g. a permuted HxWxC array with another
    batch stride) makes the result independent of how the input was laid out."""
    return x.clone(memory_format=torch.channels_last)


class OnUNet:
    """A pipeline's device and dtype: those of its UNet."""

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype


class LatentModel(OnUNet):
    """A latent diffusion model's components (diffusers' names) behind one interface."""

    def __init__(
        self,
        unet,
        vae,
        text_encoder,
        tokenizer,
        scheduler,
        ranker: ClipRanker | None = None,
        text_encoder_2=None,
        tokenizer_2=None,
        force_zeros_for_empty_prompt: bool = False,
        text_encoder_3=None,
        tokenizer_3=None,
        family: str | None = None,
    ):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler = scheduler
        self.ranker = ranker
        # SDXL: the second text encoder, and an empty negative prompt as zeros
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.text_encoder_3, self.tokenizer_3 = text_encoder_3, tokenizer_3  # SD3's T5 (optional)
        self.family = family or ("sdxl" if text_encoder_2 is not None else "sd")
        self._adapter: tuple[Any, Family] | None = None  # (the denoiser it was built for, it)
        self.default_guidance_scale = DEFAULT_GUIDANCE_SCALE  # from_pretrained: the model's own
        self.refiner: dict | None = None  # SDXL: models.load_refiner's parts
        self.loras: list[dict] = []  # load_lora_weights' records, in loading order
        self.embeddings: list[dict] = []  # load_textual_inversion's records
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self._layout()

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        spec: str,
        *,
        scheduler: str = "ddim",
        ranker: str | ClipRanker | None = None,
        torch_dtype=None,
        local_files_only: bool | None = None,
        config: str | None = None,
        vae: str | None = None,
        refiner: str | None = None,
        loras=(),
        embeddings=(),
    ) -> LatentModel:
        """Load from a built-in name, a diffusers folder, a single checkpoint file or a hub id.

        ``ranker``: a CLIP folder/hub id or a :class:`ClipRanker` for best-first ranking; built-in
        models bring their own. ``vae``: another VAE (an ``AutoencoderKL`` folder or hub id, e.g.
        an fp16-safe one for SDXL) in place of the model's. ``refiner``: an SDXL refiner (folder
        or hub id) whose UNet runs the last ``refiner_fraction`` of the steps. ``loras``: LoRA
        files to fuse in, each ``"FILE[:SCALE]"`` or ``(file, scale)`` (see
        :meth:`load_lora_weights`); ``embeddings``: textual inversions, each ``"FILE[:TOKEN]"`` or
        ``(file, token)`` (:meth:`load_textual_inversion`). See
        :func:`blendedit.models.load_sd_components`.
        """
        from .lora import parse_embedding
        from .models import load_refiner, load_sd_components, load_vae

        c = load_sd_components(
            spec, torch_dtype=torch_dtype, local_files_only=local_files_only, config=config
        )
        if vae is not None:
            c["vae"] = load_vae(vae, c["unet"], c["vae"], torch_dtype, local_files_only)
        if isinstance(ranker, str):
            ranker = ClipRanker.from_pretrained(ranker, local_files_only=local_files_only)
        elif ranker is None and "ranker" in c:
            ranker = builtin_ranker(c["ranker"], c.get("ranker_tokenizer"))
        keys = ("text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3", "family")
        extra = {k: c[k] for k in keys if k in c}  # SDXL, SD3, Flux parts
        pipe = cls(
            c["unet"],
            c["vae"],
            c["text_encoder"],
            c["tokenizer"],
            c["scheduler"],
            ranker,
            force_zeros_for_empty_prompt=c.get("force_zeros_for_empty_prompt", False),
            **extra,
        )
        if refiner is not None:
            family = pipe.family
            pipe.refiner = load_refiner(refiner, c["unet"], family, torch_dtype, local_files_only)
            pipe._layout()
        pipe.set_scheduler(scheduler)
        pipe.default_guidance_scale = c.get("guidance_scale", DEFAULT_GUIDANCE_SCALE)
        for emb in embeddings:  # "FILE[:TOKEN]" or (file, token)
            pipe.load_textual_inversion(*(parse_embedding(emb) if isinstance(emb, str) else emb))
        for lora in loras:
            path, scale = (lora, None) if isinstance(lora, (str, PathLike)) else lora
            pipe.load_lora_weights(path, scale)
        return pipe

    def load_lora_weights(self, path, scale: float | None = 1.0, *, fuse: bool = True) -> dict:
        """Load a LoRA (as diffusers names it): a file in diffusers' layout or the A1111 /
        kohya-ss one, or a hub repository in the local cache, at ``scale`` (``path`` may be
        ``"FILE:SCALE"`` when ``scale`` is None). Several stack. ``fuse`` (the default) adds it
        into the weights, so a step costs what it does without it; ``fuse=False`` keeps peft's
        adapter layers. Returns its record (also in :attr:`loras`: file name, SHA-256, scale).
        A file that is not a LoRA for this model raises ``ValueError`` and leaves it unchanged."""
        from .lora import LoraSpec, load_lora, parse_lora

        if scale is None:
            spec = parse_lora(str(path))
        elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise ValueError(f"lora: scale {scale!r} of {str(path)!r} is not a number")
        else:
            spec = LoraSpec(str(path), float(scale))
        return load_lora(self, spec, fuse=fuse)

    def load_textual_inversion(self, path, token: str | None = None) -> dict:
        """Load a textual-inversion embedding (as diffusers names it; SD 1.x/2.x and SDXL):
        diffusers' ``learned_embeds`` or an A1111 ``.pt`` / ``.safetensors`` file, whose
        ``token`` (default: the file's own, or its name) then stands for it in prompts."""
        from .lora import load_embedding

        return load_embedding(self, str(path), token)

    def mask_from_text(self, image, text: str, progress: bool = False, **options):
        """The region of ``image`` (PIL image, array or tensor) that ``text`` names, found with
        this model's own predictions (:mod:`blendedit.text_mask`); returns a ``TextMask``
        (``.mask``: PIL "L", 255 = the region; ``.info``). ``options``: the fields of
        :class:`~blendedit.text_mask.TextMaskOptions` (references, grow, ...). A text that
        names nothing raises :class:`~blendedit.text_mask.NothingFoundError` (a ValueError).

        >>> found = pipe.mask_from_text(image, "the blue square")
        >>> out = pipe("a red circle", image, found.mask)
        """
        from .checks import _as_pil
        from .text_mask import TextMaskOptions, mask_from_text

        opts = TextMaskOptions(**options)
        return mask_from_text(self, _as_pil(image, "image"), text, opts, progress)

    def guidance_or_default(self, guidance_scale: float | None) -> float:
        """``guidance_scale``, or when it is None the model's own default
        (:attr:`default_guidance_scale`: its folder's ``blendedit.json``, else 7.5)."""
        return self.default_guidance_scale if guidance_scale is None else guidance_scale

    def set_scheduler(self, name: str) -> None:
        """Swap the sampler, keeping the model's noise schedule: ddim, dpm++ or euler."""
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

        if self.adapter.check_scheduler(name):  # flow models keep their own (Euler) sampler
            return
        cfg = self.scheduler.config
        if name == "ddim":
            self.scheduler = DDIMScheduler.from_config(cfg)
        elif name == "dpm++":
            self.scheduler = DPMSolverMultistepScheduler.from_config(
                cfg, algorithm_type="dpmsolver++"
            )
        elif name == "euler":
            self.scheduler = EulerDiscreteScheduler.from_config(cfg)
        else:
            raise ValueError(f"scheduler: expected one of {SCHEDULERS}, got {name!r}")

    def to(self, device=None, dtype=None) -> LatentModel:
        upcast = self.adapter.vae_upcast and getattr(self.vae.config, "force_upcast", False)
        extra = (
            [self.refiner[k] for k in ("unet", "text_encoder", "text_encoder_2")]
            if (self.refiner)
            else []
        )
        mods = (self.unet, self.vae, self.text_encoder, self.text_encoder_2, self.text_encoder_3)
        for m in (*mods, *extra):
            if m is None:
                continue
            want = torch.float32 if upcast and m is self.vae and dtype == torch.float16 else dtype
            same = want is None or next(m.parameters()).dtype == want  # SDXL's VAE: float32,
            m.to(device=device) if same else m.to(device=device, dtype=want)  # float16 overflows
        if self.ranker is not None:
            self.ranker.to(device=device)
        self._layout()
        return self

    def _layout(self) -> None:
        """The UNets' and the VAE's weights (and so their activations) in channels-last layout
        on the CPU, where their convolutions run faster on average: 0-5 % a UNet call, varying
        from run to run, and slower beyond noise in none of the shipped, SD- and SDXL-shaped
        models measured; the VAE, whose input was already channels-last, 0-5 % a pass
        (benchmarks/cpu_layout.py; docs/benchmarks.md, "The CPU layout"). On another device the
        default layout, as loaded. Transformers (SD3, Flux) are left as they are. Also installs
        the work the denoisers' calls share (:mod:`blendedit.sharing`)."""
        unets = [self.unet, self.refiner["unet"] if self.refiner else None]
        for u in unets:
            if u is not None:
                sharing.install(u)
        convs = [getattr(u, "conv_in", None) for u in unets]
        convs.append(getattr(getattr(self.vae, "encoder", None), "conv_in", None))
        for model, conv in zip([*unets, self.vae], convs):
            if not isinstance(conv, torch.nn.Conv2d):
                continue
            cpu = conv.weight.device.type == "cpu"
            fmt = torch.channels_last if cpu else torch.contiguous_format
            if not conv.weight.is_contiguous(memory_format=fmt):
                model.to(memory_format=fmt)

    @property
    def native_size(self) -> int:
        """The pixel size the UNet was trained at (512 for SD 1.x)."""
        size = getattr(self.unet.config, "sample_size", None) or 128  # Flux: 1024 px
        return int(size) * self.vae_scale_factor

    # -- building blocks ------------------------------------------------------------------

    @property
    def adapter(self) -> Family:
        """The family adapter (:mod:`blendedit.families`) of this pipeline's denoiser."""
        if self._adapter is None or self._adapter[0] is not self.unet:
            self._adapter = (self.unet, adapter(self.family, self.unet))
        return self._adapter[1]

    @property
    def is_flow(self) -> bool:
        """A rectified-flow model (SD3): velocity prediction, z_t = (1 - sigma) z + sigma noise."""
        return self.adapter.flow

    @property
    def inpaint(self) -> str | None:
        """The denoiser's inpainting kind: "unet9", "fill" or None (text-to-image)."""
        return self.adapter.inpaint

    @property
    def distilled_guidance(self) -> bool:
        """Flux dev: the guidance scale is the model's input, no classifier-free guidance."""
        return self.adapter.distilled

    @property
    def pad_multiple(self) -> int:
        """What the edited region's sides are padded to: the VAE's factor x the patch side
        (twice the factor for SD3 and Flux, whose latents go in 2x2 patches)."""
        return self.adapter.pad_multiple(self.vae_scale_factor)

    @torch.no_grad()
    def encode_prompt(self, prompt: str, negative_prompt: str, n: int, cfg: bool):
        """Text embeddings: [uncond x n; cond x n] with guidance, else cond x n.

        Returns (embeds, pooled, truncated): ``pooled`` the same rows of SDXL's pooled
        embedding (None for SD), ``truncated`` whether the prompt lost tokens."""
        if self.embeddings:  # a multi-vector embedding's token becomes all its tokens
            from .lora import expand_prompt

            prompt, negative_prompt = (expand_prompt(self, p) for p in (prompt, negative_prompt))
        return self.adapter.encode_prompt(self, prompt, negative_prompt, n, cfg)

    @torch.no_grad()
    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """z = E(x): posterior mean x scaling factor. ``x`` (N, 3, H, W) in [0, 1], encoded one
        image at a time in channels-last layout (on the CPU both measured faster than a batch
        in the default layout: 0.15 s against 0.24 s for two 256 px images, benchmarks/
        speed_inpaint.py's SD-shaped VAE)."""
        x = (2 * x - 1).to(self.device, self.vae.dtype)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0  # SD3: (E(x) - shift) * s
        with self._vae_for(x.shape[-2] * x.shape[-1]) as vae:
            z = [vae.encode(_channels_last(x[i : i + 1])).latent_dist.mode() for i in range(len(x))]
        return (torch.cat(z).contiguous() - shift) * self.vae.config.scaling_factor

    def _vae_for(self, pixels: int):
        """The VAE, tiled in native-size tiles for a region of more than :data:`VAE_TILE_AREA`
        x the native area (where the VAE has diffusers' tiling)."""
        if hasattr(self.vae, "tile_sample_min_size"):  # diffusers' AutoencoderKL
            big = pixels > VAE_TILE_AREA * self.native_size**2
            return _tiled(self.vae, self.native_size, self.vae_scale_factor, big)
        return nullcontext(self.vae)

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """D(z) in [0, 1]; (N, 4, h, w) -> (N, 3, 8h, 8w), float32."""
        z = _channels_last(B.unscale_latents(self.vae, z.to(self.vae.dtype)))
        with self._vae_for(z.shape[-2] * z.shape[-1] * self.vae_scale_factor**2) as vae:
            x = vae.decode(z).sample.contiguous()
        return ((x.float() + 1) / 2).clamp(0, 1)

    def timesteps_for(
        self, num_inference_steps: int, strength: float, latent_hw=None
    ) -> torch.Tensor:
        """The last ``strength`` of the schedule (as diffusers' img2img), begin index set. A
        flow-matching schedule with resolution-dependent shifting takes its shift from the
        number of 2x2 latent patches (``latent_hw``)."""
        kw = self.adapter.timestep_kwargs(self.scheduler.config, num_inference_steps, latent_hw)
        self.scheduler.set_timesteps(num_inference_steps, device=self.device, **kw)
        n_run = min(int(num_inference_steps * strength), num_inference_steps)
        t_start = num_inference_steps - n_run
        order = getattr(self.scheduler, "order", 1)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(t_start * order)
        return self.scheduler.timesteps[t_start * order :]

    def noised(self, z, noise, timesteps, k: int) -> torch.Tensor:
        """``z`` at the noise level of ``timesteps[k]``: the scheduler's forward process, and
        for a flow-matching model at its exact sigma, (1 - sigma) z + sigma noise."""
        return self.adapter.noised(self.scheduler, z, noise, timesteps, k)
