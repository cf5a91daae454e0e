"""The example for `blendedit demo`: a Shapes World scene (SHAPES_WORLD.md) and a mask."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from .io import save_image
from .toy.world import Background, Obj, Scene, render

DEMO_PROMPT = "a red circle"
EXAMPLE = Scene(
    Background("gradient", ("cream", "tan"), angle=0.0),
    (
        Obj("square", "blue", 0.74, 0.27, 0.15, 0.3),
        Obj("triangle", "yellow", 0.73, 0.72, 0.16, 0.2),
    ),
)
MASK_BOX = (0.08, 0.30, 0.50, 0.72)  # x0, y0, x1, y1 in units of the side: empty background


def example_scene(size: int = 128) -> tuple[Image.Image, Image.Image]:
    """The example scene (a blue square and a yellow triangle on a cream-to-tan gradient) and a
    box mask over empty background on the left, where the demo prompt adds an object."""
    img = render(EXAMPLE, size)
    mask = Image.new("L", (size, size), 0)
    x0, y0, x1, y1 = (round(v * size) for v in MASK_BOX)
    ImageDraw.Draw(mask).rectangle([x0, y0, x1 - 1, y1 - 1], fill=255)
    return img, mask


def write_example(folder: Path) -> tuple[Path, Path]:
    """Write ``scene.png`` and ``scene-mask.png`` into ``folder``; returns their paths."""
    img, mask = example_scene()
    return save_image(img, Path(folder) / "scene.png"), save_image(
        mask, Path(folder) / "scene-mask.png"
    )
