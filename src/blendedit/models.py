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

from .sources import (  # noqa: F401 (where users and the other modules import them from)
    FAMILY_NAMES,
    FLUX_GUIDANCE_SCALE,
    SINGLE_FILE_SUFFIXES,
    ModelNotFoundError,
    _absent,
    _cached_folder,
    _family,
    _from_pretrained,
    _hub_family,
    _index,
    _looks_like_path,
)


@contextmanager
def quiet_transformers():
    """Silence transformers' and diffusers' notices and loading bars while importing and
    loading (diffusers imports image processors that we do not use, transformers 5 warns that
    torchvision is absent, diffusers that accelerate is); warnings we act on are raised by
    blendedit itself. Restores the levels after."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    levels = tlog.get_verbosity(), dlog.get_verbosity()
    bars = tlog.is_progress_bar_enabled(), dlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    dlog.set_verbosity_error()
    tlog.disable_progress_bar()
    dlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(levels[0])
        dlog.set_verbosity(levels[1])
        if bars[0]:
            tlog.enable_progress_bar()
        if bars[1]:
            dlog.enable_progress_bar()


def dtype_kwargs(dtype) -> dict:
    """The dtype keyword of diffusers' ``from_pretrained``: ``dtype`` from 0.42 on (where
    ``torch_dtype`` is deprecated), ``torch_dtype`` before."""
    import diffusers
    from packaging.version import Version

    if dtype is None:
        return {}
    new = Version(diffusers.__version__).release >= (0, 42)
    return {"dtype" if new else "torch_dtype": dtype}


def _tiny_random() -> dict:
    from .tiny import build_tiny_components

    return build_tiny_components("tiny")


#: The shipped Shapes World models (SHAPES_WORLD.md): ``pipeline/`` (a StableDiffusionPipeline
#: folder), ``clip/`` (CLIPModel) and ``pixel/`` (UNet2DModel + scheduler), float16 safetensors.
TOY_DIR = Path(__file__).parent / "assets" / "toy"


def toy_shipped(folder: str | Path | None = None) -> bool:
    """Whether this installation (or ``folder``, laid out as the shipped one) has the Shapes
    World text-to-image pipeline."""
    return (Path(folder or TOY_DIR) / "pipeline" / "model_index.json").is_file()


# the shipped CLIPs by name: the one that ranks (clean renders) and Blended Diffusion's guidance
# CLIP (its vision tower tuned on the pixel model's x̂0, issue 31)
TOY_CLIPS = {"toy": "clip", "toy-guide": "guide-clip"}


def toy_folder(part: str) -> Path:
    """``pipeline``, ``clip``, ``guide-clip``, ``pixel`` or ``inpaint`` of the shipped Shapes
    World models."""
    folder = TOY_DIR / part
    if not folder.is_dir():
        raise ModelNotFoundError(
            f"model: the shipped Shapes World model is missing ({folder} does not exist); "
            "reinstall blendedit, or train it with `blendedit train-toy` (docs/models.md)"
        )
    return folder


def _toy() -> dict:
    import torch

    c = load_sd_components(str(toy_folder("pipeline")), torch_dtype=torch.float32)
    c["ranker"] = "toy"  # its CLIP, loaded by the pipeline (blendedit.ranking.ClipRanker)
    return c


#: The shipped inpainting UNet's tuned tensors, beside its config (the rest: the base UNet's).
DELTA_FILE = "inpaint_delta.safetensors"


def load_toy_inpaint_unet(folder: Path, base_unet):
    """The shipped inpainting UNet: ``folder/unet``'s config, its tuned tensors
    (``inpaint_delta.safetensors``) and the others from ``base_unet`` (the text-to-image UNet it
    was fine-tuned from, as ``toy`` loads it), in ``base_unet``'s dtype."""
    import json

    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    cfg = json.loads((folder / "unet" / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    unet = UNet2DConditionModel.from_config(cfg)
    dtype = next(base_unet.parameters()).dtype
    state = dict(base_unet.state_dict())
    state.update(load_file(str(folder / "unet" / DELTA_FILE)))
    unet.load_state_dict({k: v.float() for k, v in state.items()})
    return (unet if dtype == torch.float32 else unet.half()).eval()


def _toy_inpaint() -> dict:
    c = _toy()
    c["unet"] = load_toy_inpaint_unet(toy_folder("inpaint"), c["unet"])
    c.update(read_edit_defaults(toy_folder("inpaint")))
    return c


#: Built-in names -> a function returning pipeline components (and optionally a ranker).
BUILTIN_MODELS: dict[str, Callable[[], dict]] = {
    "toy": _toy,
    "toy-inpaint": _toy_inpaint,
    "tiny-random": _tiny_random,
}

HUB_HELP = (
    "it is not in the local Hugging Face cache and the hub cannot be reached (offline or "
    "HF_HUB_OFFLINE=1). On a connected machine run `hf download {spec}` and copy the cache "
    "(~/.cache/huggingface/hub), or download the repository to a folder and pass that folder"
)


def load_sd_components(
    spec: str,
    *,
    torch_dtype=None,
    local_files_only: bool | None = None,
    config: str | None = None,
) -> dict:
    """Components of a Stable Diffusion pipeline (``unet``, ``vae``, ``text_encoder``,
    ``tokenizer``, ``scheduler``; built-ins may add ``ranker``/``ranker_tokenizer``).

    ``spec``: a built-in name (``toy``: the shipped Shapes World model; ``tiny-random``), a
    local diffusers folder (with ``model_index.json``), a single ``.safetensors``/``.ckpt``
    file (``config``: the diffusers folder or hub id describing its architecture, needed
    offline), or a hub id (SD 1.x/2.x, SDXL; the family from its ``model_index.json``). SDXL
    adds ``text_encoder_2``, ``tokenizer_2`` and ``force_zeros_for_empty_prompt``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"model: expected a model name, folder, file or hub id, got {spec!r}")
    if spec in BUILTIN_MODELS:
        return BUILTIN_MODELS[spec]()
    kw = dict(**dtype_kwargs(torch_dtype), safety_checker=None, requires_safety_checker=False)
    with quiet_transformers():
        pipe = _load_pipeline(spec, kw, local_files_only, config)
    c = dict(
        unet=getattr(pipe, "unet", None) or pipe.transformer,  # SD3: the transformer denoises
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        scheduler=pipe.scheduler,
    )
    if hasattr(pipe, "transformer") and not hasattr(pipe, "text_encoder_3"):  # Flux
        c.update(
            family="flux",
            text_encoder_2=pipe.text_encoder_2,
            tokenizer_2=pipe.tokenizer_2,
            guidance_scale=FLUX_GUIDANCE_SCALE,
        )
    elif hasattr(pipe, "transformer"):  # SD3: three encoders (T5 optional), flow matching
        c.update(
            family="sd3",
            text_encoder_2=pipe.text_encoder_2,
            tokenizer_2=pipe.tokenizer_2,
            text_encoder_3=pipe.text_encoder_3,
            tokenizer_3=pipe.tokenizer_3,
        )
    elif getattr(pipe, "text_encoder_2", None) is not None:  # SDXL: its second encoder, rules
        c.update(
            text_encoder_2=pipe.text_encoder_2,
            tokenizer_2=pipe.tokenizer_2,
            force_zeros_for_empty_prompt=bool(pipe.config.force_zeros_for_empty_prompt),
        )
    path = Path(spec).expanduser()
    if path.is_dir():
        c.update(read_edit_defaults(path))
    return c


def _load_part(cls, flag: str, what: str, spec: str, torch_dtype, local_files_only, **kw):
    """``cls.from_pretrained`` of a local folder (offline) or hub id for the option ``flag``
    (``vae``, ``refiner``); a :class:`ModelNotFoundError` naming ``what`` was expected."""
    path = Path(spec).expanduser()
    if _looks_like_path(spec) and not path.is_dir():
        raise ModelNotFoundError(f"{flag}: no such folder: {spec!r}")
    try:
        with quiet_transformers():
            return cls.from_pretrained(
                str(path) if path.is_dir() else spec,
                local_files_only=True if path.is_dir() else local_files_only,
                **dtype_kwargs(torch_dtype),
                **kw,
            )
    except Exception as e:
        raise ModelNotFoundError(
            f"{flag}: cannot load {spec!r} as {what} folder or hub id "
            f"({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from e


def load_vae(spec: str, unet, own_vae, torch_dtype=None, local_files_only=None):
    """An ``AutoencoderKL`` from a folder (the VAE's own, or a pipeline folder with ``vae/``)
    or hub id, to replace ``own_vae``; a :class:`ModelNotFoundError` when it cannot be loaded
    or when its latents are not the ones ``unet`` takes (channels, or downscale factor)."""
    from diffusers import AutoencoderKL

    path = Path(spec).expanduser()
    sub = "vae" if path.is_dir() and (path / "vae" / "config.json").is_file() else None
    vae = _load_part(
        AutoencoderKL, "vae", "an AutoencoderKL", spec, torch_dtype, local_files_only, subfolder=sub
    )
    got, want = vae.config.latent_channels, own_vae.config.latent_channels  # the UNet's latents
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    own = 2 ** (len(own_vae.config.block_out_channels) - 1)
    if got != want or factor != own:
        raise ModelNotFoundError(
            f"vae: {spec!r} makes {got}-channel latents at 1/{factor} of the image, but the "
            f"model's UNet takes {want}-channel latents at 1/{own}: pass a VAE of this model's "
            "family (for SDXL, e.g. an fp16-fixed SDXL VAE)"
        )
    return vae


def load_refiner(spec: str, base_unet, base_family: str, torch_dtype=None, local_files_only=None):
    """An SDXL refiner's parts (``unet``, its text encoders and tokenizers, ``aesthetic``,
    ``force_zeros``) from a diffusers folder or hub id; a :class:`ModelNotFoundError` for
    anything that is not an SDXL refiner or base taking ``base_unet``'s latents, or a base
    model (of ``base_family``) that is not SDXL."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    if base_family != "sdxl":
        raise ModelNotFoundError(
            f"refiner: a refiner follows an SDXL base model, and --model is "
            f"{FAMILY_NAMES[base_family]} model; drop --refiner or pass an SDXL --model"
        )
    path = Path(spec).expanduser()
    if _looks_like_path(spec) and not path.is_dir():
        raise ModelNotFoundError(f"refiner: no such folder: {spec!r}")
    family = _family(path) if path.is_dir() else _hub_family(spec, local_files_only, None)
    if family not in ("sdxl", None):
        raise ModelNotFoundError(
            f"refiner: {spec!r} is {FAMILY_NAMES[family]} pipeline, not an SDXL refiner "
            "(e.g. stabilityai/stable-diffusion-xl-refiner-1.0)"
        )
    pipe = _load_part(
        StableDiffusionXLImg2ImgPipeline,
        "refiner",
        "an SDXL refiner",
        spec,
        torch_dtype,
        local_files_only,
    )
    unet = pipe.unet
    if getattr(unet.config, "addition_embed_type", None) != "text_time" or (
        pipe.text_encoder_2 is None
    ):
        raise ModelNotFoundError(
            f"refiner: {spec!r} is not an SDXL refiner (its UNet takes no SDXL conditioning)"
        )
    if unet.config.out_channels != base_unet.config.out_channels:  # an inpainting base takes more
        raise ModelNotFoundError(
            f"refiner: {spec!r} takes {unet.config.out_channels}-channel latents, the base model "
            f"{base_unet.config.out_channels}"
        )
    return dict(
        unet=unet,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer if pipe.text_encoder is not None else None,
        text_encoder_2=pipe.text_encoder_2,
        tokenizer_2=pipe.tokenizer_2,
        aesthetic=bool(pipe.config.requires_aesthetics_score),
        force_zeros=bool(pipe.config.force_zeros_for_empty_prompt),
    )


#: A file beside ``model_index.json`` with the edit defaults measured best for that model.
EDIT_DEFAULTS_FILE = "blendedit.json"


#: The default each method reads from :data:`EDIT_DEFAULTS_FILE`, and its allowed range.
EDIT_DEFAULT_KEYS = {"latent": ("guidance_scale", 1000.0), "pixel": ("clip_guidance_scale", 1e9)}


def read_edit_defaults(folder: Path, method: str = "latent") -> dict:
    """``{key: float}`` from ``folder``'s :data:`EDIT_DEFAULTS_FILE`, the key the ``method``'s
    (:data:`EDIT_DEFAULT_KEYS`), or ``{}`` when it has none; :class:`ModelNotFoundError`
    naming the file when it is not such a file."""
    import json

    key, high = EDIT_DEFAULT_KEYS[method]
    f = Path(folder) / EDIT_DEFAULTS_FILE
    if not f.is_file():
        return {}
    try:
        data = json.loads(f.read_text())
        g = data[key]
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 <= g <= high:
            raise ValueError(f"{key}: expected a number in [0, {high:g}], got {g!r}")
        unknown = sorted(set(data) - {key, "measured"})
        if unknown:
            raise ValueError(f"unknown keys {unknown}")
    except (ValueError, KeyError, TypeError) as e:
        raise ModelNotFoundError(
            f"model: {f} is not a blendedit defaults file ({type(e).__name__}: {e}); it holds "
            f'{{"{key}": <number>, "measured": "<how>"}}; fix or delete it'
        ) from None
    return {key: float(g)}


def write_edit_defaults(
    folder: Path, guidance_scale: float, measured: str, method: str = "latent"
) -> None:
    """Write ``folder``'s :data:`EDIT_DEFAULTS_FILE`: the guidance an edit of ``method`` takes
    when the call names none, and ``measured``, how that value was chosen."""
    import json

    key = EDIT_DEFAULT_KEYS[method][0]
    text = json.dumps({key: float(guidance_scale), "measured": measured}, indent=1)
    (Path(folder) / EDIT_DEFAULTS_FILE).write_text(text + "\n")


def pixel_edit_defaults(spec: str) -> dict:
    """The pixel model ``spec``'s edit defaults (:func:`read_edit_defaults`) without loading
    it: the shipped ``toy`` one's or a local folder's; ``{}`` for any other."""
    if spec == "toy":
        return read_edit_defaults(toy_folder("pixel"), "pixel") if toy_shipped() else {}
    path = Path(spec).expanduser() if isinstance(spec, str) and spec.strip() else None
    return read_edit_defaults(path, "pixel") if path is not None and path.is_dir() else {}


def _load_pipeline(spec: str, kw: dict, local_files_only, config):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise ModelNotFoundError(
                f"model: folder {spec!r} is not a diffusers pipeline folder (no model_index.json)"
            )
        missing = _missing_components(path)
        if missing:
            raise ModelNotFoundError(
                f"model: folder {spec!r} lacks the component(s) {', '.join(missing)} that its "
                "model_index.json lists (no subfolder); copy the complete pipeline folder"
            )
        try:
            pipe = _from_pretrained(_family(path), str(path), kw, True)
        except Exception as e:  # diffusers raises several types for a broken folder
            raise ModelNotFoundError(f"model: could not load folder {spec!r}: {e}") from e
    elif path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ModelNotFoundError(
                f"model: {spec!r} is not a checkpoint (expected one of {SINGLE_FILE_SUFFIXES})"
            )
        from .single_file import check_input_width, flow_pipeline_from_file, single_file_family

        family = single_file_family(path, config, local_files_only)
        check_input_width(path, family, config)
        if family in ("sd3", "flux"):
            return flow_pipeline_from_file(family, path, config, kw, local_files_only)
        cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
        if family == "sdxl":
            kw = {k: v for k, v in kw.items() if "safety" not in k}
        try:  # diffusers loads .ckpt with torch.load(weights_only=True): no pickle code runs
            local = bool(config) and Path(config).expanduser().is_dir()  # no hub look-up
            pipe = cls.from_single_file(
                str(path), config=config, local_files_only=local or local_files_only, **kw
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
            pipe = _from_pretrained(_hub_family(spec, local_files_only), spec, kw, local_files_only)
        except Exception as e:
            builtin = ", ".join(sorted(BUILTIN_MODELS))
            raise ModelNotFoundError(
                f"model: cannot load {spec!r}: {HUB_HELP.format(spec=spec)}. "
                f"Built-in models: {builtin}. ({type(e).__name__}: {str(e).splitlines()[0]})"
            ) from e
    return pipe


#: Components a Stable Diffusion folder may leave out (blendedit never uses them).
OPTIONAL_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")


def _missing_components(folder: Path) -> list[str]:
    """Components that ``model_index.json`` lists but whose subfolder is absent."""
    import json

    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(
            f"model: {str(folder / 'model_index.json')!r} is not valid JSON ({e})"
        ) from e
    return [
        k
        for k, v in index.items()
        if not k.startswith("_")
        and k not in OPTIONAL_COMPONENTS
        and isinstance(v, list)
        and v[:1] != [None]
        and not (folder / k).is_dir()
    ]


def load_clip(spec: str, *, local_files_only: bool | None = None):
    """A ``transformers.CLIPModel`` and its tokenizer from a folder, a hub id, ``toy`` or
    ``toy-guide`` (:data:`TOY_CLIPS`).

    Returns ``(model, tokenizer, folder_or_None)``.
    """
    import torch
    from transformers import AutoTokenizer, CLIPModel

    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"rank_model: expected a CLIP folder or hub id, got {spec!r}")
    if spec in TOY_CLIPS:  # the shipped Shapes World CLIPs
        spec = str(toy_folder(TOY_CLIPS[spec]))
    path = Path(spec).expanduser()
    if _looks_like_path(spec) and not path.exists():
        raise ModelNotFoundError(f"rank_model: no such folder: {spec!r}")
    source = str(path) if path.is_dir() else spec
    try:
        with quiet_transformers():
            model = CLIPModel.from_pretrained(
                source, local_files_only=local_files_only, dtype=torch.float32
            )
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
    except Exception as e:
        raise ModelNotFoundError(
            f"rank_model: cannot load CLIP {spec!r}: {HUB_HELP.format(spec=spec)}; or turn "
            f"ranking off (CLI: --rank-model none). ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from e
    return model, tokenizer, (source if path.is_dir() else None)


def load_pixel_components(spec: str, *, local_files_only: bool | None = None) -> dict:
    """A pixel-space model for Blended Diffusion: ``unet`` (``UNet2DModel``), ``scheduler``
    and, for built-ins, ``clip``: a CLIP spec (``"toy"``) or a ``CLIPModel`` with its
    ``clip_tokenizer``, which the pipeline wraps in a :class:`~blendedit.ranking.ClipRanker`.

    ``spec``: ``toy`` (the shipped 64 px Shapes World model with its CLIP), ``tiny-random``
    (random, for tests), a folder with ``unet/`` and ``scheduler/`` (a ``DDPMPipeline`` folder),
    or a hub id of such a repository.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"model: expected a model name, folder or hub id, got {spec!r}")
    if spec == "tiny-random":
        from .tiny import build_tiny_pixel_components

        return build_tiny_pixel_components()
    if spec == "toy":
        c = _pixel_folder(toy_folder("pixel"), "toy", True) | pixel_edit_defaults("toy")
        c["clip"] = "toy"  # ranks; the one tuned on the model's x̂0 guides, when shipped
        if (TOY_DIR / TOY_CLIPS["toy-guide"]).is_dir():
            c["guide_clip"] = "toy-guide"
        return c
    path = Path(spec).expanduser()
    if path.is_dir():
        return _pixel_folder(path, spec, True) | pixel_edit_defaults(spec)
    if _looks_like_path(spec):
        raise ModelNotFoundError(f"model: no such folder: {spec!r}")
    return _pixel_folder(spec, spec, local_files_only)


def _pixel_folder(source, spec: str, local_files_only) -> dict:
    import torch

    with quiet_transformers():
        from diffusers import DDPMScheduler, UNet2DModel

        try:
            unet = UNet2DModel.from_pretrained(
                str(source),
                subfolder="unet",
                local_files_only=local_files_only,
                **dtype_kwargs(torch.float32),
            )
            scheduler = DDPMScheduler.from_pretrained(
                str(source), subfolder="scheduler", local_files_only=local_files_only
            )
        except Exception as e:
            where = (
                "a folder needs unet/ and scheduler/ (a DDPMPipeline folder)"
                if Path(str(source)).is_dir()
                else HUB_HELP.format(spec=spec)
            )
            raise ModelNotFoundError(
                f"model: cannot load the pixel model {spec!r}: {where}. "
                f"({type(e).__name__}: {str(e).splitlines()[0]})"
            ) from e
    return dict(unet=unet.eval(), scheduler=scheduler)
