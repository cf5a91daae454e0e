"""Diffusers components <-> the original formats: one ("LDM") checkpoint, the single
``.safetensors`` file that Stable Diffusion and SDXL releases ship and ``from_single_file``
reads; and the transformers of SD3 and Flux under their original names (both ways, below).

The tests save the tiny random models this way to check that a single file loads and edits as
its folder does; SD and SDXL files are read by diffusers, SD3 and Flux transformers by
:func:`transformer_from_original`. The LDM layout (the public format of the original
repositories):

- UNet under ``model.diffusion_model.``: ``input_blocks.N`` (conv_in, then per down block its
  resnets ``.0`` with attentions ``.1``, then its downsampler ``.0.op``), ``middle_block.0/1/2``,
  ``output_blocks.N`` (per up block its resnets ``.0``, attentions ``.1`` and upsampler
  ``.1.conv`` or ``.2.conv``), ``time_embed``, ``label_emb`` (SDXL's added embedding), ``out``;
  resnets name ``in_layers``/``emb_layers``/``out_layers``/``skip_connection``.
- VAE under ``first_stage_model.``: ``encoder.down.i.block.j``, ``decoder.up.i`` counted from
  the lowest resolution, ``mid.block_1/2`` and ``mid.attn_1`` (1x1 convolutions ``q k v
  proj_out``), ``nin_shortcut``, ``norm_out``.
- Text: SD's CLIP under ``cond_stage_model.transformer.``; SDXL's first encoder (CLIP) under
  ``conditioner.embedders.0.transformer.`` and its second (OpenCLIP) under
  ``conditioner.embedders.1.model.``: ``transformer.resblocks.i`` with a fused
  ``attn.in_proj_weight``, ``ln_1``, ``ln_2``, ``mlp.c_fc``, ``mlp.c_proj``, ``token_embedding``,
  ``positional_embedding``, ``ln_final`` and ``text_projection`` (hidden x projection).
"""

from __future__ import annotations

from pathlib import Path

import torch

_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _resnet(rest: str) -> str:
    for new, old in _RESNET:
        if rest.startswith(new + "."):
            return old + rest[len(new) :]
    return rest


def unet_to_ldm(state: dict, layers_per_block: int) -> dict:
    """A diffusers ``UNet2DConditionModel`` state dict in the original layout."""
    per = layers_per_block + 1
    up_has_attn = {
        k.split(".")[1] for k in state if k.startswith("up_blocks.") and ".attentions." in k
    }
    out = {}
    for key, v in state.items():
        p = key.split(".")
        head = ".".join(p[:2]) if ".".join(p[:2]) in _UNET_TOP else p[0]
        if head in _UNET_TOP:
            new = _UNET_TOP[head] + key[len(head) :]
        elif p[0] == "down_blocks":
            b, kind = int(p[1]), p[2]
            if kind == "downsamplers":  # down_blocks.b.downsamplers.0.conv.X
                new = f"input_blocks.{1 + b * per + layers_per_block}.0.op." + ".".join(p[5:])
            else:
                n = 1 + b * per + int(p[3])
                rest = ".".join(p[4:])
                new = (
                    f"input_blocks.{n}.0.{_resnet(rest)}"
                    if kind == "resnets"
                    else f"input_blocks.{n}.1.{rest}"
                )
        elif p[0] == "mid_block":
            rest = ".".join(p[3:])
            new = (
                f"middle_block.{2 * int(p[2])}.{_resnet(rest)}"
                if p[1] == "resnets"
                else f"middle_block.1.{rest}"
            )
        elif p[0] == "up_blocks":
            b, kind = int(p[1]), p[2]
            if kind == "upsamplers":  # up_blocks.b.upsamplers.0.conv.X
                slot = 2 if p[1] in up_has_attn else 1
                new = f"output_blocks.{b * per + layers_per_block}.{slot}.conv." + ".".join(p[5:])
            else:
                n = b * per + int(p[3])
                rest = ".".join(p[4:])
                new = (
                    f"output_blocks.{n}.0.{_resnet(rest)}"
                    if kind == "resnets"
                    else f"output_blocks.{n}.1.{rest}"
                )
        else:
            raise ValueError(f"unet_to_ldm: no original name for {key!r}")
        out["model.diffusion_model." + new] = v
    return out


_VAE_ATTN = (
    ("group_norm", "norm"),
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "proj_out"),
)


def vae_to_ldm(state: dict, num_blocks: int) -> dict:
    """A diffusers ``AutoencoderKL`` state dict in the original layout."""
    out = {}
    for key, v in state.items():
        p = key.split(".")
        side = p[0]
        if p[1] in ("down_blocks", "up_blocks"):
            i = int(p[2]) if side == "encoder" else num_blocks - 1 - int(p[2])
            level = f"{side}.{'down' if side == 'encoder' else 'up'}.{i}"
            if p[3] == "resnets":
                rest = ".".join(p[5:]).replace("conv_shortcut", "nin_shortcut")
                new = f"{level}.block.{p[4]}.{rest}"
            else:  # downsamplers.0.conv.X / upsamplers.0.conv.X
                new = f"{level}.{'downsample' if side == 'encoder' else 'upsample'}.conv.{p[-1]}"
        elif p[1] == "mid_block" and p[2] == "resnets":
            rest = ".".join(p[4:]).replace("conv_shortcut", "nin_shortcut")
            new = f"{side}.mid.block_{int(p[3]) + 1}.{rest}"
        elif p[1] == "mid_block":  # attentions.0.<name>.X: linear -> 1x1 convolution
            name = ".".join(p[4:-1])
            name = dict(_VAE_ATTN).get(name, name)
            new = f"{side}.mid.attn_1.{name}.{p[-1]}"
            if v.dim() == 2:
                v = v[:, :, None, None]
        elif p[1] == "conv_norm_out":
            new = f"{side}.norm_out.{p[-1]}"
        else:
            new = key
        out["first_stage_model." + new] = v
    return out


def clip_to_ldm(state: dict, prefix: str) -> dict:
    """A ``CLIPTextModel`` state dict under ``prefix`` (``text_model.`` restored where
    transformers >= 5.6 leaves it out)."""
    return {
        prefix + (k if k.startswith("text_model.") else "text_model." + k): v
        for k, v in state.items()
        if "position_ids" not in k
    }


def open_clip_to_ldm(state: dict, prefix: str) -> dict:
    """A ``CLIPTextModelWithProjection`` state dict in OpenCLIP's layout under ``prefix``."""
    out, qkv = {}, {}
    for key, v in state.items():
        k = key.removeprefix("text_model.")
        if "position_ids" in k:
            continue
        if k == "text_projection.weight":
            out[prefix + "text_projection"] = v.T.contiguous()
        elif k == "embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = v
        elif k == "embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = v
        elif k.startswith("final_layer_norm."):
            out[prefix + "ln_final." + k.split(".")[-1]] = v
        elif k.startswith("encoder.layers."):
            p = k.split(".")
            block = f"{prefix}transformer.resblocks.{p[2]}."
            rest = ".".join(p[3:])
            if rest.startswith("self_attn.") and rest.split(".")[1] in (
                "q_proj",
                "k_proj",
                "v_proj",
            ):
                qkv.setdefault((block, p[-1]), {})[rest.split(".")[1]] = v
                continue
            rest = (
                rest.replace("self_attn.", "attn.")
                .replace("layer_norm1", "ln_1")
                .replace("layer_norm2", "ln_2")
                .replace("mlp.fc1", "mlp.c_fc")
                .replace("mlp.fc2", "mlp.c_proj")
            )
            out[block + rest] = v
        else:
            raise ValueError(f"open_clip_to_ldm: no original name for {key!r}")
    for (block, kind), parts in qkv.items():
        fused = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
        out[f"{block}attn.in_proj_{kind}"] = fused
    return out


def to_ldm_state_dict(components: dict) -> dict:
    """One original-format state dict of a Stable Diffusion or SDXL pipeline's components
    (``unet``, ``vae``, ``text_encoder`` and, for SDXL, ``text_encoder_2``)."""
    unet, vae = components["unet"], components["vae"]
    sd = unet_to_ldm(unet.state_dict(), unet.config.layers_per_block)
    sd.update(vae_to_ldm(vae.state_dict(), len(vae.config.down_block_types)))
    te, te2 = components.get("text_encoder"), components.get("text_encoder_2")
    if te2 is None:
        sd.update(clip_to_ldm(te.state_dict(), "cond_stage_model.transformer."))
    else:
        sd.update(clip_to_ldm(te.state_dict(), "conditioner.embedders.0.transformer."))
        sd.update(open_clip_to_ldm(te2.state_dict(), "conditioner.embedders.1.model."))
    return {k: v.detach().contiguous() for k, v in sd.items()}


def save_single_file(components: dict, path: str | Path) -> Path:
    """Write :func:`to_ldm_state_dict` of ``components`` as one ``.safetensors`` file."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file(to_ldm_state_dict(components), str(path))
    return path


# --- transformers of the flow-matching families (SD3's MMDiT, Flux) ---------------------------
# The original names, as Stability's and Black Forest Labs' releases ship them: SD3 under
# ``model.diffusion_model.`` (``joint_blocks.i.x_block`` / ``.context_block``, fused ``attn.qkv``),
# Flux bare or under the same prefix (``double_blocks.i``, ``single_blocks.i`` whose ``linear1``
# fuses q, k, v and the MLP's input). An entry maps diffusers module names (several: fused in
# this order along dim 0) to one original name; its kind says which parameters it has: ``lin``
# weight and bias, ``w`` a norm's weight, ``scale`` a norm's weight named ``scale``, ``t`` one
# tensor, ``swap`` a linear layer whose output halves are (scale, shift) in diffusers and
# (shift, scale) in the original. Both directions read the same tables, so they are exact
# inverses; the fused tensors are split at the sizes of the model they are loaded into.

_PARAMS = {
    "lin": (("weight", "weight"), ("bias", "bias")),
    "swap": (("weight", "weight"), ("bias", "bias")),
    "w": (("weight", "weight"),),
    "scale": (("weight", "scale"),),
    "t": (("", ""),),
}
_PREFIX = "model.diffusion_model."
_IO = ("in_layer", "out_layer")  # Flux's embedding MLPs


def _emb(diffusers: str, original: str, layers=("mlp.0", "mlp.2")) -> list:
    """A two-layer embedding MLP (diffusers' ``linear_1``, ``linear_2``)."""
    return [
        ((f"time_text_embed.{diffusers}.linear_{n}",), f"{original}.{layer}", "lin")
        for n, layer in zip((1, 2), layers)
    ]


def _qkv(d: str, names=("to_q", "to_k", "to_v")) -> tuple:
    return tuple(f"{d}{n}" for n in names)


def _sd3_entries(n_blocks: int, pre_only) -> list:
    """SD3's table; ``pre_only(i)``: block i is the last, context-only one (no context output
    projection or MLP; its context modulation is (scale, shift) like the final layer's)."""
    e = [
        (("pos_embed.pos_embed",), "pos_embed", "t"),
        (("pos_embed.proj",), "x_embedder.proj", "lin"),
        (("context_embedder",), "context_embedder", "lin"),
        (("proj_out",), "final_layer.linear", "lin"),
        (("norm_out.linear",), "final_layer.adaLN_modulation.1", "swap"),
        *_emb("timestep_embedder", "t_embedder"),
        *_emb("text_embedder", "y_embedder"),
    ]
    for i in range(n_blocks):
        d, x, c = (
            f"transformer_blocks.{i}.",
            f"joint_blocks.{i}.x_block.",
            f"joint_blocks.{i}.context_block.",
        )
        e += [
            (_qkv(d + "attn."), x + "attn.qkv", "lin"),
            (_qkv(d + "attn.", ("add_q_proj", "add_k_proj", "add_v_proj")), c + "attn.qkv", "lin"),
            ((d + "attn.norm_q",), x + "attn.ln_q", "w"),
            ((d + "attn.norm_k",), x + "attn.ln_k", "w"),
            ((d + "attn.norm_added_q",), c + "attn.ln_q", "w"),
            ((d + "attn.norm_added_k",), c + "attn.ln_k", "w"),
            ((d + "attn.to_out.0",), x + "attn.proj", "lin"),
            ((d + "attn.to_add_out",), c + "attn.proj", "lin"),
            (_qkv(d + "attn2."), x + "attn2.qkv", "lin"),
            ((d + "attn2.norm_q",), x + "attn2.ln_q", "w"),
            ((d + "attn2.norm_k",), x + "attn2.ln_k", "w"),
            ((d + "attn2.to_out.0",), x + "attn2.proj", "lin"),
            ((d + "norm1.linear",), x + "adaLN_modulation.1", "lin"),
            (
                (d + "norm1_context.linear",),
                c + "adaLN_modulation.1",
                "swap" if pre_only(i) else "lin",
            ),
            ((d + "ff.net.0.proj",), x + "mlp.fc1", "lin"),
            ((d + "ff.net.2",), x + "mlp.fc2", "lin"),
            ((d + "ff_context.net.0.proj",), c + "mlp.fc1", "lin"),
            ((d + "ff_context.net.2",), c + "mlp.fc2", "lin"),
        ]
    return e


def _flux_entries(n_double: int, n_single: int) -> list:
    e = [
        (("context_embedder",), "txt_in", "lin"),
        (("x_embedder",), "img_in", "lin"),
        (("proj_out",), "final_layer.linear", "lin"),
        (("norm_out.linear",), "final_layer.adaLN_modulation.1", "swap"),
        *_emb("timestep_embedder", "time_in", _IO),
        *_emb("text_embedder", "vector_in", _IO),
        *_emb("guidance_embedder", "guidance_in", _IO),
    ]
    for i in range(n_double):
        d, o = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        e += [
            ((d + "norm1.linear",), o + "img_mod.lin", "lin"),
            ((d + "norm1_context.linear",), o + "txt_mod.lin", "lin"),
            (_qkv(d + "attn."), o + "img_attn.qkv", "lin"),
            (
                _qkv(d + "attn.", ("add_q_proj", "add_k_proj", "add_v_proj")),
                o + "txt_attn.qkv",
                "lin",
            ),
            ((d + "attn.norm_q",), o + "img_attn.norm.query_norm", "scale"),
            ((d + "attn.norm_k",), o + "img_attn.norm.key_norm", "scale"),
            ((d + "attn.norm_added_q",), o + "txt_attn.norm.query_norm", "scale"),
            ((d + "attn.norm_added_k",), o + "txt_attn.norm.key_norm", "scale"),
            ((d + "attn.to_out.0",), o + "img_attn.proj", "lin"),
            ((d + "attn.to_add_out",), o + "txt_attn.proj", "lin"),
            ((d + "ff.net.0.proj",), o + "img_mlp.0", "lin"),
            ((d + "ff.net.2",), o + "img_mlp.2", "lin"),
            ((d + "ff_context.net.0.proj",), o + "txt_mlp.0", "lin"),
            ((d + "ff_context.net.2",), o + "txt_mlp.2", "lin"),
        ]
    for i in range(n_single):
        d, o = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        e += [
            ((d + "norm.linear",), o + "modulation.lin", "lin"),
            ((*_qkv(d + "attn."), d + "proj_mlp"), o + "linear1", "lin"),
            ((d + "attn.norm_q",), o + "norm.query_norm", "scale"),
            ((d + "attn.norm_k",), o + "norm.key_norm", "scale"),
            ((d + "proj_out",), o + "linear2", "lin"),
        ]
    return e


def _count(keys, head: str) -> int:
    """How many blocks ``head.i.`` the names hold."""
    idx = [int(k[len(head) + 1 :].split(".")[0]) for k in keys if k.startswith(head + ".")]
    return max(idx) + 1 if idx else 0


def _entries(family: str, state: dict, original: bool) -> list:
    """The family's table for a state dict in the original (``original``) or diffusers layout."""
    if family == "sd3":
        head = "joint_blocks" if original else "transformer_blocks"
        if original:
            pre = lambda i: f"joint_blocks.{i}.context_block.attn.proj.weight" not in state  # noqa: E731
        else:
            pre = lambda i: f"transformer_blocks.{i}.attn.to_add_out.weight" not in state  # noqa: E731
        return _sd3_entries(_count(state, head), pre)
    if original:
        return _flux_entries(_count(state, "double_blocks"), _count(state, "single_blocks"))
    return _flux_entries(
        _count(state, "transformer_blocks"), _count(state, "single_transformer_blocks")
    )


def _join(name: str, param: str) -> str:
    return f"{name}.{param}" if param else name


def _swap(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a])


def _convert(entries, state: dict, to_original: bool, shapes: dict | None = None) -> dict:
    """Rename ``state`` by ``entries`` (diffusers -> original, or back, splitting fused tensors
    at ``shapes``' sizes); a ValueError names any tensor the table does not place."""
    out, used = {}, set()
    for names, orig, kind in entries:
        for p, q in _PARAMS[kind]:
            dkeys, okey = [_join(n, p) for n in names], _join(orig, q)
            if to_original:
                if not all(k in state for k in dkeys):
                    continue
                t = torch.cat([state[k] for k in dkeys])
                out[okey], used = (_swap(t) if kind == "swap" else t), used | set(dkeys)
            elif okey in state:
                t, used = state[okey], used | {okey}
                t = _swap(t) if kind == "swap" else t
                if len(dkeys) == 1:
                    out[dkeys[0]] = t
                    continue
                sizes = [shapes[k][0] if k in shapes else -1 for k in dkeys]
                if -1 in sizes or sum(sizes) != t.shape[0]:
                    raise ValueError(f"{okey} has {t.shape[0]} rows, the model's {dkeys} {sizes}")
                out.update(zip(dkeys, torch.split(t, sizes)))
    left = sorted(set(state) - used)
    if left:
        raise ValueError(f"{len(left)} tensor(s) of no known place, e.g. {left[:3]}")
    return out


def transformer_to_original(family: str, state: dict) -> dict:
    """A diffusers ``SD3Transformer2DModel`` (``family`` "sd3") or ``FluxTransformer2DModel``
    ("flux") state dict under its original names (SD3's with the ``model.diffusion_model.``
    prefix its releases carry, Flux's bare, as Black Forest Labs ship it)."""
    out = _convert(_entries(family, state, original=False), state, True)
    prefix = _PREFIX if family == "sd3" else ""
    return {prefix + k: v.detach().contiguous() for k, v in out.items()}


def transformer_from_original(family: str, state: dict, shapes: dict) -> dict:
    """The inverse of :func:`transformer_to_original`, for a model whose parameter shapes are
    ``shapes`` (name -> shape; they say where fused tensors split). Only the transformer's
    tensors are read: those under ``model.diffusion_model.`` when the file has that prefix
    (files that also hold a VAE or text encoders), else all of them."""
    if any(k.startswith(_PREFIX) for k in state):
        state = {k[len(_PREFIX) :]: v for k, v in state.items() if k.startswith(_PREFIX)}
    return _convert(_entries(family, state, original=True), state, False, shapes)


def original_family(keys) -> str | None:
    """ "sd3" or "flux" when tensor names are an original-format transformer's, else None."""
    for k in keys:
        k = k[len(_PREFIX) :] if k.startswith(_PREFIX) else k
        if k.startswith("joint_blocks."):
            return "sd3"
        if k.startswith("double_blocks."):
            return "flux"
    return None
