"""Single-file checkpoints: which family a file holds, whether its denoiser's inputs fit the
``--config`` it is loaded with, and SD3 / Flux transformer files (the transformer alone, under its
original names, with the rest of the pipeline from ``--config``)."""

from __future__ import annotations

import json
from pathlib import Path

from .sources import (
    FAMILY_NAMES,
    ModelNotFoundError,
    _cached_folder,
    _family,
    _from_pretrained,
    _hub_family,
    _looks_like_path,
)


def checkpoint_family(path: Path) -> str | None:
    """A ``.safetensors`` checkpoint's family from its tensor names (SDXL's text encoders sit
    under ``conditioner.embedders``, SD's under ``cond_stage_model``, SD3's transformer has
    ``joint_blocks``, Flux's ``double_blocks``); None when the names do not say (other formats
    are not opened here)."""
    if path.suffix.lower() != ".safetensors":
        return None
    from safetensors import safe_open

    from .ldm_format import original_family

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception:  # not a safetensors file: loading it says so
        return None
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.") for k in keys):
        return "sd"
    return original_family(keys)


def single_file_family(path: Path, config, local_files_only) -> str:
    """The family of a single-file checkpoint, from its names and its ``config``; a
    :class:`ModelNotFoundError` when the two disagree (an SDXL file with an SD config)."""
    found = checkpoint_family(path)
    wanted = None
    if config:
        cfg = Path(config).expanduser()
        if cfg.is_dir():
            wanted = _family(cfg)
        elif not _looks_like_path(config):
            wanted = _hub_family(config, local_files_only, default=None)
    if found and wanted and found != wanted:
        raise ModelNotFoundError(
            f"model: {str(path)!r} is {FAMILY_NAMES[found]} checkpoint but --config "
            f"{config!r} describes {FAMILY_NAMES[wanted]} pipeline; pass the config "
            "(diffusers folder or hub id) of the model it was saved from"
        )
    return found or wanted or "sd"


#: Where the rest of a single SD3 / Flux file's pipeline comes from (its --config), e.g.
FLOW_CONFIG_EXAMPLES = {
    "sd3": "stabilityai/stable-diffusion-3.5-medium",
    "flux": "black-forest-labs/FLUX.1-dev",
}


def flow_pipeline_from_file(family: str, path: Path, config, kw: dict, local_files_only):
    """A single SD3 or Flux ``.safetensors`` file: the transformer under its original names
    (read by :func:`blendedit.ldm_format.transformer_from_original`, whatever its width), and
    the VAE, text encoders, tokenizers and scheduler from ``config`` (the model's diffusers
    folder or hub id), as these files are used: Flux's hold the transformer alone."""
    import torch
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from safetensors.torch import load_file

    from .ldm_format import transformer_from_original

    name, spec = FAMILY_NAMES[family][2:], str(path)
    if not config:
        raise ModelNotFoundError(
            f"model: {spec!r} is a single {name} checkpoint, which holds the transformer; pass "
            "--config <the model's diffusers folder or hub id> (e.g. "
            f"{FLOW_CONFIG_EXAMPLES[family]}) for its VAE, text encoders and scheduler"
        )
    cls = SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel
    local = Path(config).expanduser().is_dir() or local_files_only
    try:
        cfg = cls.load_config(config, subfolder="transformer", local_files_only=local)
        with torch.device("meta"):  # no memory, no random init: the file's tensors go in
            model = cls.from_config(cfg)
    except Exception as e:
        raise ModelNotFoundError(
            f"model: --config {config!r} gives no {name} transformer config "
            f"({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from e
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    try:
        state = transformer_from_original(family, load_file(spec), shapes)
        model.load_state_dict(state, strict=True, assign=True)
    except (ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()
        raise ModelNotFoundError(
            f"model: the transformer in {spec!r} does not fit the one --config {config!r} "
            f"describes ({' '.join(first[:2])}); pass the config of the model the file was "
            "saved from"
        ) from e
    model = model.to(kw.get("dtype") or kw.get("torch_dtype") or torch.float32).eval()
    try:
        return _from_pretrained(family, str(config), dict(kw, transformer=model), local)
    except Exception as e:
        raise ModelNotFoundError(f"model: could not load --config {config!r}: {e}") from e


#: The tensor that takes a single file's denoiser input, per family (original names, bare or
#: under ``model.diffusion_model.``), its input width along dim 1: an SD / SDXL UNet's first
#: convolution, Flux's input projection.
INPUT_TENSORS = {
    "sd": "input_blocks.0.0.weight",
    "sdxl": "input_blocks.0.0.weight",
    "flux": "img_in.weight",
}
#: Hub ids of each family's inpainting checkpoints' configs, for messages.
INPAINT_EXAMPLES = {
    "sd": "stable-diffusion-v1-5/stable-diffusion-inpainting",
    "sdxl": "diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
    "flux": "black-forest-labs/FLUX.1-Fill-dev",
}


def _file_input_width(path: Path, family: str) -> int | None:
    """The input width (channels or features) of the denoiser in a ``.safetensors`` file."""
    from safetensors import safe_open

    if family not in INPUT_TENSORS or path.suffix.lower() != ".safetensors":
        return None
    name = INPUT_TENSORS[family]
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            for key in (name, "model.diffusion_model." + name):
                if key in keys:
                    return int(f.get_slice(key).get_shape()[1])
    except Exception:  # not a safetensors file: loading it says so
        return None
    return None


def _config_input_width(config, family: str) -> tuple[int, int] | None:
    """(input width, latent width) of the denoiser that ``config`` (folder or cached hub id)
    describes; None when it cannot be read here."""
    if not config:
        return None
    folder = Path(config).expanduser()
    if not folder.is_dir():
        folder = None if _looks_like_path(config) else _cached_folder(config)
    sub = "transformer" if family == "flux" else "unet"
    try:
        cfg = json.loads((folder / sub / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return None
    return cfg["in_channels"], cfg.get("out_channels") or cfg["in_channels"]


def check_input_width(path: Path, family: str, config) -> None:
    """A :class:`ModelNotFoundError` when the file's denoiser is an inpainting one and
    ``config`` describes a text-to-image one, or the other way round (diffusers' own loader
    would fail on a tensor's shape, or load the wrong architecture)."""
    got = _file_input_width(path, family)
    cfg = _config_input_width(config, family)
    if got is None or cfg is None or got == cfg[0]:
        return
    want, latent = cfg
    kind = "Fill transformer" if family == "flux" else "inpainting UNet"
    unit = "input features" if family == "flux" else "input channels"
    if got > latent:
        what = f"{FAMILY_NAMES[family]} {kind} checkpoint ({got} {unit})"
    else:
        what = f"{FAMILY_NAMES[family]} text-to-image checkpoint ({got} {unit})"
    there = f"{'an inpainting' if want > latent else 'a text-to-image'} model ({want} {unit})"
    raise ModelNotFoundError(
        f"model: {str(path)!r} is {what} but --config {config!r} describes {there}; pass the "
        f"config of the model it was saved from"
        + (f" (e.g. {INPAINT_EXAMPLES[family]})" if got > latent else "")
    )
