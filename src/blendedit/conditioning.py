"""Text conditioning of the UNet, per model family.

- Stable Diffusion 1.x/2.x: the text encoder's last hidden states.
- SDXL: the penultimate hidden states of both text encoders side by side, the second encoder's
  pooled (projected) embedding, and six micro-conditioning numbers (original size, crop
  top-left, target size), which reach the UNet as ``added_cond_kwargs``. An empty negative
  prompt is zeros where the model's ``force_zeros_for_empty_prompt`` says so.
"""

from __future__ import annotations

import torch

MICRO_CONDITIONING = ("geometry", "centred")


def _ids(tokenizer, text: str, max_len: int, device) -> torch.Tensor:
    return tokenizer(
        [text], padding="max_length", max_length=max_len, truncation=True, return_tensors="pt"
    ).input_ids.to(device)


def max_length(tokenizer, text_encoder) -> int:
    return min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings)


def encode_sd(text_encoder, tokenizer, text: str, device) -> torch.Tensor:
    """(1, L, D): Stable Diffusion's text embedding, the last hidden states."""
    return text_encoder(_ids(tokenizer, text, max_length(tokenizer, text_encoder), device))[0]


def encode_sdxl(encoders, tokenizers, text: str, device):
    """SDXL's text embedding of ``text``: ((1, L, D1 + D2) penultimate hidden states of both
    encoders side by side, (1, P) the second encoder's pooled projection)."""
    states, pooled = [], None
    for enc, tok in zip(encoders, tokenizers):
        out = enc(_ids(tok, text, max_length(tok, enc), device), output_hidden_states=True)
        states.append(out.hidden_states[-2])
        if getattr(out, "text_embeds", None) is not None:  # the encoder with a projection
            pooled = out.text_embeds
    return torch.cat(states, dim=-1), pooled


def time_ids(original_hw, crop_top_left, target_hw) -> torch.Tensor:
    """(1, 6) SDXL micro-conditioning: original (h, w), crop (top, left), target (h, w)."""
    return torch.tensor([[*original_hw, *crop_top_left, *target_hw]], dtype=torch.float32)


def edit_time_ids(mode: str, image_hw, box, region_hw) -> torch.Tensor:
    """The micro-conditioning of an edit. ``geometry`` (default): the edit's real geometry,
    original size = the input image's (h, w), crop top-left = the edited box's, target size =
    the box's; ``centred``: SDXL's text-to-image defaults, original = target = the region the
    UNet sees (``region_hw``), crop (0, 0)."""
    if mode not in MICRO_CONDITIONING:
        raise ValueError(f"micro_conditioning: expected one of {MICRO_CONDITIONING}, got {mode!r}")
    if mode == "centred":
        return time_ids(region_hw, (0, 0), region_hw)
    x0, y0, x1, y1 = box
    return time_ids(image_hw, (y0, x0), (y1 - y0, x1 - x0))


def encode_prompt(
    encoders, tokenizers, prompt, negative_prompt, n, cfg, device, zeros=False, sdxl=None
):
    """The UNet's text conditioning for ``n`` samples: (embeds, pooled, truncated), the rows
    [uncond x n; cond x n] with classifier-free guidance (``cfg``), else cond x n. One encoder:
    Stable Diffusion (pooled None); two: SDXL, where ``zeros`` (the model's
    ``force_zeros_for_empty_prompt``) makes an empty negative prompt zeros. ``sdxl=True`` with
    one encoder: the SDXL refiner (its second encoder only)."""
    sdxl = len(encoders) == 2 if sdxl is None else sdxl

    def embed(text: str):
        if sdxl:
            return encode_sdxl(encoders, tokenizers, text, device)
        return encode_sd(encoders[0], tokenizers[0], text, device), None

    def rows(x):
        return None if x is None else x.repeat(n, *[1] * (x.dim() - 1))

    truncated = len(tokenizers[0](prompt).input_ids) > max_length(tokenizers[0], encoders[0])
    cond, pooled = embed(prompt)
    if not cfg:
        return rows(cond), rows(pooled), truncated
    if sdxl and zeros and not negative_prompt:
        uncond, pooled_u = torch.zeros_like(cond), torch.zeros_like(pooled)
    else:
        uncond, pooled_u = embed(negative_prompt)
    embeds = torch.cat([rows(uncond), rows(cond)])
    pooled = None if pooled is None else torch.cat([rows(pooled_u), rows(pooled)])
    return embeds, pooled, truncated


#: SD3's T5 sequence length (diffusers' default max_sequence_length)
T5_MAX_LENGTH = 256


def encode_sd3(encoders, tokenizers, text: str, device, joint_dim: int):
    """SD3's text embedding of ``text``: ((1, 77 + L, joint_dim): the two CLIPs' penultimate
    states side by side, zero-padded to T5's width, followed by T5's last states (zeros for
    77 tokens when the model has no T5), (1, P1 + P2): both CLIPs' pooled projections)."""
    states, pooled = [], []
    for enc, tok in zip(encoders[:2], tokenizers[:2]):
        out = enc(_ids(tok, text, max_length(tok, enc), device), output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled.append(out.text_embeds)
    clip = torch.cat(states, dim=-1)
    clip = torch.nn.functional.pad(clip, (0, joint_dim - clip.shape[-1]))
    t5, t5_tok = encoders[2], tokenizers[2]
    if t5 is None:
        t5_states = torch.zeros(1, 77, joint_dim, device=device, dtype=clip.dtype)
    else:
        t5_states = t5(_ids(t5_tok, text, T5_MAX_LENGTH, device))[0].to(clip.dtype)
    return torch.cat([clip, t5_states], dim=1), torch.cat(pooled, dim=-1)


def encode_prompt_sd3(encoders, tokenizers, prompt, negative_prompt, n, cfg, device, joint_dim):
    """SD3's conditioning for ``n`` samples, as :func:`encode_prompt` returns it."""

    def rows(x):
        return x.repeat(n, *[1] * (x.dim() - 1))

    truncated = len(tokenizers[0](prompt).input_ids) > max_length(tokenizers[0], encoders[0])
    cond, pooled = encode_sd3(encoders, tokenizers, prompt, device, joint_dim)
    if not cfg:
        return rows(cond), rows(pooled), truncated
    uncond, pooled_u = encode_sd3(encoders, tokenizers, negative_prompt, device, joint_dim)
    embeds = torch.cat([rows(uncond), rows(cond)])
    return embeds, torch.cat([rows(pooled_u), rows(pooled)]), truncated


#: Flux's T5 sequence length (diffusers' FluxPipeline's default max_sequence_length)
FLUX_T5_LENGTH = 512


def encode_prompt_flux(clip, clip_tok, t5, t5_tok, prompt, negative_prompt, n, cfg, device):
    """Flux's conditioning for ``n`` samples, as :func:`encode_prompt` returns it: T5's last
    states (the sequence the transformer attends to) and CLIP's pooled output (not projected);
    [uncond; cond] rows only with ``cfg`` (models that are not guidance-distilled)."""

    def embed(text: str):
        pooled = clip(_ids(clip_tok, text, max_length(clip_tok, clip), device)).pooler_output
        states = t5(_ids(t5_tok, text, FLUX_T5_LENGTH, device))[0]
        return states.to(pooled.dtype), pooled

    def rows(x):
        return x.repeat(n, *[1] * (x.dim() - 1))

    truncated = len(clip_tok(prompt).input_ids) > max_length(clip_tok, clip)
    cond, pooled = embed(prompt)
    if not cfg:
        return rows(cond), rows(pooled), truncated
    uncond, pooled_u = embed(negative_prompt)
    return (
        torch.cat([rows(uncond), rows(cond)]),
        torch.cat([rows(pooled_u), rows(pooled)]),
        truncated,
    )


#: The SDXL refiner's aesthetic score for the prompt's rows and the negative ones (its
#: training's and diffusers' defaults).
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5


def added_conditioning(
    pooled, mode: str, image_hw, box, region_hw, aesthetic: bool = False, cfg: bool = False
) -> dict | None:
    """SDXL's ``added_cond_kwargs`` for an edit: the pooled text and, on every row, the
    micro-conditioning of :func:`edit_time_ids`; None for Stable Diffusion (no pooled text).
    ``aesthetic`` (the refiner): five numbers, original size, crop top-left and an aesthetic
    score in place of the target size, the negative score on the unconditional rows (``cfg``:
    the first half)."""
    if pooled is None:
        return None
    ids = edit_time_ids(mode, image_hw, box, region_hw).to(pooled.device, pooled.dtype)
    ids = ids.repeat(len(pooled), 1)
    if aesthetic:
        score = torch.full((len(pooled), 1), AESTHETIC_SCORE).to(ids)
        if cfg:
            score[: len(pooled) // 2] = NEGATIVE_AESTHETIC_SCORE
        ids = torch.cat([ids[:, :4], score], dim=1)
    return dict(text_embeds=pooled, time_ids=ids)


def refiner_conditioning(refiner: dict, prompt: str, opts, n: int, cfg: bool, geometry):
    """(unet, embeds, added_cond_kwargs) of an SDXL refiner (``models.load_refiner``'s parts)
    for an edit: its own text encoders (the refiner has only SDXL's second), the same
    micro-conditioning ``geometry`` (mode, image (h, w), box, region (h, w)) and, where the
    refiner was trained with one, an aesthetic score in place of the target size."""
    pairs = [
        (refiner[e], refiner[t])
        for e, t in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
        if refiner[e] is not None
    ]
    device = next(refiner["unet"].parameters()).device
    with torch.no_grad():
        embeds, pooled, _ = encode_prompt(
            [e for e, _ in pairs],
            [t for _, t in pairs],
            prompt,
            opts.negative_prompt,
            n,
            cfg,
            device,
            refiner["force_zeros"],
            sdxl=True,
        )
    added = added_conditioning(pooled, *geometry, aesthetic=refiner["aesthetic"], cfg=cfg)
    return refiner["unet"], embeds, added
