"""Every row of docs/errors.md, checked: the library's exception and message, the CLI's exit code
and one-line message, input files unchanged, and no result or temporary file after an error.

The table is the specification: rows are read from the document, and each row's id names one
case below that builds the bad input. A row without a case, or a case without a row, fails.
"""

from __future__ import annotations

import errno
import hashlib
import io as pyio
import json
import re
import struct
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_sd_folder
from PIL import Image, ImageDraw

import blendedit.io as bio
from blendedit import BlendedLatentDiffusionPipeline, load_image, load_mask
from blendedit.cli import main
from blendedit.io import check_output_folder, write_files_atomically
from blendedit.outputs import write_results
from blendedit.ranking import ClipRanker

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
ROW = re.compile(r"^\| `([a-z0-9-]+)` \| (.*?) \| (\S+) \| (\S+) \| (.*) \|$")


@dataclass
class Row:
    id: str
    exception: str  # class name, "accepted" or "n/a"
    exit: str  # a number or "n/a"
    message: str  # the cell


def read_rows() -> list[Row]:
    rows = []
    for line in DOC.read_text().splitlines():
        m = ROW.match(line)
        if m:
            rows.append(Row(m[1], m[3], m[4], m[5]))
    return rows


def phrase(cell: str) -> str | None:
    """The phrase in code quotes a message must contain (None: accepted with no warning)."""
    m = re.match(r"`([^`]+)`", cell)
    return m[1] if m else None


@dataclass
class Case:
    argv: list[str] | None = None  # the CLI arguments (None: library only)
    lib: Callable | None = None  # the library call (None: CLI only)
    check: Callable[[Path], None] | None = None  # for accepted input: checks the CLI's outputs
    setup: Callable | None = None  # setup(monkeypatch) before each of lib and argv
    on_error: Callable[[Path], None] | None = None  # checks what a batch keeps after an error


@dataclass
class Ctx:
    d: Path  # inputs live here; hashed before and after
    out: Path
    pipe: BlendedLatentDiffusionPipeline
    mp: pytest.MonkeyPatch
    made: dict = field(default_factory=dict)

    # -- inputs --
    def image(self, name="photo.png", size=64) -> Path:
        rng = np.random.RandomState(0)
        p = self.d / name
        Image.fromarray((rng.rand(size, size, 3) * 255).astype(np.uint8)).save(p)
        return p

    def mask(self, name="mask.png", size=64, value=255, box=(16, 40, 20, 44)) -> Path:
        m = np.zeros((size, size), np.uint8)
        y0, y1, x0, x1 = box
        m[y0:y1, x0:x1] = value
        p = self.d / name
        Image.fromarray(m).save(p)
        return p

    def write(self, name: str, data: bytes) -> Path:
        p = self.d / name
        p.write_bytes(data)
        return p

    def save(self, img: Image.Image, name: str, **kw) -> Path:
        p = self.d / name
        img.save(p, **kw)
        return p

    # -- calls --
    def argv(self, image, mask=None, *extra, prompt="a red circle", model="tiny-random"):
        args = ["edit", str(image)]
        args += ["--mask", str(mask)] if mask is not None else []
        args += ["--prompt", prompt, "--model", model, "--steps", "2", "--seed", "0"]
        return [*args, "--out", str(self.out), "--quiet", *extra]

    def edit(self, image, mask, prompt="a red circle", **kw):
        return lambda: self.pipe(
            prompt,
            image,
            mask,
            num_inference_steps=kw.pop("num_inference_steps", 2),
            generator=kw.pop("generator", torch.Generator().manual_seed(0)),
            **kw,
        )


def png_bomb(w: int, h: int) -> bytes:
    """A valid PNG header declaring w x h 1-bit pixels, with a few bytes of data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = pyio.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def results(out: Path) -> tuple[dict, list[np.ndarray]]:
    meta = json.loads(next(out.glob("*.json")).read_text())
    return meta, [np.asarray(Image.open(out / r["file"])).astype(int) for r in meta["results"]]


def keeps_outside(src: Image.Image, keep: np.ndarray) -> Callable[[Path], None]:
    """Check: every result equals ``src`` wherever ``keep`` is true."""

    def check(out: Path) -> None:
        _, imgs = results(out)
        a = np.asarray(src).astype(int)
        assert imgs and all(np.abs(im - a)[keep].max() == 0 for im in imgs)

    return check


CASES: dict[str, Callable[[Ctx], Case]] = {}


def case(fn):
    CASES[fn.__name__.replace("_", "-")] = fn
    return fn


# --- image files ---------------------------------------------------------------------------


@case
def image_missing(c):
    p = c.d / "nope.png"
    return Case(c.argv(p, c.mask()), lambda: load_image(p))


@case
def image_folder(c):
    (c.d / "pics.png").mkdir()
    return Case(c.argv(c.d / "pics.png", c.mask()), lambda: load_image(c.d / "pics.png"))


@case
def image_unreadable(c):
    p = c.image()
    real_open = Image.open

    def deny(fp, *a, **k):
        if Path(str(fp)) == p:
            raise PermissionError(errno.EACCES, "Permission denied", str(p))
        return real_open(fp, *a, **k)

    # monkeypatched: the tests run as root here, for whom chmod 000 still reads
    return Case(
        c.argv(p, c.mask()), lambda: load_image(p), setup=lambda m: m.setattr(Image, "open", deny)
    )


@case
def image_empty_file(c):
    p = c.write("zero.png", b"")
    return Case(c.argv(p, c.mask()), lambda: load_image(p))


@case
def image_not_an_image(c):
    p = c.write("notes.png", b"these are my notes, not a picture\n")
    return Case(c.argv(p, c.mask()), lambda: load_image(p))


@case
def image_truncated_png(c):
    data = c.image().read_bytes()
    p = c.write("cut.png", data[: len(data) // 2])
    return Case(c.argv(p, c.mask()), lambda: load_image(p))


@case
def image_truncated_jpeg(c):
    data = encoded(load_image(c.image()), "JPEG", quality=95)
    p = c.write("cut.jpg", data[: len(data) // 2])
    return Case(c.argv(p, c.mask()), lambda: load_image(p))


@case
def image_animated_gif(c):
    frames = [Image.new("RGB", (64, 64), (i * 80, 0, 0)) for i in range(3)]
    p = c.save(frames[0], "anim.gif", save_all=True, append_images=frames[1:])
    return Case(c.argv(p, c.mask()), lambda: load_image(p))


@case
def image_animated_apng(c):
    frames = [Image.new("RGB", (64, 64), (0, i * 120, 0)) for i in range(2)]
    p = c.save(frames[0], "anim.png", save_all=True, append_images=frames[1:])
    return Case(c.argv(p, c.mask()), lambda: load_image(p))


@case
def image_decompression_bomb(c):
    p = c.write("bomb.png", png_bomb(20_000, 20_000))
    assert p.stat().st_size < 1000
    return Case(c.argv(p, c.mask()), lambda: load_image(p))


@case
def image_over_pixel_limit(c):
    p = c.image()
    assert load_image(p, max_pixels=64 * 64).size == (64, 64)  # at the limit: accepted
    return Case(c.argv(p, c.mask(), "--max-pixels", "1000"), lambda: load_image(p, max_pixels=1000))


@case
def image_wrong_type(c):
    return Case(None, lambda: load_image(42))


@case
def image_nan_array(c):
    a = np.zeros((8, 8, 3), np.float32)
    a[2, 3, 1] = np.nan
    return Case(None, lambda: load_image(a))


@case
def image_cmyk_jpeg(c):
    p = c.save(load_image(c.image()).convert("CMYK"), "print.jpg", quality=95)
    mask = c.mask()
    keep = np.asarray(Image.open(mask)) == 0
    return Case(
        c.argv(p, mask),
        lambda: load_image(p).mode == "RGB" or pytest.fail("not RGB"),
        keeps_outside(load_image(p), keep),
    )


@case
def image_16_bit_png(c):
    a = np.full((64, 64), 65535, np.uint16)
    a[:, :32] = 32896  # 128 * 257
    p = c.save(Image.fromarray(a), "deep.png")
    mask = c.mask()
    keep = np.asarray(Image.open(mask)) == 0

    def lib():
        rgb = np.asarray(load_image(p))
        assert rgb[0, 0].tolist() == [128] * 3 and rgb[0, 63].tolist() == [255] * 3

    return Case(c.argv(p, mask), lib, keeps_outside(load_image(p), keep))


@case
def image_palette_transparency(c):
    img = Image.new("P", (64, 64), 1)
    img.putpalette([10, 20, 30, 200, 100, 50] + [0, 0, 0] * 254)
    img.paste(0, (0, 0, 32, 64))
    p = c.save(img, "pal.png", transparency=0)
    mask = c.mask()
    keep = np.asarray(Image.open(mask)) == 0

    def lib():
        rgb = load_image(p)
        assert rgb.getpixel((0, 0)) == (10, 20, 30) and rgb.getpixel((63, 0)) == (200, 100, 50)
        alpha = np.asarray(load_mask(p, from_alpha=True))
        assert alpha[:, :32].min() == 255 and alpha[:, 32:].max() == 0

    return Case(c.argv(p, mask), lib, keeps_outside(load_image(p), keep))


# --- masks ---------------------------------------------------------------------------------


@case
def mask_missing(c):
    p = c.d / "nomask.png"
    return Case(c.argv(c.image(), p), lambda: load_mask(p))


@case
def mask_empty(c):
    m = c.mask(value=0)
    return Case(c.argv(c.image(), m), lambda: load_mask(m))


@case
def mask_soft_below_threshold(c):
    m = c.mask(value=77)  # 0.30
    return Case(c.argv(c.image(), m), lambda: load_mask(m))


@case
def mask_other_size(c):
    img, m = c.image(), c.mask(size=32, box=(4, 20, 4, 20))
    assert load_mask(m, image=load_image(img), resize=True).size == (64, 64)  # the way out
    return Case(c.argv(img, m), lambda: load_mask(m, image=load_image(img)))


@case
def mask_colour_channels(c):
    img = c.image()
    m = c.save(load_image(img), "overlay.png")  # a photo given as the mask
    return Case(c.argv(img, m), lambda: load_mask(m))


@case
def mask_no_alpha(c):
    img = c.image()
    return Case([*c.argv(img), "--mask-from-alpha"], lambda: load_mask(img, from_alpha=True))


@case
def mask_no_latent_cell(c):
    img, m = c.image(), c.mask(box=(17, 20, 17, 20))  # inside one 8x8 cell, off its corner
    return Case(
        c.argv(img, m, "--mask-downsample", "nearest"),
        c.edit(load_image(img), load_mask(m), mask_downsample="nearest"),
    )


@case
def mask_and_alpha(c):
    return Case(c.argv(c.image(), c.mask(), "--mask-from-alpha"))


# --- masks from words -------------------------------------------------------------------------


def _found(c, text, *flags, **options):
    """`edit --mask-prompt TEXT` on tiny-random, and ``pipe.mask_from_text`` (None: CLI only)."""
    img = c.image()
    argv = c.argv(img, None, "--mask-prompt", text, *flags)
    return Case(argv, lambda: c.pipe.mask_from_text(Image.open(img), text, **options))


@case
def mask_prompt_empty(c):
    return _found(c, " ")


@case
def mask_prompt_matches_nothing(c):
    return _found(c, "a red circle")  # random weights: the text helps nowhere


@case
def mask_prompt_and_mask(c):
    return Case(c.argv(c.image(), c.mask(), "--mask-prompt", "a red circle"))


@case
def mask_prompt_pixel_method(c):
    return Case(c.argv(c.image(), None, "--mask-prompt", "a red circle", "--method", "pixel"))


@case
def mask_reference_is_the_text(c):
    flags = ("--mask-reference", "a red circle")
    return _found(c, "a red circle", *flags, references=("a red circle",))


@case
def mask_min_gain_out_of_range(c):
    return _found(c, "a red circle", "--mask-min-gain", "1.5", min_gain=1.5)


@case
def mask_out_not_png(c):
    argv = ["mask", str(c.image()), "--mask-prompt", "a red circle", "--model", "tiny-random"]
    return Case([*argv, "--out", str(c.out / "mask.jpg")])


@case
def mask_threshold_out_of_range(c):
    m = c.mask()
    return Case(
        c.argv(c.image(), m, "--mask-threshold", "1.5"), lambda: load_mask(m, threshold=1.5)
    )


@case
def mask_soft(c):
    img = c.image()
    ramp = np.tile(np.linspace(0, 255, 64).round().astype(np.uint8), (64, 1))
    m = c.save(Image.fromarray(ramp), "ramp.png")

    def lib():
        soft = np.asarray(load_mask(m, threshold=None))
        hard = np.asarray(load_mask(m))
        assert len(np.unique(soft)) > 2 and set(np.unique(hard)) == {0, 255}

    return Case(c.argv(img, m), lib, keeps_outside(load_image(img), ramp < 128))


@case
def mask_inverted(c):
    img = c.image()
    m = np.full((64, 64), 255, np.uint8)
    m[16:40, 20:44] = 0  # black = edit
    mp = c.save(Image.fromarray(m), "black-is-edit.png")

    def lib():
        assert (np.asarray(load_mask(mp, invert=True)) == 255 - m).all()

    return Case(c.argv(img, mp, "--invert-mask"), lib, keeps_outside(load_image(img), m == 255))


@case
def mask_all_white(c):
    img, m = c.image(), c.mask(box=(0, 64, 0, 64))
    return Case(c.argv(img, m), c.edit(load_image(img), load_mask(m)), lambda out: None)


# --- prompts -------------------------------------------------------------------------------


@case
def prompt_empty(c):
    img, m = c.image(), c.mask()
    return Case(c.argv(img, m, prompt="   "), c.edit(load_image(img), load_mask(m), prompt=""))


@case
def prompt_not_a_string(c):
    img, m = c.image(), c.mask()
    return Case(None, c.edit(load_image(img), load_mask(m), prompt=3))


@case
def prompt_too_long(c):
    img, m = c.image(), c.mask()
    long = "red " * 100
    return Case(
        c.argv(img, m, prompt=long), c.edit(load_image(img), load_mask(m), prompt=long), None
    )


@case
def prompt_non_ascii(c):
    img, m = c.image(), c.mask()
    text = "un cœur rouge ❤ 赤い"

    def lib():
        ids = c.pipe.tokenizer(text).input_ids
        assert len(ids) > 4 and ids != c.pipe.tokenizer("un coeur rouge").input_ids
        c.edit(load_image(img), load_mask(m), prompt=text)()

    def check(out):
        raw = next(out.glob("*.json")).read_text(encoding="utf-8")
        assert text in raw and json.loads(raw)["prompt"] == text

    return Case(c.argv(img, m, prompt=text), lib, check)


# --- numbers -------------------------------------------------------------------------------


def _option_case(c, flags: list[str], **lib_kw) -> Case:
    img, m = c.image(), c.mask()
    lib = c.edit(load_image(img), load_mask(m), **lib_kw) if lib_kw else None
    return Case(c.argv(img, m, *flags), lib)


@case
def steps_zero(c):
    return _option_case(c, ["--steps", "0"], num_inference_steps=0)


@case
def steps_not_a_number(c):
    return _option_case(c, ["--steps", "many"])


@case
def strength_out_of_range(c):
    return _option_case(c, ["--strength", "1.5"], strength=1.5)


@case
def strength_runs_no_step(c):
    return _option_case(
        c, ["--strength", "0.1", "--steps", "4"], strength=0.1, num_inference_steps=4
    )


@case
def guidance_negative(c):
    return _option_case(c, ["--guidance-scale", "-1"], guidance_scale=-1.0)


@case
def guidance_nan(c):
    return _option_case(c, ["--guidance-scale", "nan"], guidance_scale=float("nan"))


@case
def results_zero(c):
    return _option_case(c, ["-n", "0"], num_images_per_prompt=0)


@case
def seed_negative(c):
    return _option_case(c, ["--seed", "-1"])


@case
def generator_wrong_type(c):
    img, m = c.image(), c.mask()
    return Case(None, c.edit(load_image(img), load_mask(m), generator=5))


@case
def choice_unknown(c):
    return _option_case(c, ["--background", "blur"])


@case
def option_of_the_other_method(c):
    from blendedit.runner import edit_options

    case = _option_case(c, ["--clip-guidance-scale", "500"])
    case.lib = lambda: edit_options({"clip_guidance_scale": 500.0}, "latent")
    return case


@case
def pixel_lpips_unavailable(c):
    from blendedit import BlendedDiffusionPipeline

    img, m = c.image(), c.mask()
    pixel = BlendedDiffusionPipeline.from_pretrained("tiny-random")
    return Case(
        c.argv(
            img, m, "--method", "pixel", "--skip-timesteps", "0", "--background-lpips-scale", "1"
        ),
        lambda: pixel("a red circle", load_image(img), load_mask(m), background_lpips_scale=1.0),
    )


@case
def pixel_without_clip(c):
    return _option_case(c, ["--method", "pixel", "--rank-model", "none"])


# --- models --------------------------------------------------------------------------------


def _model_case(c, spec: str, lib=None) -> Case:
    lib = lib or (lambda: BlendedLatentDiffusionPipeline.from_pretrained(spec))
    return Case(c.argv(c.image(), c.mask(), model=spec), lib)


@case
def model_unknown_name(c):
    return _model_case(c, "sd15")


@case
def model_hub_offline(c):
    return _model_case(c, "nobody/no-such-model")


@case
def model_path_missing(c):
    return _model_case(c, "./no/such/folder")


@case
def model_folder_not_a_pipeline(c):
    (c.d / "weights").mkdir()
    (c.d / "weights" / "unet.safetensors").write_bytes(b"\0" * 16)
    return _model_case(c, str(c.d / "weights"))


@case
def model_folder_missing_component(c):
    folder = c.d / "sd"
    folder.mkdir()
    index = {"_class_name": "StableDiffusionPipeline", "safety_checker": [None, None]}
    for part, cls in [
        ("unet", ["diffusers", "UNet2DConditionModel"]),
        ("vae", ["diffusers", "AutoencoderKL"]),
        ("text_encoder", ["transformers", "CLIPTextModel"]),
        ("tokenizer", ["transformers", "CLIPTokenizer"]),
        ("scheduler", ["diffusers", "DDIMScheduler"]),
    ]:
        index[part] = cls
        if part != "unet":
            (folder / part).mkdir()
    (folder / "model_index.json").write_text(json.dumps(index))
    return _model_case(c, str(folder))


@case
def model_bad_defaults_file(c):
    folder = _sd_folder(c)
    (folder / "blendedit.json").write_text('{"guidance_scale": "strong"}')
    return _model_case(c, str(folder))


@case
def model_not_a_checkpoint(c):
    return _model_case(c, str(c.write("notes.txt", b"weights are elsewhere")))


@case
def model_corrupt_safetensors(c):
    rng = np.random.RandomState(1)
    return _model_case(c, str(c.write("model.safetensors", rng.bytes(4096))))


def _sd_folder(c) -> Path:
    folder, q = c.d / "sd", c.pipe
    parts = dict(unet=q.unet, vae=q.vae, text_encoder=q.text_encoder, tokenizer=q.tokenizer)
    save_sd_folder(folder, **parts, scheduler=q.scheduler)
    return folder


@case
def model_sdxl_file_sd_config(c):
    from blendedit.ldm_format import save_single_file
    from blendedit.tiny import build_tiny_sdxl_components

    f = save_single_file(build_tiny_sdxl_components(), c.d / "xl.safetensors")
    sd = _sd_folder(c)
    lib = lambda: BlendedLatentDiffusionPipeline.from_pretrained(str(f), config=str(sd))  # noqa: E731
    return Case(c.argv(c.image(), c.mask(), "--config", str(sd), model=str(f)), lib)


@case
def refiner_not_sdxl(c):
    from blendedit.tiny import save_tiny_sdxl

    base, sd = save_tiny_sdxl(c.d / "xl"), _sd_folder(c)
    lib = lambda: BlendedLatentDiffusionPipeline.from_pretrained(str(base), refiner=str(sd))  # noqa: E731
    return Case(c.argv(c.image(), c.mask(), "--refiner", str(sd), model=str(base)), lib)


@case
def vae_other_latent_size(c):
    from diffusers import AutoencoderKL

    cfg = {k: v for k, v in c.pipe.vae.config.items() if not k.startswith("_")}
    AutoencoderKL(**dict(cfg, latent_channels=8)).save_pretrained(c.d / "vae8")
    vae = str(c.d / "vae8")
    lib = lambda: BlendedLatentDiffusionPipeline.from_pretrained("tiny-random", vae=vae)  # noqa: E731
    return Case(c.argv(c.image(), c.mask(), "--vae", vae), lib)


def _flow_file(c, family: str, **kw) -> Path:
    """A tiny SD3 or Flux transformer saved under its original names, as these releases ship."""
    from safetensors.torch import save_file

    from blendedit.ldm_format import transformer_to_original
    from blendedit.tiny import build_tiny_flux_components, build_tiny_sd3_components

    build = build_tiny_sd3_components if family == "sd3" else build_tiny_flux_components
    state = build(**kw)["transformer"].state_dict()
    f = c.d / f"{family}.safetensors"
    save_file(transformer_to_original(family, state), str(f))
    return f


def _file_with_config(c, f: Path, config: Path) -> Case:
    lib = lambda: BlendedLatentDiffusionPipeline.from_pretrained(str(f), config=str(config))  # noqa: E731
    return Case(c.argv(c.image(), c.mask(), "--config", str(config), model=str(f)), lib)


@case
def model_flow_file_without_config(c):
    return _model_case(c, str(_flow_file(c, "sd3")))


@case
def model_flux_file_other_config(c):
    from blendedit.tiny import save_tiny_flux

    schnell = _flow_file(c, "flux", guidance_embeds=False)
    return _file_with_config(c, schnell, save_tiny_flux(c.d / "flux-dev"))


@case
def model_flux_file_sd3_config(c):
    from blendedit.tiny import save_tiny_sd3

    return _file_with_config(c, _flow_file(c, "flux"), save_tiny_sd3(c.d / "sd3"))


def _inpaint_file(c, family: str) -> Path:
    """A tiny inpainting checkpoint of ``family`` as one file (SD: the original layout of the
    whole pipeline; Flux Fill: the transformer under its original names)."""
    from safetensors.torch import save_file

    from blendedit.ldm_format import save_single_file, transformer_to_original
    from blendedit.tiny import build_tiny_inpaint_components

    parts = build_tiny_inpaint_components(family)["components"]
    f = c.d / f"{family}-inpaint.safetensors"
    if family == "flux":
        save_file(transformer_to_original("flux", parts["transformer"].state_dict()), str(f))
        return f
    return save_single_file(parts, f)


@case
def model_inpaint_file_base_config(c):
    from conftest import save_sd_folder

    from blendedit.models import load_sd_components

    parts = load_sd_components("tiny-random")
    keep = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    save_sd_folder(c.d / "sd", **{k: parts[k] for k in keep})
    return _file_with_config(c, _inpaint_file(c, "sd"), c.d / "sd")


@case
def model_fill_file_dev_config(c):
    from blendedit.tiny import save_tiny_flux

    return _file_with_config(c, _inpaint_file(c, "flux"), save_tiny_flux(c.d / "flux-dev"))


def _flow_model_case(c, family: str, flags: list[str], **lib_kw) -> Case:
    from blendedit.tiny import save_tiny_flux, save_tiny_sd3

    folder = str((save_tiny_sd3 if family == "sd3" else save_tiny_flux)(c.d / family))
    img, m = c.image(), c.mask()
    load = {k: lib_kw.pop(k) for k in ("scheduler", "refiner") if k in lib_kw}

    def lib():
        pipe = BlendedLatentDiffusionPipeline.from_pretrained(folder, **load)
        pipe("a red circle", load_image(img), load_mask(m), num_inference_steps=2, **lib_kw)

    return Case(c.argv(img, m, *flags, model=folder), lib)


@case
def refiner_flow_model(c):
    sd = str(_sd_folder(c))
    return _flow_model_case(c, "sd3", ["--refiner", sd], refiner=sd)


@case
def scheduler_flow_model(c):
    return _flow_model_case(c, "flux", ["--scheduler", "euler"], scheduler="euler")


@case
def negative_prompt_distilled_flux(c):
    flags = ["--negative-prompt", "blurry"]
    return _flow_model_case(c, "flux", flags, negative_prompt="blurry")


class _RunsCode:
    """Unpickling this runs a command: a plain pickle load would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@case
def model_pickle_checkpoint(c):
    marker = c.d.parent / "pickle-code-ran"
    p = c.d / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": _RunsCode(marker)}, p)

    def lib():
        try:
            BlendedLatentDiffusionPipeline.from_pretrained(str(p))
        finally:
            assert not marker.exists(), "the checkpoint's pickled code ran"

    return _model_case(c, str(p), lib)


@case
def rank_model_missing(c):
    return Case(
        c.argv(c.image(), c.mask(), "--rank-model", "./nowhere"),
        lambda: ClipRanker.from_pretrained("./nowhere"),
    )


# --- output --------------------------------------------------------------------------------


@case
def out_is_a_file(c):
    img = c.image()
    c.out = img  # --out is the input image itself
    return Case(c.argv(img, c.mask()), lambda: check_output_folder(img))


@case
def out_unwritable(c):
    c.out = Path("/proc/blendedit-out")
    return Case(c.argv(c.image(), c.mask()), lambda: check_output_folder(c.out))


@case
def out_overwrites_input(c):
    c.out = c.d
    img, m = c.image(), c.mask(name="photo-sheet.png")
    image = load_image(img)
    result = c.edit(image, load_mask(m))()
    return Case(c.argv(img, m), lambda: write_results(c.d, "photo", image, result, 0, {}, [img, m]))


class _DiskFull:
    """``tempfile`` for blendedit.io whose ``mkstemp`` fails from the ``fail_at``-th call on."""

    def __init__(self, fail_at: int):
        self.calls, self.fail_at = 0, fail_at

    def mkstemp(self, *a, **k):
        self.calls += 1
        if self.calls >= self.fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return tempfile.mkstemp(*a, **k)


@case
def out_disk_full(c):
    files = {c.out / f"{k}.png": b"x" for k in "abc"}
    # the CLI: the folder probe and the first result file succeed, the second fails
    return Case(
        c.argv(c.image(), c.mask()),
        lambda: write_files_atomically(files),
        setup=lambda m: m.setattr(bio, "tempfile", _DiskFull(fail_at=3)),
    )


# --- reconstructing an earlier edit --------------------------------------------------------


def _reconstruct_case(c, sidecar: Path, *flags) -> Case:
    from blendedit.runner import LoadedModel, ModelSpec, reconstruct_from_sidecar

    image = flags[1] if flags[:1] == ("--image",) else None
    loaded = LoadedModel(c.pipe, ModelSpec("tiny-random"), None, "cpu", "float32")
    return Case(
        ["reconstruct", str(sidecar), "--out", str(c.out), "--model", "tiny-random", *flags],
        lambda: reconstruct_from_sidecar(loaded, sidecar, c.out, {}, image=image),
    )


def _earlier_edit(c, **meta) -> Path:
    """An edit's results, sidecar and latents, written into the inputs folder."""
    from blendedit.runner import pixels_sha256

    img, m = c.image(), c.mask()
    image = load_image(img)
    result = c.edit(image, load_mask(m))()
    meta = dict(image=str(img), prompt="a red circle", seed=0, method="latent") | meta
    latents = pixels_sha256(image) if meta["method"] == "latent" else None
    write_results(c.d, "photo", image, result, 0, meta, [img, m], latents=latents)
    return c.d / "photo.json"


@case
def reconstruct_sidecar_missing(c):
    return _reconstruct_case(c, c.d / "nope.json")


@case
def reconstruct_no_latents(c):
    return _reconstruct_case(c, _earlier_edit(c, method="pixel"))


@case
def reconstruct_wrong_image(c):
    sidecar = _earlier_edit(c)
    other = c.image("other.png", size=32)
    return _reconstruct_case(c, sidecar, "--image", str(other))


# --- LoRA files -------------------------------------------------------------------------------


def _lora_case(c, spec: str, *flags) -> Case:
    argv = c.argv(c.image(), c.mask(), "--lora", spec, *flags)
    return Case(argv, lambda: c.pipe.load_lora_weights(spec, None))


@case
def lora_missing(c):
    return _lora_case(c, "./nope.safetensors")


@case
def lora_not_a_lora(c):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in c.pipe.vae.state_dict().items()}
    save_file(state, str(c.d / "vae.safetensors"))
    return _lora_case(c, str(c.d / "vae.safetensors"))


@case
def lora_other_family(c):
    from blendedit.tiny import save_tiny_sdxl
    from blendedit.tiny_lora import save_random_lora

    with tempfile.TemporaryDirectory() as tmp:
        sdxl = BlendedLatentDiffusionPipeline.from_pretrained(str(save_tiny_sdxl(Path(tmp))))
    return _lora_case(c, str(save_random_lora(sdxl, c.d / "sdxl-lora")))


@case
def lora_scale_not_a_number(c):
    return _lora_case(c, "style.safetensors:strong")


@case
def lora_hub_not_cached(c):
    return _lora_case(c, "nobody/no-such-lora")


@case
def lora_pixel_method(c):
    from blendedit.runner import ModelSpec, load_pipeline

    spec = ModelSpec(model="tiny-random", method="pixel", loras=("style.safetensors",))
    argv = c.argv(c.image(), c.mask(), "--method", "pixel", "--lora", "style.safetensors")
    return Case(argv, lambda: load_pipeline(spec))


@case
def reconstruct_lora_changed(c):
    from blendedit.runner import LoadedModel, ModelSpec, reconstruct_from_sidecar
    from blendedit.tiny_lora import save_random_lora

    lora = save_random_lora(c.pipe, c.d / "style")
    sidecar = _earlier_edit(c)
    meta = json.loads(sidecar.read_text())
    meta["loras"] = [dict(file=lora.name, path=str(lora), sha256="0" * 64, scale=1.0)]
    sidecar.write_text(json.dumps(meta))  # as if the file had other bytes when the edit ran
    pipe = BlendedLatentDiffusionPipeline.from_pretrained("tiny-random", loras=[lora])
    loaded = LoadedModel(pipe, ModelSpec("tiny-random"), None, "cpu", "float32")
    argv = ["reconstruct", str(sidecar), "--out", str(c.out), "--model", "tiny-random"]
    return Case(argv, lambda: reconstruct_from_sidecar(loaded, sidecar, c.out, {}))


# --- batch manifests ----------------------------------------------------------------------


def _batch_case(c, manifest: Path, *flags, good_rows: int = 0) -> Case:
    from blendedit.batch import run_batch
    from blendedit.runner import EditRequest, ModelSpec

    def lib():
        opts = {"num_inference_steps": 2}
        req = EditRequest(image="", prompt="", options=opts)
        workers = int(flags[1]) if flags[:1] == ("--workers",) else 1
        return run_batch(
            manifest, c.out, ModelSpec("tiny-random"), req, workers=workers, progress=False
        )

    def on_error(out: Path) -> None:  # the summary, and every good row, complete
        if not out.exists():
            return
        entries = [json.loads(x) for x in (out / "summary.jsonl").read_text().splitlines()]
        assert sum(e["status"] in ("ok", "skipped") for e in entries) == good_rows
        sidecars = list(out.glob("rows/*/*.json"))
        assert len(sidecars) == good_rows and not list(out.rglob("*.tmp"))

    argv = ["batch", str(manifest), "--out", str(c.out), "--model", "tiny-random"]
    return Case([*argv, "--steps", "2", "--quiet", *flags], lib, on_error=on_error)


def _manifest(c, first: str) -> Path:
    img, m = c.image(), c.mask()
    good = json.dumps({"image": img.name, "mask": m.name, "prompt": "a red circle"})
    return c.write("edits.jsonl", f"{first}\n{good}\n".encode())


@case
def manifest_missing(c):
    return _batch_case(c, c.d / "edits.jsonl")


@case
def manifest_wrong_type(c):
    return _batch_case(c, c.write("edits.txt", b"image,mask,prompt\n"))


@case
def manifest_row_missing_image(c):
    row = json.dumps({"image": "nope.png", "mask": "mask.png", "prompt": "a red circle"})
    return _batch_case(c, _manifest(c, row), good_rows=1)


@case
def manifest_row_not_json(c):
    return _batch_case(c, _manifest(c, "{image: photo.png"), good_rows=1)


@case
def manifest_row_unknown_option(c):
    row = json.dumps({"image": "photo.png", "mask": "mask.png", "prompt": "a", "colour": "red"})
    return _batch_case(c, _manifest(c, row), good_rows=1)


@case
def workers_without_ray(c):
    return _batch_case(c, _manifest(c, ""), "--workers", "2")


# --- web UI ---------------------------------------------------------------------------------


def _page_request(c, image: Image.Image | None, box=(10, 10, 30, 30)) -> Callable:
    from blendedit.runner import LoadedModel, ModelSpec
    from blendedit.webui import EditSession, run_request

    session = EditSession(LoadedModel(c.pipe, ModelSpec("tiny-random"), None, "cpu", "f32"), c.out)
    layer = None
    if image is not None:
        layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
        if box:
            ImageDraw.Draw(layer).rectangle(box, fill=(255, 0, 0, 255))
    value = {"background": image, "layers": [layer] if layer else [], "composite": None}

    def lib():
        c.out.mkdir(exist_ok=True)
        opts = dict(num_inference_steps=2, num_images_per_prompt=1, strength=1.0)
        run_request(session, value, None, "a red circle", opts, 0)

    return lib


@case
def webui_no_image(c):
    return Case(None, _page_request(c, None))


@case
def webui_blank_canvas(c):
    return Case(None, _page_request(c, Image.new("RGBA", (800, 800), (255, 255, 255, 255))))


@case
def webui_nothing_painted(c):
    return Case(None, _page_request(c, load_image(c.image()), box=None))


@case
def webui_image_too_large(c):
    return Case(None, _page_request(c, Image.new("RGB", (5100, 5000), (9, 9, 9))))


# --- the runner ----------------------------------------------------------------------------

ROWS = read_rows()


def test_catalogue_has_30_entries_and_each_has_a_case():
    ids = [r.id for r in ROWS]
    assert len(ids) >= 30 and len(set(ids)) == len(ids)
    assert set(ids) == set(CASES), set(ids) ^ set(CASES)


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse
        return int(e.code)


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_catalogue_entry(row, tmp_path, pipe, monkeypatch, capsys):
    d = tmp_path / "in"
    d.mkdir()
    c = Ctx(d=d, out=tmp_path / "out", pipe=pipe, mp=monkeypatch)
    cs = CASES[row.id](c)
    want = phrase(row.message)
    before = _snapshot(d)
    assert (cs.lib is None) == (row.exception == "n/a")
    assert (cs.argv is None) == (row.exit == "n/a")

    # 1. The library
    if cs.lib is not None:
        with monkeypatch.context() as m:
            if cs.setup:
                cs.setup(m)
            if row.exception == "accepted":
                result = cs.lib()
                if want is not None:
                    assert any(want in w for w in result.warnings), result.warnings
            elif row.exception == "reported":  # a batch: the row's error is in the summary
                errors = [e["error"] or "" for e in cs.lib().entries]
                assert any(want.split(" failed: ", 1)[1] in e for e in errors), errors
            else:
                with pytest.raises(ValueError) as e:
                    cs.lib()
                assert type(e.value).__name__ == row.exception
                assert want in str(e.value)
        assert _snapshot(d) == before

    # 2. The command line
    if cs.argv is not None:
        capsys.readouterr()
        with monkeypatch.context() as m:
            if cs.setup:
                cs.setup(m)
            code = _run_cli(cs.argv)
        err = " ".join(capsys.readouterr().err.split())
        assert code == int(row.exit), err
        if code == 0:
            if want is not None:
                assert f"blendedit: warning: {want}" in err
                meta, _ = results(c.out)
                assert any(want in w for w in meta["warnings"])
            if cs.check:
                cs.check(c.out)
        else:
            assert want in err, err
            if row.exception != "reported" and (code != 2 or "usage:" not in err):
                assert err.startswith("blendedit: error: ")
            # nothing left behind: the output folder has no file (or was never made)
            if cs.on_error is not None:
                cs.on_error(c.out)
            elif c.out.is_dir() and c.out != d:
                assert not [p for p in c.out.rglob("*") if p.is_file()]
        assert _snapshot(d) == before  # no input modified, no partial output beside them
    assert not [p for p in tmp_path.rglob("*.tmp")]
