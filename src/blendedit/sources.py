"""Where a model's weights come from: a pipeline folder's or hub repository's family, the
family's diffusers pipeline, and the error a model that cannot be found raises (shared by
:mod:`blendedit.models` and :mod:`blendedit.single_file`)."""

from __future__ import annotations

from pathlib import Path

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


class ModelNotFoundError(ValueError):
    """A model spec could not be resolved to weights on this machine."""


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or Path(spec).suffix.lower() in SINGLE_FILE_SUFFIXES


def _family(folder: Path) -> str:
    """A pipeline folder's family from its model_index.json (SD unless it names SDXL or SD3)."""
    name = _index(folder).get("_class_name", "")
    if name.startswith("Flux"):
        return "flux"
    return "sd3" if "StableDiffusion3" in name else "sdxl" if "XL" in name else "sd"


def _index(folder: Path) -> dict:
    """A pipeline folder's model_index.json ({} when it cannot be read)."""
    import json

    try:
        return json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return {}


def _absent(folder: Path | None) -> dict:
    """``{name: None}`` for the components a folder's index leaves out ([null, null]: SD3
    without T5), which diffusers must be told to load without."""
    index = _index(folder) if folder is not None else {}
    return {k: None for k, v in index.items() if isinstance(v, list) and v[:1] == [None]}


def _cached_folder(repo_id: str) -> Path | None:
    """The cached snapshot folder holding a hub repository's model_index.json, if any."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, "model_index.json", local_files_only=True)).parent
    except Exception:
        return None


def _hub_family(repo_id: str, local_files_only, default: str | None = "sd") -> str | None:
    """A hub repository's family from its model_index.json (from the cache offline); SD when
    it cannot be read (loading it then says why)."""
    from huggingface_hub import hf_hub_download

    try:
        index = hf_hub_download(repo_id, "model_index.json", local_files_only=local_files_only)
    except Exception:  # not cached, offline, no such repository: the load reports it
        return default
    return _family(Path(index).parent)


def _from_pretrained(family: str, source: str, kw: dict, local_files_only):
    """The family's diffusers pipeline from a folder or hub id (SDXL has no safety checker to
    switch off)."""
    from diffusers import (
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    if family == "flux":
        from diffusers import FluxPipeline

        kw = {k: v for k, v in kw.items() if "safety" not in k}
        return FluxPipeline.from_pretrained(source, local_files_only=local_files_only, **kw)
    if family == "sd3":
        kw = {k: v for k, v in kw.items() if "safety" not in k}
        folder = Path(source) if Path(source).is_dir() else _cached_folder(source)
        kw.update({k: None for k in _absent(folder) if k.endswith("_3")})
        return StableDiffusion3Pipeline.from_pretrained(
            source, local_files_only=local_files_only, **kw
        )
    if family == "sdxl":
        kw = {k: v for k, v in kw.items() if "safety" not in k}
        return StableDiffusionXLPipeline.from_pretrained(
            source, local_files_only=local_files_only, **kw
        )
    return StableDiffusionPipeline.from_pretrained(source, local_files_only=local_files_only, **kw)


FAMILY_NAMES = {  # with the article
    "sd": "a Stable Diffusion 1.x/2.x",
    "sdxl": "an SDXL",
    "sd3": "a Stable Diffusion 3",
    "flux": "a Flux",
}
#: Flux's default guidance (diffusers' FluxPipeline's; the guidance-distilled models take it as
#: an input, not as classifier-free guidance).
FLUX_GUIDANCE_SCALE = 3.5
