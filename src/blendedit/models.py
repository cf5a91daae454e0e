"""Resolve a model spec (built-in name, local folder, single checkpoint file, hub id) to models.

Every model is a diffusers or transformers class loaded by ``from_pretrained`` (or diffusers'
``from_single_file``), so hub models and the project's own small models share one code path.
Loading never falls back silently: a model that is not available raises
:class:`ModelNotFoundError` naming it and saying how to get it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


class ModelNotFoundError(ValueError):
    """A model spec could not be resolved to weights on this machine."""


@contextmanager
def quiet_transformers():
    """Silence transformers' import-time notices (diffusers imports image processors that we do
    not use, and transformers 5 warns that torchvision is absent); restores the level after."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _tiny_random() -> dict:
    from .tiny import build_tiny_components

    return build_tiny_components("tiny")


#: Built-in names -> a function returning pipeline components (and optionally a ranker).
BUILTIN_MODELS: dict[str, Callable[[], dict]] = {"tiny-random": _tiny_random}

HUB_HELP = (
    "it is not in the local Hugging Face cache and the hub cannot be reached (offline or "
    "HF_HUB_OFFLINE=1). On a connected machine run `hf download {spec}` and copy the cache "
    "(~/.cache/huggingface/hub), or download the repository to a folder and pass that folder"
)


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or Path(spec).suffix.lower() in SINGLE_FILE_SUFFIXES


def load_sd_components(
    spec: str,
    *,
    torch_dtype=None,
    local_files_only: bool | None = None,
    config: str | None = None,
) -> dict:
    """Components of a Stable Diffusion pipeline (``unet``, ``vae``, ``text_encoder``,
    ``tokenizer``, ``scheduler``; built-ins may add ``ranker``/``ranker_tokenizer``).

    ``spec``: a built-in name (``tiny-random``), a local diffusers folder (with
    ``model_index.json``), a single ``.safetensors``/``.ckpt`` file (``config``: the diffusers
    folder or hub id describing its architecture, needed offline), or a hub id (SD 1.x/2.x).
    """
    with quiet_transformers():
        from diffusers import StableDiffusionPipeline

    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"model: expected a model name, folder, file or hub id, got {spec!r}")
    if spec in BUILTIN_MODELS:
        return BUILTIN_MODELS[spec]()
    kw = dict(torch_dtype=torch_dtype, safety_checker=None, requires_safety_checker=False)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise ModelNotFoundError(
                f"model: folder {spec!r} is not a diffusers pipeline folder (no model_index.json)"
            )
        try:
            pipe = StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True, **kw)
        except Exception as e:  # diffusers raises several types for a broken folder
            raise ModelNotFoundError(f"model: could not load folder {spec!r}: {e}") from e
    elif path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ModelNotFoundError(
                f"model: {spec!r} is not a checkpoint (expected one of {SINGLE_FILE_SUFFIXES})"
            )
        try:  # diffusers loads .ckpt with torch.load(weights_only=True): no pickle code runs
            pipe = StableDiffusionPipeline.from_single_file(
                str(path), config=config, local_files_only=local_files_only, **kw
            )
        except Exception as e:
            raise ModelNotFoundError(
                f"model: could not load checkpoint {spec!r}: {e}. Offline, a single file needs "
                "its architecture: pass config=<diffusers folder or cached hub id> (CLI: --config)"
            ) from e
    elif _looks_like_path(spec):
        raise ModelNotFoundError(f"model: no such file or folder: {spec!r}")
    else:
        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                spec, local_files_only=local_files_only, **kw
            )
        except Exception as e:
            builtin = ", ".join(sorted(BUILTIN_MODELS))
            raise ModelNotFoundError(
                f"model: cannot load {spec!r}: {HUB_HELP.format(spec=spec)}. "
                f"Built-in models: {builtin}. ({type(e).__name__}: {str(e).splitlines()[0]})"
            ) from e
    return dict(
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        scheduler=pipe.scheduler,
    )


def load_clip(spec: str, *, local_files_only: bool | None = None):
    """A ``transformers.CLIPModel`` and its tokenizer from a folder or hub id.

    Returns ``(model, tokenizer, folder_or_None)``.
    """
    from transformers import AutoTokenizer, CLIPModel

    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"rank_model: expected a CLIP folder or hub id, got {spec!r}")
    path = Path(spec).expanduser()
    if _looks_like_path(spec) and not path.exists():
        raise ModelNotFoundError(f"rank_model: no such folder: {spec!r}")
    source = str(path) if path.is_dir() else spec
    try:
        model = CLIPModel.from_pretrained(source, local_files_only=local_files_only)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
    except Exception as e:
        raise ModelNotFoundError(
            f"rank_model: cannot load CLIP {spec!r}: {HUB_HELP.format(spec=spec)}; or turn "
            f"ranking off (CLI: --rank-model none). ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from e
    return model, tokenizer, (source if path.is_dir() else None)
