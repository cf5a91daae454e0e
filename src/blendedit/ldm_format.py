"""Diffusers components -> one original-format ("LDM") checkpoint, the single ``.safetensors``
file that Stable Diffusion and SDXL releases ship and ``from_single_file`` reads.

The tests save the tiny random models this way to check that a single file loads and edits as
its folder does; ``blendedit`` itself only reads such files. The layout (the public format of
the original repositories):

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
