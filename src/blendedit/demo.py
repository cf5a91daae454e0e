"""A small example scene for `blendedit demo`: shapes on a two-colour gradient, and a mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .io import save_image


def example_scene(size: int = 128) -> tuple[Image.Image, Image.Image]:
    """A deterministic scene (blue square, yellow triangle on a cream-to-tan gradient) and a
    mask: a box over empty background on the left, where the prompt adds an object."""
    ramp = np.linspace(0, 1, size, dtype=np.float32)[None, :, None]
    a, b = np.array([240, 234, 214], np.float32), np.array([196, 170, 130], np.float32)
    bg = np.broadcast_to(a * (1 - ramp) + b * ramp, (size, size, 3))
    img = Image.fromarray(np.round(bg).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    s = size / 128
    d.rectangle([80 * s, 20 * s, 110 * s, 50 * s], fill=(40, 90, 220))
    d.polygon([(95 * s, 70 * s), (115 * s, 105 * s), (75 * s, 105 * s)], fill=(245, 215, 35))
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle([14 * s, 40 * s, 62 * s, 88 * s], fill=255)
    return img, mask


def write_example(folder: Path) -> tuple[Path, Path]:
    """Write ``scene.png`` and ``scene-mask.png`` into ``folder``; returns their paths."""
    img, mask = example_scene()
    return save_image(img, Path(folder) / "scene.png"), save_image(
        mask, Path(folder) / "scene-mask.png"
    )
