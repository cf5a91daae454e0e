"""One adapter per model family and inpainting kind (DESIGN.md, "Model families").

Everything that differs between Stable Diffusion 1.x/2.x, SDXL, SD3, Flux and their inpainting
checkpoints lives here: the text conditioning, the denoiser call, latent packing, the multiple
that edited regions are padded to (the VAE's factor times the transformer's patch side), the
noise / sigma schedule, the inpainting conditioning and diffusers' matching baseline pipelines.
The sampling loop in :mod:`blendedit.latent` asks its adapter and never tests which family it
has, so a rule written here holds for every family that inherits it.

Inpainting kinds (read from the denoiser's config, as the weights fix them):
- ``unet9``: an SD / SDXL UNet with 4 + 1 + 4 input channels; diffusers' layout
  ``cat([z_t, mask, masked_image_latents], dim=1)``, the mask resized to the latent grid by nearest
  neighbour and the masked image ``x * (mask < 0.5)``.
- ``fill``: a Flux Fill transformer (384 input features for 16 latent channels): beside the packed
  latents, the packed masked-image latents and the pixel mask folded into f x f channels per
  latent cell (f the VAE's factor), packed; the masked image ``x * (1 - mask)``.
Blended Latent Diffusion's blend still runs after every step on top of either (the model sees the
context; the blend keeps it exact).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import checks
from . import conditioning as C
from .denoisers import _text_ids, image_ids, is_guidance_distilled, pack, unpack
from .sharing import twin_rows
from .sources import FAMILY_NAMES

INPAINT_NAMES = {"unet9": "inpainting UNet (9 input channels)", "fill": "Fill transformer"}


def inpaint_kind(family: str, denoiser) -> str | None:
    """The inpainting kind of ``denoiser`` (None for a text-to-image one); a ``ValueError``
    naming the channels when they fit neither."""
    cfg = denoiser.config
    if family == "flux":
        latent = getattr(cfg, "out_channels", None) or cfg.in_channels
        return None if cfg.in_channels == latent else "fill"
    if family == "sd3":
        return None
    latent = cfg.out_channels
    if cfg.in_channels == latent:
        return None
    if cfg.in_channels == 2 * latent + 1:
        return "unet9"
    raise ValueError(
        f"model: its UNet takes {cfg.in_channels} input channels for {latent} latent channels; "
        f"blendedit runs text-to-image UNets ({latent}) and inpainting UNets ({2 * latent + 1}: "
        "latents, mask, masked-image latents)"
    )


class Family:
    """Stable Diffusion 1.x/2.x: epsilon or v prediction at the scheduler's discrete levels."""

    name = "sd"
    flow = False  # rectified flow: z_t = (1 - sigma) z + sigma noise, velocity prediction
    patch = 1  # latent cells per side of one transformer token
    vae_upcast = False  # float16 overflows in this family's VAE: keep it float32
    baselines = tuple(f"StableDiffusion{k}Pipeline" for k in ("Inpaint", "", "Img2Img"))

    distilled = False  # the guidance scale is the model's input (one pass, no CFG rows)

    def __init__(self, denoiser):
        self.config = denoiser.config
        self.inpaint = inpaint_kind(self.name, denoiser)
        if self.inpaint:  # an inpainting denoiser runs in the inpainting pipeline only
            self.baselines = (self.baselines[0], None, None)

    @property
    def label(self) -> str:
        """'a Stable Diffusion 1.x/2.x inpainting UNet (9 input channels)', for messages."""
        return FAMILY_NAMES[self.name] + (f" {INPAINT_NAMES[self.inpaint]}" if self.inpaint else "")

    def pad_multiple(self, vae_factor: int) -> int:
        """The edited region's sides are padded to the VAE's factor x the patch side."""
        return vae_factor * self.patch

    def check_scheduler(self, name: str) -> bool:
        """Whether the pipeline keeps its own sampler (flow models); raises for other names."""
        return False

    def largest_side(self, vae_factor: int) -> int | None:
        """The longest side in pixels that the denoiser takes (None: no limit)."""
        return None

    # -- text ---------------------------------------------------------------------------

    def encode_prompt(self, pipe, prompt: str, negative: str, n: int, cfg: bool):
        """(embeds, pooled, truncated); rows [uncond x n; cond x n] with ``cfg``."""
        encoders = [e for e in (pipe.text_encoder, pipe.text_encoder_2) if e is not None]
        tokenizers = [pipe.tokenizer, pipe.tokenizer_2][: len(encoders)]
        zeros = pipe.force_zeros_for_empty_prompt
        return C.encode_prompt(encoders, tokenizers, prompt, negative, n, cfg, pipe.device, zeros)

    def added(self, pooled, geometry) -> dict | None:
        """The denoiser's extra inputs besides the text states (SDXL's ``added_cond_kwargs``)."""
        return C.added_conditioning(pooled, *geometry)

    # -- schedule -----------------------------------------------------------------------

    def timestep_kwargs(self, cfg, num_inference_steps: int, latent_hw) -> dict:
        return {}

    def model_input(self, scheduler, z, t):
        return scheduler.scale_model_input(z, t)

    def noised(self, scheduler, z, noise, timesteps, k: int) -> torch.Tensor:
        """``z`` at the noise level of ``timesteps[k]`` (the scheduler's forward process)."""
        return scheduler.add_noise(z, noise, timesteps[k : k + 1])

    def target(self, scheduler, z, noise, t) -> torch.Tensor:
        """What the denoiser should predict for ``z`` noised with ``noise`` at ``t``: the noise,
        or for a v-prediction model sqrt(a) noise - sqrt(1 - a) z."""
        if scheduler.config.get("prediction_type", "epsilon") != "v_prediction":
            return noise
        a = scheduler.alphas_cumprod[int(t)].to(z.device, z.dtype)
        return a.sqrt() * noise - (1 - a).sqrt() * z

    # -- inpainting checkpoints ----------------------------------------------------------

    def masked_image(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor | None:
        """The image an inpainting denoiser sees, masked pixels grey (0 in [-1, 1]), as diffusers
        makes it (the mask binarised at 0.5); None for a text-to-image denoiser. ``x``
        (1, 3, H, W) in [0, 1], ``m`` the pixel mask (1, 1, H, W), 1 = edit."""
        if self.inpaint is None:
            return None
        hard = (m >= 0.5).to(x.dtype)
        return x * (1 - hard) + 0.5 * hard

    def inpaint_condition(self, masked_latents: torch.Tensor, m: torch.Tensor, latent_hw):
        """The channels an inpainting denoiser takes beside the latents, (1, C, h, w) on the
        latent grid: the mask resized by nearest neighbour and ``masked_latents`` (E of
        :meth:`masked_image`); None for a text-to-image denoiser."""
        if self.inpaint is None:
            return None
        hard = (m >= 0.5).to(masked_latents.dtype)
        small = F.interpolate(hard, size=tuple(latent_hw))  # nearest, as diffusers
        return torch.cat([small.expand(len(masked_latents), -1, -1, -1), masked_latents], dim=1)

    # -- the denoiser ---------------------------------------------------------------------

    def call(self, model, x, t, embeds, added: dict | None, cond, guidance_scale: float):
        """One denoiser pass on ``x`` (B, C, h, w); ``cond`` the inpainting channels."""
        if cond is not None:
            x = torch.cat([x, cond_rows(cond, len(x))], dim=1)
        kw = {"added_cond_kwargs": added} if added else {}
        return model(x, t, encoder_hidden_states=embeds, return_dict=False, **kw)[0].contiguous()

    def guided(self, model, z, t, embeds, guidance_scale: float, added=None, cond=None):
        """Classifier-free guidance, eps_u + s (eps_c - eps_u), when ``embeds`` holds
        [uncond; cond] rows (2N for N latents); one pass otherwise (guidance-distilled Flux)."""
        if guidance_scale <= 1.0 or len(embeds) == len(z):
            return self.call(model, z, t, embeds, added, cond, guidance_scale)
        with twin_rows():  # the two halves agree up to the text (blendedit.sharing)
            out = self.call(model, torch.cat([z, z]), t, embeds, added, cond, guidance_scale)
        eps_u, eps_c = out.chunk(2)
        return eps_u + guidance_scale * (eps_c - eps_u)

    def baseline_parts(self, p) -> dict:
        """Keyword arguments of diffusers' pipelines over ``p``'s components: those every
        family has, and the family's own (:meth:`own_parts`)."""
        common = dict(vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer)
        return common | dict(scheduler=p.scheduler) | self.own_parts(p)

    def own_parts(self, p) -> dict:
        return dict(
            unet=p.unet, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )


class SDXL(Family):
    """SDXL: two text encoders, the pooled text and micro-conditioning; its VAE upcast."""

    name = "sdxl"
    vae_upcast = True
    baselines = tuple(f"StableDiffusionXL{k}Pipeline" for k in ("Inpaint", "", "Img2Img"))

    def own_parts(self, p) -> dict:
        zeros = p.force_zeros_for_empty_prompt
        return dict(
            unet=p.unet,
            text_encoder_2=p.text_encoder_2,
            tokenizer_2=p.tokenizer_2,
            force_zeros_for_empty_prompt=zeros,
        )


class SD3(Family):
    """Stable Diffusion 3: rectified flow, three text encoders, 2x2 patches."""

    name = "sd3"
    flow = True
    patch = 2
    baselines = tuple(f"StableDiffusion3{k}Pipeline" for k in ("Inpaint", "", "Img2Img"))

    def check_scheduler(self, name: str) -> bool:
        checks.check_flow_scheduler(name, self.name)
        return True

    def largest_side(self, vae_factor: int) -> int | None:
        """SD3's positional embeddings are a table of ``pos_embed_max_size`` patches a side."""
        n = getattr(self.config, "pos_embed_max_size", None)
        return n * self.patch * vae_factor if n else None

    def encode_prompt(self, pipe, prompt, negative, n, cfg):
        encoders = [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]
        tokenizers = [pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3]
        joint = pipe.unet.config.joint_attention_dim
        return C.encode_prompt_sd3(
            encoders, tokenizers, prompt, negative, n, cfg, pipe.device, joint
        )

    def added(self, pooled, geometry) -> dict:
        return {"pooled_projections": pooled}

    def timestep_kwargs(self, cfg, num_inference_steps, latent_hw) -> dict:
        """Resolution-dependent shifting takes its shift from the number of patches."""
        if not getattr(cfg, "use_dynamic_shifting", False) or latent_hw is None:
            return {}
        seq = (latent_hw[0] // 2) * (latent_hw[1] // 2)
        slope = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
        return {"mu": cfg.base_shift + slope * (seq - cfg.base_image_seq_len)}

    def model_input(self, scheduler, z, t):
        return z

    def target(self, scheduler, z, noise, t) -> torch.Tensor:
        """The velocity noise - z."""
        return noise - z

    def noised(self, scheduler, z, noise, timesteps, k: int) -> torch.Tensor:
        """(1 - sigma) z + sigma noise at the sampler's exact sigma of ``timesteps[k]``."""
        sigma = scheduler.sigmas[scheduler.begin_index + k].to(z.device, z.dtype)
        return (1 - sigma) * z + sigma * noise

    def call(self, model, x, t, embeds, added, cond, guidance_scale):
        return model(
            hidden_states=x,
            timestep=t.expand(len(x)),
            encoder_hidden_states=embeds,
            pooled_projections=added["pooled_projections"],
            return_dict=False,
        )[0]

    def own_parts(self, p) -> dict:
        flux = dict(transformer=p.unet, text_encoder_2=p.text_encoder_2, tokenizer_2=p.tokenizer_2)
        return flux | dict(text_encoder_3=p.text_encoder_3, tokenizer_3=p.tokenizer_3)


class Flux(SD3):
    """Flux: T5 and CLIP's pooled text, latents packed in 2x2 patches with position ids, the
    timestep as a fraction and, when guidance-distilled, the guidance scale as an input."""

    name = "flux"
    baselines = tuple(f"Flux{k}Pipeline" for k in ("Inpaint", "", "Img2Img"))

    def __init__(self, denoiser):
        super().__init__(denoiser)
        self.distilled = is_guidance_distilled(denoiser)  # FLUX.1-dev; schnell takes CFG
        self._cond_tokens: tuple | None = None  # (cond, rows, its packed tokens): see call
        if self.inpaint == "fill":  # diffusers' FluxFillPipeline is its inpainting pipeline
            self.baselines = ("FluxFillPipeline", None, None)

    def encode_prompt(self, pipe, prompt, negative, n, cfg):
        return C.encode_prompt_flux(
            pipe.text_encoder,
            pipe.tokenizer,
            pipe.text_encoder_2,
            pipe.tokenizer_2,
            prompt,
            negative,
            n,
            cfg,
            pipe.device,
        )

    def timestep_kwargs(self, cfg, num_inference_steps, latent_hw) -> dict:
        """As FluxPipeline: sigmas 1 ... 1/n before the shift."""
        sigmas = [1 - k / num_inference_steps for k in range(num_inference_steps)]
        return super().timestep_kwargs(cfg, num_inference_steps, latent_hw) | {"sigmas": sigmas}

    def inpaint_condition(self, masked_latents, m, latent_hw):
        """Flux Fill: ``masked_latents`` (16 channels) and the pixel mask folded into f x f
        channels per latent cell (f the VAE's factor), on the latent grid; packing them with the
        latents gives FluxFillPipeline's [latents, masked latents, mask] features."""
        if self.inpaint is None:
            return None
        hard = (m >= 0.5).to(masked_latents.dtype)
        h, w = latent_hw
        f = hard.shape[-1] // w  # (1, 1, h f, w f) -> (1, f f, h, w): FluxFillPipeline's fold
        folded = hard[:, 0].view(1, h, f, w, f).permute(0, 2, 4, 1, 3).reshape(1, f * f, h, w)
        return torch.cat([masked_latents, folded.expand(len(masked_latents), -1, -1, -1)], dim=1)

    def call(self, model, x, t, embeds, added, cond, guidance_scale):
        b, c, h, w = x.shape
        g = None
        if self.distilled:
            g = torch.full((b,), guidance_scale, device=x.device, dtype=x.dtype)
        tokens = pack(x)
        if cond is not None:  # the same at every step: packed once per cond and batch
            memo = self._cond_tokens
            if memo is None or memo[0] is not cond or memo[1] != b:
                memo = self._cond_tokens = (cond, b, pack(cond_rows(cond, b)))
            tokens = torch.cat([tokens, memo[2]], dim=-1)
        out = model(
            hidden_states=tokens,
            timestep=(t / 1000).expand(b).to(x.dtype),
            guidance=g,
            pooled_projections=added["pooled_projections"],
            encoder_hidden_states=embeds,
            txt_ids=_text_ids(embeds.shape[1], x.device, x.dtype),
            img_ids=image_ids(h, w, x.device, x.dtype),
            return_dict=False,
        )[0]
        return unpack(out, h, w)

    def own_parts(self, p) -> dict:
        return dict(transformer=p.unet, text_encoder_2=p.text_encoder_2, tokenizer_2=p.tokenizer_2)


def cond_rows(cond: torch.Tensor, b: int) -> torch.Tensor:
    """The inpainting channels for a batch of ``b`` latents: ``cond`` one row for all, or one
    per latent (a detail pass's samples), repeated for the [uncond; cond] halves."""
    if len(cond) == 1:
        return cond.expand(b, -1, -1, -1)
    return cond.repeat(b // len(cond), 1, 1, 1)


FAMILIES = {cls.name: cls for cls in (Family, SDXL, SD3, Flux)}


def adapter(family: str, denoiser) -> Family:
    """The adapter of ``family`` ("sd", "sdxl", "sd3", "flux") for this ``denoiser``."""
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {tuple(FAMILIES)}, got {family!r}")
    return FAMILIES[family](denoiser)
