"""Randomly initialised Stable-Diffusion-shaped pipelines built from small configs.

They are the same diffusers/transformers classes as real Stable Diffusion, so every code path
(tokenizer, text encoder, UNet, VAE, scheduler, CLIP ranking) runs offline in tests and
benchmarks. Their images are noise: they exist to test mechanics and measure speed, not quality.

Presets:
- ``tiny``: for tests; 64 px native, latents 8x8x4, well under a second per edit on a CPU.
- ``sd-shaped``: Stable Diffusion 1.x's block layout (attention at the three top levels, two
  layers per block) with channels divided by ``width_div``; for speed benchmarks, where the
  proportions between text encoder, UNet and VAE should resemble the real model's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel

from .tokenizer import build_clip_tokenizer

WORDS = (
    "a an the and on of with in big small red orange yellow green blue purple white black "
    "circle square triangle star cross cat dog hat ball car tree house flower background "
    "striped checkered plain gradient noisy cream gray light charcoal tan slate photo"
).split()

SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


#: FLUX.1's flow-matching Euler scheduler: resolution-dependent shifting of the sigmas.
FLUX_SCHEDULER = dict(
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


def _groups(channels) -> int:
    """The largest GroupNorm group count <= 32 that divides every channel count."""
    return max(g for g in range(1, 33) if all(c % g == 0 for c in channels))


def _unet_config(preset: str, width_div: int, sample_size: int) -> dict:
    if preset == "tiny":
        return dict(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(16, 32),
            norm_num_groups=8,
            cross_attention_dim=32,
            attention_head_dim=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        )
    if preset == "sd-shaped":
        ch = [c // width_div for c in (320, 640, 1280, 1280)]
        return dict(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=ch,
            norm_num_groups=_groups(ch),
            cross_attention_dim=768 // width_div,
            attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
    raise ValueError(f"preset: expected 'tiny' or 'sd-shaped', got {preset!r}")


def _vae_config(preset: str, width_div: int, sample_size: int) -> dict:
    ch = (8, 16, 16, 16) if preset == "tiny" else [c // width_div for c in (128, 256, 512, 512)]
    return dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=ch,
        layers_per_block=1 if preset == "tiny" else 2,
        norm_num_groups=4 if preset == "tiny" else _groups(ch),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=sample_size * 8,
        scaling_factor=0.18215,
    )


def special_ids(tokenizer) -> dict:
    """The special token ids a text model's config needs from its tokenizer."""
    return dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _text_config(preset: str, width_div: int, vocab_size: int, **kw) -> CLIPTextConfig:
    hidden = 32 if preset == "tiny" else 768 // width_div
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=4,
        num_hidden_layers=2 if preset == "tiny" else 4,
        max_position_embeddings=77,
        projection_dim=hidden,
        **kw,
    )


def build_tiny_components(
    preset: str = "tiny",
    *,
    seed: int = 0,
    width_div: int = 4,
    sample_size: int | None = None,
    tokenizer_dir: str | Path | None = None,
) -> dict:
    """Components of a random Stable-Diffusion-shaped pipeline (keys as in diffusers'
    ``StableDiffusionPipeline``), plus ``ranker`` (a tiny ``CLIPModel`` sharing the tokenizer)."""
    if sample_size is None:
        sample_size = 8 if preset == "tiny" else 32
    tokenizer = build_clip_tokenizer(list(WORDS), tokenizer_dir)
    vocab = len(tokenizer)
    ids = special_ids(tokenizer)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**_unet_config(preset, width_div, sample_size))
    vae = AutoencoderKL(**_vae_config(preset, width_div, sample_size))
    text_encoder = CLIPTextModel(_text_config(preset, width_div, vocab, **ids))
    ranker = tiny_clip(tokenizer)
    for m in (unet, vae, text_encoder, ranker):
        m.eval()
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(**SD_SCHEDULER),
        ranker=ranker,
        ranker_tokenizer=tokenizer,
    )


def build_tiny_sdxl_components(
    preset: str = "tiny",
    *,
    seed: int = 0,
    width_div: int = 8,
    sample_size: int | None = None,
    tokenizer_dir: str | Path | None = None,
) -> dict:
    """Components of a random SDXL-shaped pipeline (keys as in diffusers'
    ``StableDiffusionXLPipeline``): two text encoders (the second with a projection, whose pooled
    output joins the time embedding with the six micro-conditioning numbers), a UNet with
    ``addition_embed_type="text_time"``. ``tiny``: 64 px native, 8x8x4 latents, for tests;
    ``sdxl-shaped``: SDXL's block layout (no attention at the top level, 1, 2 and 10 transformer
    layers below) with channels divided by ``width_div``, for speed benchmarks."""
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTextModelWithProjection

    tokenizer = build_clip_tokenizer(list(WORDS), tokenizer_dir)
    ids = special_ids(tokenizer)
    torch.manual_seed(seed)
    if preset == "tiny":
        sample_size = sample_size or 8
        hidden, hidden_2, time_dim = 32, 48, 8  # distinct widths, as SDXL's 768 and 1280
        layout = _unet_config("tiny", 4, sample_size)
    elif preset == "sdxl-shaped":
        sample_size = sample_size or 32
        hidden, hidden_2, time_dim = 768 // width_div, 1280 // width_div, 256 // width_div
        ch = [c // width_div for c in (320, 640, 1280)]
        layout = dict(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=ch,
            norm_num_groups=_groups(ch),
            attention_head_dim=(5, 10, 20),  # heads, as SDXL's config names them
            transformer_layers_per_block=(1, 2, 10),
            use_linear_projection=True,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        )
    else:
        raise ValueError(f"preset: expected 'tiny' or 'sdxl-shaped', got {preset!r}")
    unet = UNet2DConditionModel(
        **dict(
            layout,
            cross_attention_dim=hidden + hidden_2,  # both encoders' states side by side
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim + hidden_2,
        )
    )
    vae_preset = "tiny" if preset == "tiny" else "sd-shaped"
    vae = AutoencoderKL(**dict(_vae_config(vae_preset, width_div, sample_size), force_upcast=True))
    base = _text_config("tiny" if preset == "tiny" else "sd-shaped", 1, len(tokenizer), **ids)

    def text_config(h: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            **dict(base.to_dict(), hidden_size=h, intermediate_size=4 * h, projection_dim=h)
        )

    text_encoder = CLIPTextModel(text_config(hidden))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(hidden_2))
    for m in (unet, vae, text_encoder, text_encoder_2):
        m.eval()
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=EulerDiscreteScheduler(
            **{
                k: v
                for k, v in SD_SCHEDULER.items()
                if k not in ("clip_sample", "set_alpha_to_one")
            }
        ),
    )


def save_tiny_sdxl(folder: str | Path, *, seed: int = 0) -> Path:
    """:func:`build_tiny_sdxl_components` saved as a diffusers SDXL pipeline folder."""
    from diffusers import StableDiffusionXLPipeline

    StableDiffusionXLPipeline(**build_tiny_sdxl_components(seed=seed)).save_pretrained(folder)
    return Path(folder)


def save_tiny_sdxl_refiner(folder: str | Path, *, seed: int = 1) -> Path:
    """A tiny random SDXL refiner folder for :func:`save_tiny_sdxl`'s model, laid out as SDXL's
    refiner: only the second text encoder (its states alone condition the UNet), and five
    micro-conditioning numbers (original size, crop top-left, aesthetic score)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    c = build_tiny_sdxl_components(seed=seed)
    hidden_2 = c["text_encoder_2"].config.hidden_size
    time_dim = c["unet"].config.addition_time_embed_dim
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **dict(
            {k: v for k, v in c["unet"].config.items() if not k.startswith("_")},
            cross_attention_dim=hidden_2,
            projection_class_embeddings_input_dim=5 * time_dim + hidden_2,
        )
    ).eval()
    StableDiffusionXLImg2ImgPipeline(
        vae=c["vae"],
        text_encoder=None,
        text_encoder_2=c["text_encoder_2"],
        tokenizer=None,
        tokenizer_2=c["tokenizer_2"],
        unet=unet,
        scheduler=c["scheduler"],
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    ).save_pretrained(folder)
    return Path(folder)


def build_tiny_sd3_components(*, seed: int = 0, t5: bool = False) -> dict:
    """Components of a tiny random Stable Diffusion 3 pipeline (keys as in diffusers'
    ``StableDiffusion3Pipeline``): two CLIP text encoders with projections (32 and 48 wide,
    pooled side by side), with ``t5`` a tiny T5 encoder (96 wide) and a word-level tokenizer
    built offline, else none (SD3 runs without it: zeros in its place), an
    ``SD3Transformer2DModel`` on 8x8x16 latents (patch 2), a 16-channel VAE with a shift factor
    and the flow-matching Euler scheduler with SD3's shift of 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    tokenizer = build_clip_tokenizer(list(WORDS), None)
    base = _text_config("tiny", 1, len(tokenizer), **special_ids(tokenizer))
    torch.manual_seed(seed)
    encoders = [
        CLIPTextModelWithProjection(
            CLIPTextConfig(
                **dict(base.to_dict(), hidden_size=h, intermediate_size=2 * h, projection_dim=h)
            )
        ).eval()
        for h in (32, 48)
    ]
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=96,  # T5's width; the CLIP states (80) are zero-padded to it
        caption_projection_dim=32,
        pooled_projection_dim=80,
        pos_embed_max_size=16,
    ).eval()
    text_encoder_3 = tokenizer_3 = None
    if t5:
        from .tokenizer import build_t5_like_tokenizer

        tokenizer_3 = build_t5_like_tokenizer(list(WORDS))
        text_encoder_3 = t5_encoder(tokenizer_3, width=96, head_dim=16, ff=128, heads=4).eval()
    vae_cfg = dict(_vae_config("tiny", 1, 8), latent_channels=16)
    vae_cfg.update(scaling_factor=1.5305, shift_factor=0.0609)
    vae = AutoencoderKL(**vae_cfg, use_quant_conv=False, use_post_quant_conv=False).eval()
    return dict(
        transformer=transformer,
        vae=vae,
        text_encoder=encoders[0],
        tokenizer=tokenizer,
        text_encoder_2=encoders[1],
        tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


def t5_encoder(tokenizer, *, width: int, head_dim: int, ff: int, heads: int, layers: int = 2):
    """A random ``T5EncoderModel`` of these sizes over ``tokenizer``'s vocabulary (pad 0, eos 1,
    as :func:`blendedit.tokenizer.build_t5_like_tokenizer`'s)."""
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=head_dim,
        d_ff=ff,
        num_layers=layers,
        num_heads=heads,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(cfg)


def save_tiny_sd3(folder: str | Path, *, seed: int = 0, t5: bool = False) -> Path:
    """:func:`build_tiny_sd3_components` saved as a diffusers SD3 pipeline folder."""
    from diffusers import StableDiffusion3Pipeline

    c = build_tiny_sd3_components(seed=seed, t5=t5)
    StableDiffusion3Pipeline(**c).save_pretrained(folder)
    return Path(folder)


def build_tiny_flux_components(*, seed: int = 0, guidance_embeds: bool = True) -> dict:
    """Components of a tiny random Flux pipeline (keys as in diffusers' ``FluxPipeline``): a
    CLIP text encoder (its pooled output, 32 wide), a tiny T5 encoder (96 wide) with a
    word-level tokenizer built offline, a ``FluxTransformer2DModel`` (one double and one single
    block; latents in 2x2 patches of 16 channels) that takes the guidance scale as an input
    (``guidance_embeds``, as FLUX.1-dev; False: as schnell), a 16-channel VAE with a shift
    factor, and the flow-matching Euler scheduler with resolution-dependent shifting."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    sd3 = build_tiny_sd3_components(seed=seed, t5=True)
    tokenizer = sd3["tokenizer"]
    torch.manual_seed(seed)
    clip = CLIPTextModel(_text_config("tiny", 1, len(tokenizer), **special_ids(tokenizer))).eval()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=96,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    vae_cfg = dict(_vae_config("tiny", 1, 8), latent_channels=16)
    vae_cfg.update(scaling_factor=0.3611, shift_factor=0.1159)
    vae = AutoencoderKL(**vae_cfg, use_quant_conv=False, use_post_quant_conv=False).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    return dict(
        transformer=transformer,
        vae=vae,
        text_encoder=clip,
        tokenizer=tokenizer,
        text_encoder_2=sd3["text_encoder_3"],
        tokenizer_2=sd3["tokenizer_3"],
        scheduler=scheduler,
    )


def save_tiny_flux(folder: str | Path, *, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """:func:`build_tiny_flux_components` saved as a diffusers Flux pipeline folder."""
    from diffusers import FluxPipeline

    c = build_tiny_flux_components(seed=seed, guidance_embeds=guidance_embeds)
    FluxPipeline(**c).save_pretrained(folder)
    return Path(folder)


def tiny_clip(tokenizer) -> CLIPModel:
    """A tiny random ``CLIPModel`` (32 px images, patch 8) for ``tokenizer``'s vocabulary."""
    ids = special_ids(tokenizer)
    text_cfg = _text_config("tiny", 4, len(tokenizer), **ids)
    return CLIPModel(
        CLIPConfig(
            text_config=text_cfg.to_dict(),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_attention_heads=4,
                num_hidden_layers=2,
                image_size=32,
                patch_size=8,
                projection_dim=32,
            ),
            projection_dim=32,
        )
    ).eval()


def build_tiny_pixel_components(
    *,
    seed: int = 0,
    sample_size: int = 32,
    prediction_type: str = "epsilon",
    learned_sigma: bool = False,
    tokenizer_dir: str | Path | None = None,
) -> dict:
    """A random pixel-space model for Blended Diffusion tests: ``unet`` (a small
    ``UNet2DModel``, 6 output channels when ``learned_sigma``), ``scheduler`` (DDPM, linear
    betas) and ``clip`` / ``clip_tokenizer`` (a tiny ``CLIPModel``)."""
    from diffusers import DDPMScheduler, UNet2DModel

    tokenizer = build_clip_tokenizer(list(WORDS), tokenizer_dir)
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=sample_size,
        in_channels=3,
        out_channels=6 if learned_sigma else 3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ).eval()
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        prediction_type=prediction_type,
        variance_type="learned_range" if learned_sigma else "fixed_small",
    )
    return dict(unet=unet, scheduler=scheduler, clip=tiny_clip(tokenizer), clip_tokenizer=tokenizer)


#: diffusers' inpainting pipeline class of each family with an inpainting checkpoint
INPAINT_PIPELINES = {
    "sd": "StableDiffusionInpaintPipeline",
    "sdxl": "StableDiffusionXLInpaintPipeline",
    "flux": "FluxFillPipeline",
}


def inpainting_denoiser(denoiser):
    """A new random denoiser of ``denoiser``'s architecture with an inpainting checkpoint's
    inputs: a UNet with 4 + 1 + 4 input channels, or a Flux transformer with 64 + 64 + 256
    input features (Flux Fill's: packed latents, masked-image latents, 8x8-folded mask)."""
    cfg = {k: v for k, v in denoiser.config.items() if not k.startswith("_")}  # no defaults list
    latent = cfg.get("out_channels") or cfg["in_channels"]
    if "guidance_embeds" in cfg:  # Flux: features of 2x2 patches
        wide = {"in_channels": latent + latent + 256, "out_channels": latent}
    else:
        wide = {"in_channels": 2 * latent + 1}
    return type(denoiser).from_config(cfg | wide).eval()


def build_tiny_inpaint_components(family: str, *, seed: int = 0) -> dict:
    """A tiny random inpainting model of ``family`` ("sd", "sdxl" or "flux"): the family's tiny
    components with the denoiser widened as the real checkpoints are (an SD / SDXL UNet with
    4 + 1 + 4 input channels; a Flux Fill transformer with 64 + 64 + 256 input features, i.e. the
    packed latents, masked-image latents and the 8x8-folded mask), its new inputs random so that
    they change the prediction."""
    import diffusers

    if family not in INPAINT_PIPELINES:
        raise ValueError(f"family: expected one of {tuple(INPAINT_PIPELINES)}, got {family!r}")
    if family == "sd":
        c = build_tiny_components("tiny", seed=seed)
        c = {k: v for k, v in c.items() if not k.startswith("ranker")}
    elif family == "sdxl":
        c = build_tiny_sdxl_components(seed=seed)
    else:
        c = build_tiny_flux_components(seed=seed)
    key = "transformer" if family == "flux" else "unet"
    torch.manual_seed(seed + 1)
    c[key] = inpainting_denoiser(c[key])
    cls = getattr(diffusers, INPAINT_PIPELINES[family])
    if family == "sd":
        c.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return dict(cls=cls, components=c)


def save_tiny_inpaint(folder: str | Path, family: str, *, seed: int = 0) -> Path:
    """:func:`build_tiny_inpaint_components` saved as a diffusers inpainting pipeline folder
    (``StableDiffusionInpaintPipeline``, ``StableDiffusionXLInpaintPipeline`` or
    ``FluxFillPipeline``)."""
    built = build_tiny_inpaint_components(family, seed=seed)
    built["cls"](**built["components"]).save_pretrained(folder)
    return Path(folder)
