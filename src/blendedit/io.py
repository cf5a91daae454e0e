"""Load and validate images and masks; write results atomically.

Every loader accepts a path, a PIL image or a numpy array, and fails with a ``ValueError`` whose
message starts with the argument's name (``image: ...``, ``mask: ...``) and says what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

ImageInput = str | os.PathLike | Image.Image | np.ndarray

#: Images with more pixels than this are refused (decompression bombs); raise it per call
#: (``max_pixels=``, CLI ``--max-pixels``).
DEFAULT_MAX_PIXELS = 64_000_000

#: A colour mask is refused when more than this fraction of its pixels have channels that
#: differ by more than :data:`MASK_CHANNEL_TOLERANCE` (JPEG noise in a grey mask stays below).
MASK_CHANNEL_TOLERANCE = 32
MASK_CHANNEL_FRACTION = 0.001


class OutputError(ValueError):
    """The results cannot be written where asked (CLI exit code 4); nothing was written."""


def _open(src: ImageInput, name: str, max_pixels: int) -> Image.Image:
    """Open ``src`` as a PIL image with EXIF orientation applied; errors name ``name``."""
    frames = 1
    if isinstance(src, Image.Image):
        frames = getattr(src, "n_frames", 1)
        img = ImageOps.exif_transpose(src)
    elif isinstance(src, np.ndarray):
        img = _from_array(src, name)
    elif isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.exists():
            raise ValueError(f"{name}: file not found: {str(path)!r}")
        if path.is_dir():
            raise ValueError(f"{name}: {str(path)!r} is a folder, not an image file")
        if path.stat().st_size == 0:
            raise ValueError(f"{name}: {str(path)!r} is an empty file")
        old_limit = Image.MAX_IMAGE_PIXELS
        try:
            Image.MAX_IMAGE_PIXELS = max_pixels
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                warnings.simplefilter("ignore", UserWarning)  # PIL's notes on corrupt EXIF
                img = Image.open(path)
                img.load()
                frames = getattr(img, "n_frames", 1)
                img = ImageOps.exif_transpose(img)  # in here: damaged EXIF raises too
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ValueError(
                f"{name}: {str(path)!r} has more pixels than the limit {max_pixels:,}; "
                "pass a larger max_pixels if you trust the file"
            ) from e
        except UnidentifiedImageError as e:
            raise ValueError(f"{name}: {str(path)!r} is not an image PIL can read") from e
        except PermissionError as e:
            raise ValueError(
                f"{name}: cannot read {str(path)!r}: permission denied; check the file's "
                "permissions"
            ) from e
        except Exception as e:  # corrupt data: PIL raises OSError, ValueError, IndexError, ...
            raise ValueError(
                f"{name}: {str(path)!r} is damaged or truncated and could not be read "
                f"({type(e).__name__}: {e})"
            ) from e
        finally:
            Image.MAX_IMAGE_PIXELS = old_limit
    else:
        raise ValueError(
            f"{name}: expected a path, a PIL image or a numpy array, got {type(src).__name__}"
        )
    if frames > 1:
        raise ValueError(
            f"{name}: animated image with {frames} frames; save the frame to edit as a PNG"
        )
    if img.width == 0 or img.height == 0:
        raise ValueError(f"{name}: image has zero size {img.size}")
    if img.width * img.height > max_pixels:
        raise ValueError(
            f"{name}: {img.width}x{img.height} is over the pixel limit {max_pixels:,}; "
            "pass a larger max_pixels"
        )
    return img


def _from_array(a: np.ndarray, name: str) -> Image.Image:
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ValueError(f"{name}: array must be HxW, HxWx3 or HxWx4, got shape {a.shape}")
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ValueError(f"{name}: array contains NaN or infinite values")
        if a.min() < 0 or a.max() > 1:
            raise ValueError(
                f"{name}: float arrays must lie in [0, 1], got [{a.min():.3g}, {a.max():.3g}]"
            )
        a = np.round(a * 255).astype(np.uint8)
    elif a.dtype == np.uint16:
        a = (a // 257).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ValueError(f"{name}: unsupported array dtype {a.dtype}; use uint8 or float in [0,1]")
    return Image.fromarray(np.ascontiguousarray(a))


def _to_8bit(img: Image.Image) -> Image.Image:
    """Bring high-bit-depth single-channel modes to 8-bit 'L' by scaling, not clipping."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        if img.mode == "F":
            top = 1.0 if a.max() <= 1.0 else 255.0
        return Image.fromarray(np.clip(np.round(a / top * 255), 0, 255).astype(np.uint8), "L")
    return img


def load_image(src: ImageInput, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load an image as 8-bit RGB.

    Accepts every PIL mode (RGBA, LA, P, I;16, CMYK, 1, ...) and applies EXIF orientation.
    Transparency is dropped (use :func:`load_mask` with ``from_alpha=True`` to edit where an
    image is transparent).
    """
    img = _to_8bit(_open(src, "image", max_pixels))
    if img.mode == "P":
        img = img.convert("RGBA")
    return img.convert("RGB")


def load_mask(
    src: ImageInput,
    *,
    image: Image.Image | None = None,
    threshold: float | None = 0.5,
    from_alpha: bool = False,
    invert: bool = False,
    resize: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Load an edit mask as an 8-bit 'L' image where 255 means *edit*.

    - A mask file: white (or bright) = edit. Colour masks are read by luminance.
    - ``from_alpha=True``: the mask is the source's transparency: transparent pixels are edited.
    - Soft masks are thresholded at ``threshold`` (0.5 by default); ``threshold=None`` keeps them.
    - If ``image`` is given, the sizes must match unless ``resize=True`` (nearest neighbour).
    - A mask with no pixel to edit is an error.
    """
    if threshold is not None and not (0.0 < threshold < 1.0):
        raise ValueError(f"threshold: must be in (0, 1) or None, got {threshold!r}")
    img = _open(src, "mask", max_pixels)
    if from_alpha:
        if img.mode == "P":
            img = img.convert("RGBA")
        if img.mode not in ("RGBA", "LA", "PA", "La", "RGBa"):
            raise ValueError(
                f"mask: from_alpha=True but the image has no alpha channel ({img.mode})"
            )
        m = 1.0 - np.asarray(img.getchannel("A"), dtype=np.float32) / 255.0
    else:
        img = _to_8bit(img)
        if img.mode not in ("L", "LA", "1"):
            _check_grey(img.convert("RGB"))
        m = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    if invert:
        m = 1.0 - m
    if image is not None and (m.shape[1], m.shape[0]) != image.size:
        if not resize:
            raise ValueError(
                f"mask: size {m.shape[1]}x{m.shape[0]} differs from the image's "
                f"{image.width}x{image.height}; pass resize=True (CLI: --resize-mask) to resize it"
            )
        m_img = Image.fromarray(np.round(m * 255).astype(np.uint8), "L")
        m = np.asarray(m_img.resize(image.size, Image.NEAREST), dtype=np.float32) / 255.0
    if not (m > 0).any():
        raise ValueError(
            "mask: the mask is empty (no pixel to edit); white marks the region to edit"
            + ("" if invert else " (black with invert=True, CLI --invert-mask)")
        )
    if threshold is not None:
        top = float(m.max())
        m = (m >= threshold).astype(np.float32)
        if not m.any():
            raise ValueError(
                f"mask: the mask is empty after thresholding at {threshold} (its brightest "
                f"pixel is {top:.2f}); lower the threshold (CLI: --mask-threshold)"
            )
    return Image.fromarray(np.round(m * 255).astype(np.uint8), "L")


def _check_grey(rgb: Image.Image) -> None:
    """A mask is black and white (or grey): refuse one whose colour channels disagree."""
    a = np.asarray(rgb, dtype=np.int16)
    spread = a.max(axis=2) - a.min(axis=2)
    frac = float((spread > MASK_CHANNEL_TOLERANCE).mean())
    if frac > MASK_CHANNEL_FRACTION:
        raise ValueError(
            f"mask: its red, green and blue channels disagree on {frac:.1%} of pixels (a colour "
            "image, not a mask?); save the mask in black and white, white = edit"
        )


def write_files_atomically(files: dict[Path, bytes]) -> list[Path]:
    """Write every ``path: data`` pair, all or nothing: each goes to a temporary name in its
    folder first and is renamed into place only once all are written; on any error the
    temporaries (and targets already renamed) are removed. Raises :class:`OutputError`."""
    tmps: list[tuple[str, Path]] = []
    try:
        for path, data in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            tmps.append((tmp, path))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        done: list[Path] = []
        try:
            for tmp, path in tmps:
                os.replace(tmp, path)
                done.append(path)
        except OSError:
            for path in done:  # all or nothing: take back what was already renamed
                path.unlink(missing_ok=True)
            raise
    except OSError as e:
        folder = next(iter(files)).parent if files else "?"
        raise OutputError(
            f"out: cannot write the results to {str(folder)!r} ({e.strerror or e}); "
            "nothing was written"
        ) from e
    finally:
        for tmp, _ in tmps:
            Path(tmp).unlink(missing_ok=True)
    return list(files)


#: PNGs above this many pixels are written with zlib's fastest level: a 12-MP result takes 0.7 s
#: instead of 2.9 s, for a file 17 % larger (measured on the 2-core CPU; issue 44)
FAST_PNG_PIXELS = 2_000_000


def image_bytes(img: Image.Image, path: str | os.PathLike) -> bytes:
    """``img`` encoded in the format its file name asks for (large PNGs quickly, see
    :data:`FAST_PNG_PIXELS`; lossless either way)."""
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"path: unknown image extension {Path(path).suffix!r}")
    buf = BytesIO()
    fast = fmt == "PNG" and img.width * img.height > FAST_PNG_PIXELS
    img.save(buf, format=fmt, **({"compress_level": 1} if fast else {}))
    return buf.getvalue()


def images_bytes(pairs) -> dict:
    """``{path: image_bytes(img, path)}`` for (img, path) pairs, encoded in two threads (the
    encoders release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    pairs = list(pairs)
    with ThreadPoolExecutor(max_workers=2) as pool:
        data = list(pool.map(lambda ip: image_bytes(*ip), pairs))
    return {p: d for (_, p), d in zip(pairs, data)}


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, default=str, ensure_ascii=False) + "\n").encode()


def save_image(img: Image.Image, path: str | os.PathLike) -> Path:
    """Write ``img`` to ``path`` atomically (a reader never sees a partial file)."""
    return write_files_atomically({Path(path): image_bytes(img, path)})[0]


def save_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented UTF-8 JSON to ``path`` atomically."""
    return write_files_atomically({Path(path): json_bytes(obj)})[0]


PROBE_PREFIX = ".blendedit-probe-"  # check_output_folder's test file (a kill may leave one)


def check_output_folder(out_dir: str | os.PathLike) -> Path:
    """Fail fast (:class:`OutputError`) when results could not be written to ``out_dir``:
    it is a file, or its nearest existing folder refuses a new file. Creates nothing."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"out: {str(out)!r} exists and is not a folder")
    base = out
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise OutputError(f"out: cannot create {str(out)!r}: {str(base)!r} is a file")
    try:
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(
            f"out: cannot write in {str(base)!r} ({e.strerror or e}); choose another folder"
        ) from e
    return out


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 1 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (1, 3, H, W) float in [0, 1], converted from the 8-bit pixels straight into
    channel-first floats (no HxWx3 float copy: a 12-MP photo in 0.14 s against 0.2-0.5 s)."""
    a = torch.from_numpy(np.array(img.convert("RGB")))  # (H, W, 3) uint8, writable
    out = torch.empty((1, 3, img.height, img.width))
    out[0].copy_(a.permute(2, 0, 1))
    return out.div_(255.0)


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """PIL mask ('L', 255 = edit) -> (1, 1, H, W) float in [0, 1]."""
    a = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy(a)[None, None].contiguous()


def tensor_to_mask(m: torch.Tensor) -> Image.Image:
    """(1, 1, H, W) float in [0, 1] -> PIL mask ('L'), rounded."""
    return Image.fromarray((m[0, 0].detach().cpu().numpy() * 255).round().astype(np.uint8), "L")


def tensor_to_pil(x: torch.Tensor, order=None) -> list[Image.Image]:
    """(B, 3, H, W) float in [0, 1] -> list of PIL RGB images (rounded, not truncated), in
    ``order`` (indices; default: as they are). One image's copy at a time, rounded in place:
    a 12-MP batch needs no batch-sized temporaries."""
    out = []
    for k in range(len(x)) if order is None else order:
        a = x[k].detach().float().clamp(0, 1).mul_(255).round_().to(torch.uint8)
        out.append(Image.fromarray(a.permute(1, 2, 0).contiguous().cpu().numpy(), "RGB"))
    return out
