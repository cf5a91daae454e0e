"""Work a denoiser's calls in an edit can share, computed once instead of again.

- **Cross-attention keys and values, across steps.** A Stable Diffusion or SDXL UNet's
  cross-attention projects the text embeddings to keys and values (``to_k``, ``to_v``) at every
  step, though the embeddings, and so the keys and values, are the same for the whole edit.
  :func:`install` gives each plain cross-attention module a processor that, inside
  :func:`edit_cache` (the denoising loop), projects them on the first step and reuses
  them after; everywhere else, and for any input it does not handle, it hands over to the
  processor it replaced. The arithmetic is the replaced processor's (the same projections, head
  split and ``scaled_dot_product_attention``), so outputs are bit for bit unchanged.
- **The guidance rows' first layers, within a step.** Classifier-free guidance runs the UNet on
  [z; z] with [uncond; cond] text. Until the first cross-attention the two halves of the batch
  are the same computation: for an SD 1.x/2.x UNet (whose time embedding does not depend on the
  text; SDXL's does, through the pooled text) that is ``conv_in``, the first ResNet block and the
  first transformer block's norms, input projection and self-attention, the most expensive
  layers of the UNet at the finest grid. :func:`install` hooks them so that, inside
  :func:`twin_rows` (set by the guided call), they run on the first half and the result is
  repeated; outputs change only by float rounding (a batch of one instead of two).

- **A transformer's per-edit inputs, across steps.** SD3 and Flux transformers mix text and
  image tokens from the first block on, so their blocks share nothing; but before the blocks
  they embed inputs that are the same at every step of an edit: the text's projection into the
  transformer's width (``context_embedder``), the pooled text's and (guidance-distilled Flux)
  the guidance scale's embeddings, and Flux's rotary embedding of the position ids. Inside
  :func:`edit_cache`, :func:`install` has those modules return the last call's
  output when their inputs equal the last call's (:class:`_SameInputs`): bit for bit what they
  would compute.

What each saves is measured in docs/benchmarks.md, "Work shared between denoiser calls".
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F

_CACHE: ContextVar[dict | None] = ContextVar("blendedit_edit_cache", default=None)
_TWINS: ContextVar[bool] = ContextVar("blendedit_twin_rows", default=False)


class CachedCrossAttention:
    """Attention processor: cross-attention with the keys and values of an encoder state
    projected once per :func:`edit_cache` scope; ``fallback`` (the processor it
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
            # (B, T, heads * d) -> (B, heads, T, d); the entry holds the state itself, so that
            # the identity check cannot match another tensor at a reused address
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
    """Give every plain cross-attention module of ``model`` a :class:`CachedCrossAttention`,
    hook the layers its guidance rows share (:func:`twin_layers`) and have the modules that
    embed a transformer's per-edit inputs (:func:`per_edit_modules`) reuse their output;
    idempotent. Returns how many cross-attention modules have the processor."""
    for module in per_edit_modules(model):
        if not isinstance(module, _SameInputs):
            module.__class__ = _same_inputs_class(type(module))
    n = 0
    for module in model.modules():
        if _plain_cross_attention(module):
            module.set_processor(CachedCrossAttention(module.processor))
        n += isinstance(getattr(module, "processor", None), CachedCrossAttention)
    if not getattr(model, "_blendedit_twins", False):
        for layer in twin_layers(model):
            layer.register_forward_pre_hook(_first_half, with_kwargs=True)
            layer.register_forward_hook(_repeated)
        model._blendedit_twins = True
    return n


class _SameInputs:
    """Mixin of a module whose output depends on its inputs only: inside a
    :func:`edit_cache` scope and without autograd, a call with the inputs of this
    module's last call in the scope returns that call's output. Inputs are compared by value on
    the CPU and by identity elsewhere (a comparison there would wait for the device)."""

    def forward(self, *args, **kwargs):
        cache = _CACHE.get()
        if cache is None or kwargs or torch.is_grad_enabled():
            return super().forward(*args, **kwargs)
        key = ("same-inputs", id(self))
        entry = cache.get(key)
        if entry is not None and len(entry[0]) == len(args) and all(map(_same, entry[0], args)):
            return entry[1]
        out = super().forward(*args)
        cache[key] = (args, out)
        return out

    def __reduce_ex__(self, protocol):
        # copied and pickled by the class it extends (a class made at run time cannot be
        # found by name), made this class again on the way back
        return _rebuilt, (self._base,), self.__dict__


def _rebuilt(base: type):
    return _same_inputs_class(base).__new__(_same_inputs_class(base))


def _same(a, b) -> bool:
    """The same input: equal CPU tensors, the same tensor on another device, equal values."""
    if torch.is_tensor(a) and torch.is_tensor(b):
        if a.device.type == "cpu" and b.device.type == "cpu":
            return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return a is b
    return not (torch.is_tensor(a) or torch.is_tensor(b)) and type(a) is type(b) and a == b


@functools.cache
def _same_inputs_class(cls: type) -> type:
    """``cls`` with :class:`_SameInputs`'s forward (its name kept, so the model prints as
    before)."""
    return type(cls.__name__, (_SameInputs, cls), {"__module__": cls.__module__, "_base": cls})


def per_edit_modules(model) -> list[torch.nn.Module]:
    """The modules of an SD3 or Flux transformer whose inputs are the same at every step of an
    edit: the text's projection (a plain ``Linear``; one a LoRA wraps is left alone), the pooled
    text's and the guidance scale's embeddings, and Flux's rotary embedding of the position
    ids. Empty for a UNet (which has none of them)."""
    found = []
    embed = getattr(model, "context_embedder", None)
    if type(embed) is torch.nn.Linear or isinstance(embed, _SameInputs):
        found.append(embed)
    times = getattr(model, "time_text_embed", None)
    for name in ("text_embedder", "guidance_embedder"):
        if isinstance(getattr(times, name, None), torch.nn.Module):
            found.append(getattr(times, name))
    pos = getattr(model, "pos_embed", None)
    if type(pos).__name__ == "FluxPosEmbed" or isinstance(pos, _SameInputs):
        found.append(pos)
    return found


def twin_layers(unet) -> list[torch.nn.Module]:
    """The layers of an SD 1.x/2.x UNet that see the same input in both guidance rows: up to
    the first cross-attention, where the text comes in. Empty for any other model (an SDXL UNet,
    whose time embedding takes the pooled text; a transformer; a first block without a plain
    transformer)."""
    cfg = getattr(unet, "config", None)
    blocks = getattr(unet, "down_blocks", None)
    if (
        cfg is None
        or not blocks
        or not isinstance(getattr(unet, "conv_in", None), torch.nn.Conv2d)
        or cfg.get("addition_embed_type") is not None
        or cfg.get("class_embed_type") is not None
        or getattr(unet, "encoder_hid_proj", None) is not None
    ):
        return []
    first = blocks[0]
    resnets, attentions = getattr(first, "resnets", None), getattr(first, "attentions", None)
    if not resnets or not attentions:
        return []
    t = attentions[0]
    block = t.transformer_blocks[0] if hasattr(t, "transformer_blocks") else None
    if (
        block is None
        or getattr(block, "only_cross_attention", True)
        or getattr(block, "norm_type", None) != "layer_norm"
        or getattr(block, "pos_embed", None) is not None
        or not all(hasattr(t, a) for a in ("norm", "proj_in"))
    ):
        return []
    return [unet.conv_in, resnets[0], t.norm, t.proj_in, block.norm1, block.attn1]


def _first_half(module, args, kwargs):
    """Pre-hook: inside :func:`twin_rows`, every batch-sized tensor input cut to its first
    half."""
    if not _TWINS.get():
        return None
    x = next(a for a in (*args, *kwargs.values()) if torch.is_tensor(a))
    if x.shape[0] % 2:
        raise RuntimeError(f"twin_rows: a batch of {x.shape[0]} rows has no two halves")
    h = x.shape[0] // 2

    def half(a):
        return a[:h] if torch.is_tensor(a) and a.ndim and a.shape[0] == 2 * h else a

    return tuple(half(a) for a in args), {k: half(v) for k, v in kwargs.items()}


def _repeated(module, args, out):
    """Forward hook: inside :func:`twin_rows`, the first half's output for both halves."""
    return torch.cat([out, out]) if _TWINS.get() else None


@contextmanager
def twin_rows():
    """The scope of one UNet call on [z; z] (classifier-free guidance): the hooked layers run
    on the first half and repeat it. Per thread."""
    token = _TWINS.set(True)
    try:
        yield
    finally:
        _TWINS.reset(token)


@contextmanager
def edit_cache(cache: dict | None = None):
    """The scope of one edit's denoising loop, in which what :func:`install` set up keeps its
    per-edit work: the cross-attention keys and values, and the outputs of a transformer's
    per-edit modules (the weights and the text embeddings must not change inside it). Kept in
    ``cache`` (a fresh dict unless given: a dict passed again carries them into another scope).
    Scopes nest and are per thread."""
    token = _CACHE.set({} if cache is None else cache)
    try:
        yield
    finally:
        _CACHE.reset(token)
