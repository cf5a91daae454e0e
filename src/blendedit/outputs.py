"""Write an edit's results: ranked images, a JSON sidecar and a contact sheet, atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image, ImageDraw

from .io import OutputError, image_bytes, images_bytes, json_bytes, write_files_atomically


def result_names(stem: str, scores, order, seed: int) -> list[str]:
    """``{stem}-{rank}-seed{seed}[-score{score}].png``, best first."""
    names = []
    for rank, sample in enumerate(order, 1):
        score = "" if scores is None else f"-score{scores[rank - 1]:.4f}"
        names.append(f"{stem}-{rank:02d}-seed{seed + sample}{score}.png")
    return names


def contact_sheet(
    image: Image.Image,
    mask: Image.Image,
    results: list[Image.Image],
    labels: list[str],
    cell: int = 192,
) -> Image.Image:
    """Input, mask overlay and every result side by side, each labelled."""

    def thumb(im: Image.Image) -> Image.Image:
        s = cell / max(im.size)
        size = (max(1, round(im.width * s)), max(1, round(im.height * s)))
        # reducing_gap: a fast box reduction first on big photos, Lanczos for the last 3x
        return im.resize(size, Image.LANCZOS, reducing_gap=3.0)

    small, small_mask = thumb(image), thumb(mask.convert("L"))
    overlay = Image.composite(
        Image.new("RGB", small.size, (255, 0, 64)), small, small_mask.point(lambda v: v // 2)
    )
    tiles = [(small, "input"), (overlay, "mask")]
    tiles += [(thumb(r), lab) for r, lab in zip(results, labels)]
    sheet = Image.new("RGB", (cell * len(tiles), cell + 16), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (t, lab) in enumerate(tiles):
        sheet.paste(t, (i * cell, 0))
        draw.text((i * cell + 2, cell + 2), lab, fill=(0, 0, 0))
    return sheet


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def listed_files(sidecar: dict) -> list[str]:
    """Every file a sidecar lists (results, contact sheet, latents), by name."""
    files = [r["file"] for r in sidecar.get("results", [])] + [sidecar.get("contact_sheet", "")]
    return files + ([sidecar["latents"]] if sidecar.get("latents") else [])


def latents_bytes(result, image_sha256: str) -> bytes:
    """A latent edit's final latents (ranked order), its mask (the crop box's part: a 12-MP
    photo's whole mask would be 12 MB), crop box and whether that box was zoomed, as
    safetensors: what :func:`blendedit.runner.reconstruct_from_sidecar` needs to redo the
    background step."""
    import numpy as np
    import torch
    from safetensors.torch import save

    x0, y0, x1, y1 = result.crop_box  # every masked pixel lies in the box: only it is kept
    mask = np.asarray(result.mask.convert("L"), dtype=np.uint8)
    tensors = {
        "latents": result.latents.detach().float().cpu().contiguous(),
        "mask": torch.from_numpy(mask[y0:y1, x0:x1].copy()),
    }
    meta = {
        "mask_size": json.dumps([result.mask.width, result.mask.height]),
        "crop_box": json.dumps(list(result.crop_box)),
        "zoomed": json.dumps(result.zoomed),
        "detailed": json.dumps(result.detailed),
        "order": json.dumps(list(result.order)),
        "image_sha256": image_sha256,
    }
    return save(tensors, metadata=meta)


def write_results(
    out_dir: Path,
    stem: str,
    image: Image.Image,
    result,
    seed: int,
    meta: dict,
    inputs: list[Path],
    latents: str | None = None,
) -> tuple[list[Path], dict]:
    """Write ranked images, ``{stem}-sheet.png``, with ``latents`` (the source image's sha256)
    ``{stem}-latents.safetensors`` (:func:`latents_bytes`) and ``{stem}.json`` into ``out_dir``,
    all or nothing (:func:`blendedit.io.write_files_atomically`), the sidecar last: when it
    exists, so do the files it lists. Returns the paths (in that order) and the sidecar.

    Refuses (:class:`OutputError`) before writing anything if an output path is one of ``inputs``.
    """
    names = result_names(stem, result.scores, result.order, seed)
    sheet_path, sidecar_path = out_dir / f"{stem}-sheet.png", out_dir / f"{stem}.json"
    extra = [out_dir / f"{stem}-latents.safetensors"] if latents is not None else []
    # a mask found from words (mask_prompt) is written beside the results
    found = [out_dir / f"{stem}-mask.png"] if getattr(result, "mask_info", None) else []
    paths = [out_dir / n for n in names] + [sheet_path, *found, *extra, sidecar_path]
    for p in paths:
        for src in inputs:
            if _same_file(p, src) or p.resolve() == src.resolve():
                raise OutputError(
                    f"out: writing {str(p)!r} would overwrite the input {str(src)!r}; "
                    "choose another output folder"
                )
    files = images_bytes(zip(result.images, paths))
    labels = [
        f"#{i + 1}" + ("" if result.scores is None else f" {result.scores[i]:.3f}")
        for i in range(len(result.images))
    ]
    sheet = contact_sheet(image, result.mask, result.images, labels)
    sidecar = dict(meta)
    sidecar["results"] = [
        dict(
            file=names[r],
            rank=r + 1,
            sample=s,
            seed=seed + s,
            score=None if result.scores is None else result.scores[r],
        )
        for r, s in enumerate(result.order)
    ]
    sidecar["crop_box"] = list(result.crop_box)
    if hasattr(result, "zoomed"):  # the latent method: was the box resized to the native size?
        sidecar["zoomed"] = bool(result.zoomed)
        sidecar["detailed"] = bool(result.detailed)  # a detail pass ran on the zoomed region
    if getattr(result, "mask_schedule", None) is not None:  # the latent method's shrinking,
        sidecar["shrink_iterations_used"] = len(result.mask_schedule) - 1  # "auto" resolved
    sidecar["timings"] = {k: round(v, 4) for k, v in result.timings.items()}
    sidecar["warnings"] = result.warnings
    sidecar["contact_sheet"] = sheet_path.name
    files[sheet_path] = image_bytes(sheet, sheet_path)
    if found:
        sidecar["mask"] = found[0].name
        files[found[0]] = image_bytes(result.mask, found[0])
    if extra:
        sidecar["latents"] = extra[0].name
        files[extra[0]] = latents_bytes(result, latents)
    files[sidecar_path] = json_bytes(sidecar)
    return write_files_atomically(files), sidecar
