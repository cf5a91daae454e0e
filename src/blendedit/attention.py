"""A UNet's cross-attention keys and values, computed once per edit instead of once per step.

A Stable Diffusion or SDXL UNet's cross-attention projects the text embeddings to keys and
values (``to_k``, ``to_v``) at every step, though the embeddings, and so the keys and values,
are the same for the whole edit. :func:`install` gives each plain cross-attention module of a
UNet a processor that, inside :func:`cross_attention_cache` (the denoising loop), projects them
on the first step and reuses them after; everywhere else, and for any input it does not handle,
it hands over to the processor it replaced. The arithmetic is the replaced processor's (the
same projections, head split and ``scaled_dot_product_attention``), so outputs are unchanged.
What it saves grows with the share of text tokens among the image's: a few per cent of an SD
call at 256 px, more for SDXL, whose deepest level has more text tokens than image tokens
(docs/benchmarks.md, "Cross-attention keys and values").

Transformers (SD3, Flux) mix text and image tokens in every block, so their keys and values
change from step to step: nothing to cache, and their attention modules are left as they are.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F

_CACHE: ContextVar[dict | None] = ContextVar("blendedit_cross_attention_cache", default=None)


class CachedCrossAttention:
    """Attention processor: cross-attention with the keys and values of an encoder state
    projected once per :func:`cross_attention_cache` scope; ``fallback`` (the processor it
    replaced) outside a scope, for self-attention, masks and extra arguments."""

    def __init__(self, fallback):
        self.fallback = fallback

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None
    ):
        cache = _CACHE.get()
        if (
            cache is None
            or encoder_hidden_states is None
            or attention_mask is not None
            or temb is not None
            or hidden_states.ndim != 3
        ):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        entry = cache.get(id(attn))
        if entry is None or entry[0] is not encoder_hidden_states:
            # (B, T, heads * d) -> (B, heads, T, d); the state is kept so that its id stays its
            k, v = (_heads(p(encoder_hidden_states), attn.heads) for p in (attn.to_k, attn.to_v))
            entry = cache[id(attn)] = (encoder_hidden_states, k, v)
        _, k, v = entry
        q = _heads(attn.to_q(hidden_states), attn.heads)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).flatten(2).to(q.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _plain_cross_attention(attn) -> bool:
    """A cross-attention module whose processor is diffusers' default and which has none of the
    extras (norms, residual, rescaling, fused or added projections) that processor applies."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    return (
        getattr(attn, "is_cross_attention", False)
        and type(getattr(attn, "processor", None)) is AttnProcessor2_0
        and all(
            getattr(attn, name, None) is None
            for name in ("spatial_norm", "group_norm", "norm_cross", "norm_q", "norm_k")
        )
        and getattr(attn, "added_kv_proj_dim", None) is None
        and not getattr(attn, "residual_connection", True)
        and getattr(attn, "rescale_output_factor", None) == 1.0
        and not getattr(attn, "fused_projections", False)
    )


def install(model: torch.nn.Module) -> int:
    """Give every plain cross-attention module of ``model`` a :class:`CachedCrossAttention`
    (idempotent); returns how many modules have one."""
    n = 0
    for module in model.modules():
        if _plain_cross_attention(module):
            module.processor = CachedCrossAttention(module.processor)
        n += isinstance(getattr(module, "processor", None), CachedCrossAttention)
    return n


@contextmanager
def cross_attention_cache(cache: dict | None = None):
    """The scope in which installed processors keep keys and values (one denoising loop: the
    weights and text embeddings must not change inside it), in ``cache`` (a fresh dict unless
    given: a dict passed again carries them into another scope). Scopes nest and are per
    thread."""
    token = _CACHE.set({} if cache is None else cache)
    try:
        yield
    finally:
        _CACHE.reset(token)
