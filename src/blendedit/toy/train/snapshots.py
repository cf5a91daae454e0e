"""Snapshots: an unfinished run's current weights, laid out as its finished model."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch

from . import arch
from .arch import (
    PIXEL_SCHEDULER,
    SAMPLING_FILE,
    TEXT_ENCODER,
    UNET_RUN_CONFIG,
    VISION_PATCH_KEY,
    VisionClassifier,
    _unet_config,
    clip_config,
    vae_config,
    write_preprocessor,
)


def _split_prefix(weights: dict, prefix: str) -> dict:
    """The entries of ``weights`` under ``prefix``, without it."""
    return {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}


def _model_kind(weights: dict) -> str:
    """Which of the four models a state dict belongs to, from its parameter names."""
    keys = list(weights)
    if any(k.startswith("head.") for k in keys):
        return "vision"
    if any(k.startswith("text_model.") for k in keys):
        return "clip"
    if any(k.startswith("encoder.") for k in keys):
        return "vae"
    if any(".attn2." in k for k in keys):  # cross-attention on the text
        return "unet"
    if any(k.startswith("down_blocks.") for k in keys):
        return "pixel"
    raise SystemExit("the checkpoint holds none of the Shapes World models")


def snapshot(run: Path) -> Path:
    """Write the current weights of a run (the EMA where it keeps one) from its checkpoint to
    ``<run>/snapshot/``, laid out as its finished ``model/`` would be, so that an unfinished run
    can be evaluated or assembled while it trains. Returns the folder."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, UNet2DModel
    from transformers import AutoTokenizer, CLIPModel

    run = Path(run)
    ckpt = run / "checkpoint.pt"
    if not ckpt.exists():
        raise SystemExit(f"{run}: no checkpoint.pt (not a training run, or not started)")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    weights = state.get("ema") or state["model"]
    text_weights = _split_prefix(weights, TEXT_ENCODER + ".")
    if text_weights:  # a UNet trained with its text encoder (`unet --train-text-encoder`)
        weights = _split_prefix(weights, "unet.")
    kind = _model_kind(weights)
    tmp = run / "snapshot.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if kind == "clip":
        tok = AutoTokenizer.from_pretrained(run / "tokenizer")
        patch = weights["vision_model.embeddings.patch_embedding.weight"].shape[-1]
        model = CLIPModel(clip_config(tok, patch))
        model.load_state_dict(weights)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_preprocessor(tmp)
    elif kind == "vision":
        model = VisionClassifier(weights[VISION_PATCH_KEY].shape[-1])
        model.load_state_dict(weights)
        model.save(tmp)
    elif kind == "pixel":
        model = UNet2DModel(**arch.PIXEL_CONFIG)
        model.load_state_dict(weights)
        model.save_pretrained(tmp / "unet")
        DDPMScheduler(**PIXEL_SCHEDULER).save_pretrained(tmp / "scheduler")
    else:
        if kind == "vae":  # its downscale from its levels: 2 per level after the first
            levels = {k.split(".")[2] for k in weights if k.startswith("encoder.down_blocks.")}
            model = AutoencoderKL(**vae_config(2 ** (len(levels) - 1)))
        else:  # with the pooled text's weights when it was trained with `unet --pooled-text`
            pooled = any(k.startswith("add_embedding.") for k in weights)
            if (run / UNET_RUN_CONFIG).is_file():  # its own widths
                model = UNet2DConditionModel.from_config(
                    json.loads((run / UNET_RUN_CONFIG).read_text())
                )
            else:
                model = UNet2DConditionModel(**_unet_config(pooled))
        model.load_state_dict(weights)
        if kind == "vae":  # the scaling factor is measured when a run finishes
            for f in (run / "model" / "config.json", run / "metrics.json"):
                factor = json.loads(f.read_text()).get("scaling_factor") if f.exists() else None
                if factor:
                    model.register_to_config(scaling_factor=factor)
                    break
        model.save_pretrained(tmp)
    if text_weights:
        from transformers import CLIPTextConfig, CLIPTextModel

        text = CLIPTextModel(CLIPTextConfig.from_pretrained(run / TEXT_ENCODER))
        text.load_state_dict(text_weights)
        text.save_pretrained(tmp / TEXT_ENCODER)
        AutoTokenizer.from_pretrained(run / TEXT_ENCODER).save_pretrained(tmp / TEXT_ENCODER)
    if (run / SAMPLING_FILE).is_file():  # the scheduler it needs travels with it
        shutil.copy(run / SAMPLING_FILE, tmp / SAMPLING_FILE)
    (tmp / "STEP").write_text(f"{state['step']}\n")
    dest = run / "snapshot"
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    print(f"{run}: step {state['step']} ({kind}) written to {dest}", file=sys.stderr)
    return dest
