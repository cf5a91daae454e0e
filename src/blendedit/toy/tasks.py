"""Shapes World edit tasks (SHAPES_WORLD.md, "Edit tasks"): a scene, a mask, a prompt and the
ground truth, deterministic by seed.

Kinds:
- ``replace``: a box or ellipse of side 0.3 S to 0.5 S around an existing object; the prompt asks
  for another colour and shape.
- ``add``: the same over empty background.
- ``small``: a box of side 0.18 S to 0.24 S (two or three latent cells at 128 px) over empty
  background, prompt "a small ...".
Every kind can be asked to touch the canvas border.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .world import COLOURS, SHADOW_OFFSET, SHAPES, Obj, Scene, describe, render, sample_scene

TASK_KINDS = ("replace", "add", "small")


@dataclass
class EditTask:
    seed: int
    kind: str
    scene: Scene
    image: Image.Image
    mask: Image.Image  # 'L', 255 = edit
    box: tuple[float, float, float, float]  # mask bounds (x0, y0, x1, y1), x S
    prompt: str
    target: Obj  # the object the prompt asks for, placed as in the ground truth
    ground_truth: Image.Image


def _mask(size: int, box, ellipse: bool) -> Image.Image:
    m = Image.new("L", (size, size), 0)
    x0, y0, x1, y1 = (v * size for v in box)
    draw = ImageDraw.Draw(m)
    (draw.ellipse if ellipse else draw.rectangle)([x0, y0, x1 - 1, y1 - 1], fill=255)
    return m


def _clear(box, objects, pad: float) -> bool:
    """No object's bounding circle (with its shadow) comes within ``pad`` of the box."""
    x0, y0, x1, y1 = box
    for o in objects:
        nx, ny = min(max(o.cx, x0), x1), min(max(o.cy, y0), y1)
        if math.hypot(o.cx - nx, o.cy - ny) < o.r + SHADOW_OFFSET * 2 + pad:
            return False
    return True


def make_task(seed: int, kind: str, size: int = 128, touch_border: bool = False) -> EditTask:
    """One edit task, the same for the same arguments."""
    if kind not in TASK_KINDS:
        raise ValueError(f"kind: expected one of {TASK_KINDS}, got {kind!r}")
    rng = np.random.RandomState(seed)
    for _ in range(1000):
        task = _try(rng, seed, kind, size, touch_border)
        if task is not None:
            return task
    raise RuntimeError(f"no {kind} task found for seed {seed}")  # never seen in practice


def _try(rng, seed, kind, size, touch_border) -> EditTask | None:
    n_obj = int(rng.randint(1, 4)) if kind == "replace" else int(rng.randint(0, 3))
    scene = sample_scene(rng, n_obj)
    if kind == "replace" and not scene.objects:
        return None
    side = float(rng.uniform(0.18, 0.24) if kind == "small" else rng.uniform(0.3, 0.5))
    if kind == "replace":
        old = scene.objects[rng.randint(len(scene.objects))]
        side = max(side, 2 * old.r * 1.15)
        if side > 0.5:
            return None
        cx, cy = old.cx, old.cy
    else:
        cx, cy = rng.uniform(side / 2, 1 - side / 2, size=2)
    if touch_border:
        edge = rng.randint(4)
        cx = side / 2 if edge == 0 else 1 - side / 2 if edge == 1 else cx
        cy = side / 2 if edge == 2 else 1 - side / 2 if edge == 3 else cy
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    if min(box) < 0 or max(box) > 1:
        return None
    others = [o for o in scene.objects if kind != "replace" or o is not old]
    if not _clear(box, others, 0.0):
        return None
    shape = SHAPES[rng.randint(len(SHAPES))]
    colour = list(COLOURS)[rng.randint(len(COLOURS))]
    if kind == "replace" and (shape, colour) == (old.shape, old.colour):
        return None
    r_hi = min(side / 2 * 0.8, 0.11 if kind == "small" else 0.20)
    r_lo = 0.07
    if r_hi < r_lo:
        return None
    r = float(rng.uniform(r_lo, r_hi))
    rot = 0.0 if shape == "circle" else float(rng.uniform(0, 2 * math.pi))
    target = Obj(shape, colour, float(cx), float(cy), r, rot)
    truth = scene.with_objects(others + [target])
    prompt = describe(target, with_size=kind == "small")  # small: r < 0.096 S, "a small ..."
    ellipse = kind != "small" and bool(rng.rand() < 0.5)
    return EditTask(
        seed=seed,
        kind=kind,
        scene=scene,
        image=render(scene, size),
        mask=_mask(size, box, ellipse),
        box=box,
        prompt=prompt,
        target=target,
        ground_truth=render(truth, size),
    )


def check_kinds(kinds) -> None:
    """``ValueError`` naming ``kinds`` unless it is a non-empty selection of ``TASK_KINDS``."""
    if not kinds or any(k not in TASK_KINDS for k in kinds):
        raise ValueError(f"kinds: expected some of {TASK_KINDS}, got {tuple(kinds)}")


def task_suite(
    n: int, size: int = 128, seed: int = 0, kinds: tuple[str, ...] = TASK_KINDS
) -> list[EditTask]:
    """A fixed, seeded mix: replace / add / small in turn, every fourth touching the border.
    ``kinds``: only these kinds, the first ``n`` of them in the full mix (so a run on small
    masks alone repeats the full suite's small-mask tasks, and adds more)."""
    check_kinds(kinds)
    out, i = [], 0
    while len(out) < n:
        if TASK_KINDS[i % 3] in kinds:
            out.append(make_task(seed * 100_000 + i, TASK_KINDS[i % 3], size, i % 4 == 3))
        i += 1
    return out


def write_manifest(folder, n: int, size: int = 128, seed: int = 0, **row_options):
    """Write ``n`` edit tasks of :func:`task_suite` (``images/``, ``masks/``) and a
    ``manifest.jsonl`` for `blendedit batch` into ``folder``; returns the manifest's path.
    ``row_options`` are added to every row (e.g. ``steps=10``)."""
    import json
    from pathlib import Path

    from ..io import save_image

    folder = Path(folder)
    lines = []
    for i, t in enumerate(task_suite(n, size, seed)):
        name = f"task{i:04d}"
        save_image(t.image, folder / "images" / f"{name}.png")
        save_image(t.mask, folder / "masks" / f"{name}.png")
        row = dict(id=name, image=f"images/{name}.png", mask=f"masks/{name}.png", prompt=t.prompt)
        lines.append(json.dumps(row | row_options))
    path = folder / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
