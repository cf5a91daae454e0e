"""One edit from files to files: the path that `blendedit edit`, `demo` and `batch` share.

:func:`load_pipeline` resolves a model spec, device and precision once; :func:`run_edit` checks a
request's inputs, edits and writes the ranked results, the JSON sidecar and the contact sheet
(all or nothing, never over an input).
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from . import __version__
from .io import DEFAULT_MAX_PIXELS

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_RANK_MODEL = "openai/clip-vit-base-patch32"


@dataclass
class ModelSpec:
    """Which model to load and where: the CLI's --model, --method, --config, --vae, --refiner,
    --scheduler, --rank-model, --device and --dtype."""

    model: str = DEFAULT_MODEL
    method: str = "latent"  # latent (Blended Latent Diffusion) or pixel (Blended Diffusion)
    config: str | None = None
    vae: str | None = None  # another VAE for the latent method
    refiner: str | None = None  # an SDXL refiner for the latent method
    scheduler: str = "ddim"
    rank_model: str = "auto"  # auto, none, or a CLIP folder / hub id
    device: str = "auto"
    dtype: str = "auto"
    loras: tuple = ()  # latent method: "FILE[:SCALE]" each, fused in this order
    embeddings: tuple = ()  # latent method, SD and SDXL: "FILE[:TOKEN]" each


@dataclass
class EditRequest:
    """One edit: input files, prompt, seed and options (fields of the method's options class:
    :class:`LatentEditOptions` or :class:`PixelEditOptions`)."""

    image: str
    prompt: str
    mask: str | None = None  # None: the image's transparency is the mask (or mask_prompt's)
    seed: int | None = None  # None: random, recorded in the sidecar
    options: dict = field(default_factory=dict)
    mask_threshold: float = 0.5
    invert_mask: bool = False
    resize_mask: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    mask_prompt: str | None = None  # a text naming the region: the mask is found from it
    mask_finding: dict = field(default_factory=dict)  # TextMaskOptions fields (references, grow)


@dataclass
class LoadedModel:
    pipe: object
    spec: ModelSpec
    rank_model: str | None  # what ranks results, as recorded in sidecars
    device: str
    dtype: str
    warnings: list[str] = field(default_factory=list)  # about the loading, for every edit


METHODS = ("latent", "pixel")
#: Types of the options whose default is None (for parsing them from text).
NONE_DEFAULT_TYPES = {
    "strength": float,
    "skip_timesteps": int,
    "decoder_lr": float,
    "guidance_scale": float,
    "clip_guidance_scale": float,
}
#: Integer options that also take "auto".
AUTO_INT_OPTIONS = ("shrink_iterations",)


def int_or_auto(name: str, text: str) -> int | str:
    """An "auto"-able integer option from text; ``ValueError`` naming the option otherwise."""
    v = text.strip().lower()
    if v == "auto":
        return "auto"
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"{name}: expected an integer or auto, got {text!r}") from None


TRUE_WORDS = ("true", "yes", "1", "on")
FALSE_WORDS = ("false", "no", "0", "off")
#: Options whose default is a word but which also take true/false.
WORD_OR_BOOL_OPTIONS = {"crop_to_mask": ("auto", "zoom", "crop")}


def option_from_text(name: str, text: str, default):
    """An edit option's value from text (a command-line flag or a manifest cell), as the type of
    its ``default``; ``ValueError`` naming the option when the text is not one. Options with a
    word default (scheduler, background, ...) are returned as given: the pipeline checks them."""
    if name in AUTO_INT_OPTIONS:
        return int_or_auto(name, text)
    v = text.strip().lower()
    words = WORD_OR_BOOL_OPTIONS.get(name)
    if isinstance(default, bool) or words:
        if v in TRUE_WORDS:
            return True
        if v in FALSE_WORDS:
            return False
        if words and v in words:
            return v
        said = [*(words or ())[:1], "true", "false", *(words or ())[1:]]
        expected = ", ".join(said[:-1]) + " or " + said[-1]
        raise ValueError(f"{name}: expected {expected}, got {text!r}")
    if isinstance(default, str):
        return text
    kind_of = NONE_DEFAULT_TYPES.get(name, float) if default is None else type(default)
    try:
        return int(v) if kind_of is int else float(v)
    except ValueError:
        kind = "an integer" if kind_of is int else "a number"
        raise ValueError(f"{name}: expected {kind}, got {text!r}") from None


def resolve_device(device: str = "auto", dtype: str = "auto") -> tuple[str, str]:
    """``auto`` device: cuda when there is one, else cpu; ``auto`` dtype: float16 on a GPU,
    float32 on the CPU. Returns the names."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "float16" if device.startswith("cuda") else "float32"
    return device, dtype


def load_pipeline(spec: ModelSpec, num_images: int = 1) -> LoadedModel:
    """Load the pipeline (and its ranker) once; ``num_images`` decides the ``auto`` ranker."""
    import torch

    from . import models
    from .latent import BlendedLatentDiffusionPipeline
    from .pixel import BlendedDiffusionPipeline

    if spec.method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {spec.method!r}")
    device, dtype = resolve_device(spec.device, spec.dtype)
    rank_model = spec.rank_model
    is_builtin = spec.model in models.BUILTIN_MODELS
    if spec.method == "pixel":  # its CLIP guides and ranks: it cannot be turned off
        if spec.loras or spec.embeddings:
            what = "lora" if spec.loras else "embedding"
            raise ValueError(f"{what}: the pixel method takes no LoRA or embedding (not being SD)")
        if rank_model == "none":
            raise ValueError("rank_model: the pixel method needs a CLIP model (it guides with it)")
        clip = None if rank_model == "auto" and is_builtin else rank_model
        if clip == "auto":
            clip = DEFAULT_RANK_MODEL
        pipe = BlendedDiffusionPipeline.from_pretrained(spec.model, clip=clip)
        rank_model = clip or f"{spec.model} (built-in)"
        pipe.to(device, getattr(torch, dtype))
        return LoadedModel(pipe, spec, rank_model, device, dtype)
    default_ranker = rank_model == "auto" and not is_builtin and num_images > 1
    if rank_model == "auto":
        rank_model = DEFAULT_RANK_MODEL if default_ranker else None
    pipe = BlendedLatentDiffusionPipeline.from_pretrained(
        spec.model,
        scheduler=spec.scheduler,
        config=spec.config,
        vae=spec.vae,
        refiner=spec.refiner,
        ranker=None if rank_model == "none" or default_ranker else rank_model,
        loras=spec.loras,
        embeddings=spec.embeddings,
    )
    notes = []
    if default_ranker:  # a ranker nobody asked for never stops an edit
        pipe.ranker, notes = _default_ranker()
        rank_model = DEFAULT_RANK_MODEL if pipe.ranker is not None else None
    if spec.rank_model == "none":
        pipe.ranker = None
    elif rank_model is None and pipe.ranker is not None:
        rank_model = f"{spec.model} (built-in)"
    pipe.to(device, getattr(torch, dtype))
    rank_model = None if rank_model == "none" else rank_model
    return LoadedModel(pipe, spec, rank_model, device, dtype, notes)


def _sampler_used(loaded: LoadedModel, method: str, opts) -> str:
    """The sampler an edit ran with, for its sidecar: a flow-matching model keeps its own."""
    if method != "latent":
        return opts.sampler
    if getattr(loaded.pipe, "is_flow", False):
        return "flow-match euler (the model's own)"
    return loaded.spec.scheduler


def _default_ranker():
    """The default ranking CLIP, or None and a one-line warning when it cannot be loaded (not
    cached offline, say): the samples are then returned unranked."""
    from .models import ModelNotFoundError
    from .ranking import ClipRanker

    try:
        return ClipRanker.from_pretrained(DEFAULT_RANK_MODEL), []
    except ModelNotFoundError as e:
        why = str(e).rsplit("(", 1)[-1].rstrip(")")
        return None, [
            f"results are unranked: the default ranking CLIP {DEFAULT_RANK_MODEL} could not be "
            f"loaded ({why}); --rank-model names another (a folder or hub id), --rank-model "
            "none turns ranking off without this warning"
        ]


def load_inputs(req: EditRequest):
    """The request's image and mask, validated (``ValueError`` naming what is wrong)."""
    from . import io

    if not isinstance(req.max_pixels, int) or req.max_pixels < 1:
        raise ValueError(f"max_pixels: must be a positive integer, got {req.max_pixels!r}")
    image = io.load_image(req.image, max_pixels=req.max_pixels)
    if req.mask_prompt is not None:  # found by the model when the edit runs
        from .text_mask import TextMaskOptions

        if req.mask is not None:
            raise ValueError("mask_prompt: give either a mask or a mask_prompt, not both")
        TextMaskOptions(**req.mask_finding).check(req.mask_prompt)
        return image, None
    mask = io.load_mask(
        req.image if req.mask is None else req.mask,
        image=image,
        from_alpha=req.mask is None,
        threshold=req.mask_threshold,
        resize=req.resize_mask and req.mask is not None,
        invert=req.invert_mask,
        max_pixels=req.max_pixels,
    )
    return image, mask


def check_mask_prompt(req: EditRequest, method: str) -> None:
    """A mask found from words needs a text-conditioned (latent) model."""
    if req.mask_prompt is not None and method != "latent":
        raise ValueError(
            "mask_prompt: the region is found with a text-conditioned (latent) model; the "
            "pixel method's takes no text: pass --mask, or find it first with `blendedit "
            "mask IMAGE --mask-prompt TEXT --out MASK.png`"
        )


def options_class(method: str):
    """The options dataclass of ``method``."""
    from .latent import LatentEditOptions
    from .pixel import PixelEditOptions

    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    return LatentEditOptions if method == "latent" else PixelEditOptions


def edit_options(options: dict, method: str = "latent"):
    """The method's options dataclass from a dict; an option of the other method, or of none,
    is a ``ValueError`` naming it."""
    cls = options_class(method)
    other = "pixel" if method == "latent" else "latent"
    known = set(asdict(cls()))
    theirs = set(asdict(options_class(other)())) - known
    wrong = sorted(set(options) & theirs)
    if wrong:
        raise ValueError(
            f"options: {', '.join(map(repr, wrong))} apply to the {other} method, not {method} "
            f"(CLI: --method {other})"
        )
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"options: unknown option(s) {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(sorted(known))}"
        )
    return cls(**options)


def check_seed(seed, n: int) -> int:
    if seed is None:
        return random.randrange(2**31)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 2**63 - 1 - n:
        raise ValueError(f"seed: must be an integer in [0, 2**63 - 1 - n], got {seed!r}")
    return seed


def run_edit(
    loaded: LoadedModel,
    req: EditRequest,
    out_dir: str | Path,
    *,
    command: str = "edit",
    progress: bool = False,
    warn=None,
    callback=None,
    inputs=None,
) -> tuple[list[Path], dict]:
    """Edit ``req`` and write its results into ``out_dir``; returns (paths written, sidecar).

    Inputs and the output folder are checked before sampling; warnings go to ``warn`` (a
    callable taking a line; default: stderr) as well as into the sidecar. ``callback(step, t,
    latents)`` runs after every denoising step. ``inputs``: the (image, mask) that
    :func:`load_inputs` already returned for ``req``, so they are not read twice.
    """
    import torch

    from . import io
    from .outputs import write_results

    image, mask = inputs if inputs is not None else load_inputs(req)
    method = loaded.spec.method
    opts = edit_options(req.options, method)
    from .models import EDIT_DEFAULT_KEYS

    key = EDIT_DEFAULT_KEYS[method][0]  # the sidecar records the guidance it ran with
    opts = replace(opts, **{key: loaded.pipe.guidance_or_default(getattr(opts, key))})
    out_dir = io.check_output_folder(out_dir)
    n = opts.num_images_per_prompt * getattr(opts, "num_batches", 1)
    seed = check_seed(req.seed, n)

    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    kwargs = asdict(opts)
    if method == "latent":
        kwargs["negative_prompt"] = opts.negative_prompt or None
    if req.mask_prompt is not None:
        check_mask_prompt(req, method)
        kwargs |= dict(mask_prompt=req.mask_prompt, mask_options=req.mask_finding)
    t0 = time.perf_counter()
    result = loaded.pipe(
        req.prompt, image, mask, generator=gens, progress=progress, callback=callback, **kwargs
    )
    wall = time.perf_counter() - t0
    result.warnings[:0] = loaded.warnings  # the loading's too: in the sidecar and on stderr
    meta = dict(
        blendedit=__version__,
        command=command,
        image=str(req.image),
        mask=str(req.mask) if req.mask is not None else "alpha of image",
        **({"mask_prompt": result.mask_info} if getattr(result, "mask_info", None) else {}),
        prompt=req.prompt,
        model=loaded.spec.model,
        method=method,
        **_model_kind(loaded.pipe, method),
        scheduler=_sampler_used(loaded, method, opts),
        rank_model=loaded.rank_model,
        ranked=getattr(loaded.pipe, "ranker", None) is not None,
        device=loaded.device,
        dtype=loaded.dtype,
        options=asdict(opts),
        seed=seed,
        wall_seconds=round(wall, 3),
    )
    if getattr(loaded.pipe, "loras", None):  # each file's name, SHA-256 and scale
        from .lora import sidecar_records

        meta["loras"] = sidecar_records(loaded.pipe)
    if getattr(loaded.pipe, "embeddings", None):  # each file's name, SHA-256 and token
        meta["embeddings"] = list(loaded.pipe.embeddings)
    inputs = [Path(req.image)] + ([Path(req.mask)] if req.mask is not None else [])
    written, sidecar = write_results(
        out_dir,
        Path(req.image).stem,
        image,
        result,
        seed,
        meta,
        inputs,
        latents=pixels_sha256(image) if method == "latent" else None,
    )
    for w in result.warnings:
        (warn or (lambda line: print(line, file=sys.stderr)))(f"blendedit: warning: {w}")
    return written, sidecar


def _model_kind(pipe, method: str) -> dict:
    """The sidecar's words on the model: its family and inpainting kind (latent method)."""
    if method != "latent":
        return {}
    return dict(family=pipe.family, inpainting=pipe.inpaint)


def pixels_sha256(image) -> str:
    """sha256 of an image's size and RGB pixels (not of its file: a re-saved copy matches)."""
    import hashlib

    rgb = image.convert("RGB")
    return hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode() + rgb.tobytes()).hexdigest()


def read_edit(sidecar_path: str | Path, image: str | Path | None = None):
    """An earlier latent edit from its sidecar: (sidecar, source image, a
    :class:`BlendedLatentDiffusionOutput` holding its latents, mask, crop box and order).

    ``image``: the source image (default: the path the sidecar records, relative to the working
    folder as it was given). Errors name what is missing or does not match."""
    import json

    from PIL import Image
    from safetensors import SafetensorError, safe_open

    from . import io
    from .latent import BlendedLatentDiffusionOutput

    sidecar_path = Path(sidecar_path)
    try:
        meta = json.loads(sidecar_path.read_text())
    except OSError as e:
        raise ValueError(f"sidecar: cannot read {str(sidecar_path)!r}: {e.strerror}") from e
    except ValueError as e:
        raise ValueError(f"sidecar: {str(sidecar_path)!r} is not JSON: {e}") from e
    if not isinstance(meta, dict) or "results" not in meta:
        raise ValueError(f"sidecar: {str(sidecar_path)!r} is not a blendedit sidecar")
    if meta.get("method", "latent") != "latent" or not meta.get("latents"):
        raise ValueError(
            f"sidecar: {str(sidecar_path)!r} records no latents (only latent-method edits "
            "keep them; edits written before this version did not)"
        )
    latents_path = sidecar_path.parent / meta["latents"]
    try:
        with safe_open(latents_path, "pt") as f:
            info = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError) as e:
        raise ValueError(f"latents: cannot read {str(latents_path)!r}: {e}") from e
    image_path = Path(image if image is not None else meta["image"])
    source = io.load_image(image_path)
    if pixels_sha256(source) != info.get("image_sha256"):
        raise ValueError(
            f"image: {str(image_path)!r} is not the image this edit was made from (its pixels "
            "differ); pass the source image with --image"
        )
    mask = Image.fromarray(tensors["mask"].numpy(), "L")
    if "mask_size" in info:  # the box's part of the mask (files of before: the whole mask)
        whole = Image.new("L", tuple(json.loads(info["mask_size"])), 0)
        whole.paste(mask, tuple(json.loads(info["crop_box"])[:2]))
        mask = whole
    z = tensors["latents"]
    order = json.loads(info["order"])
    out = BlendedLatentDiffusionOutput(
        images=[],
        scores=None,
        order=order,
        latents=z,
        source_latents=z[:0],
        mask=mask,
        latent_mask=z[:0],
        mask_schedule=[],
        crop_box=tuple(json.loads(info["crop_box"])),
        timings={},
        zoomed=json.loads(info.get("zoomed", "false")),  # absent in files of before zoom
        detailed=json.loads(info.get("detailed", "false")),
    )
    return meta, source, out


def recorded_spec(meta: dict, model: str | None = None, **where) -> ModelSpec:
    """The :class:`ModelSpec` that reproduces a sidecar's edit: its model (or ``model``), the
    sampler it names (a flow model's own sampler, recorded by name, is what the default gives
    it), its ranker and its LoRAs (checked by their SHA-256 when the edit is reconstructed);
    ``where``: device and dtype."""
    from .options import SCHEDULERS

    rank = meta.get("rank_model")
    rank = "none" if rank is None else "auto" if rank.endswith("(built-in)") else rank
    return ModelSpec(
        model=model or meta.get("model", DEFAULT_MODEL),
        scheduler=meta.get("scheduler") if meta.get("scheduler") in SCHEDULERS else "ddim",
        rank_model=rank,
        loras=tuple((r["path"], r["scale"]) for r in meta.get("loras", [])),
        **where,
    )


def reconstruct_from_sidecar(
    loaded: LoadedModel,
    sidecar_path: str | Path,
    out_dir: str | Path,
    options: dict,
    *,
    image: str | Path | None = None,
    edit=None,
) -> tuple[list[Path], dict]:
    """Redo the background step of an earlier latent edit (``background``, ``feather`` and
    ``decoder_*`` options) from the latents its sidecar lists, without sampling again; write the
    results as an edit does, named ``{stem}-{background}``. Returns (paths, sidecar).
    ``edit``: what :func:`read_edit` already returned for these arguments, so the sidecar, the
    latents and the image are not read twice."""
    from . import io
    from .latent import LatentEditOptions
    from .outputs import write_results

    meta, source, earlier = edit if edit is not None else read_edit(sidecar_path, image)
    if meta.get("loras") or getattr(loaded.pipe, "loras", None):
        from .lora import check_recorded

        check_recorded(loaded.pipe, meta.get("loras", []))  # the same files, by SHA-256
    out_dir = io.check_output_folder(out_dir)
    opts = dict(meta.get("options", {}))
    kept = {k: v for k, v in opts.items() if k in ("feather", "rank_region")}
    kept.update(options)
    t0 = time.perf_counter()
    result = loaded.pipe.reconstruct_background(earlier, source, meta.get("prompt"), **kept)
    wall = time.perf_counter() - t0
    seed = int(meta["seed"])
    # ``order`` holds sample indices of the original edit, so names keep their seeds
    new = dict(meta) | dict(
        blendedit=__version__,
        command="reconstruct",
        reconstructed_from=str(sidecar_path),
        options=opts | kept,
        wall_seconds=round(wall, 3),
    )
    for key in ("results", "timings", "warnings", "contact_sheet", "latents", "crop_box"):
        new.pop(key, None)
    stem = f"{Path(meta['image']).stem}-{kept.get('background', LatentEditOptions.background)}"
    inputs = [Path(sidecar_path), Path(image if image is not None else meta["image"])]
    return write_results(out_dir, stem, source, result, seed, new, inputs)
