"""Training data for the Shapes World models: rendered scenes, their descriptions, captions.

A data set is a folder with ``images-{S}.npy`` (N, S, S, 3) uint8 and ``scenes.json`` (the
scene of each image, so captions can be drawn afresh every epoch). Scene ``i`` of a data set
with seed ``s`` is ``sample_scene(RandomState([s, i]))``: any image can be re-rendered alone,
and data sets with different seeds are disjoint draws (seed 0 trains, seed 1 is held out).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from .world import Background, Obj, Scene, caption, render, sample_scene

CAPTION_DROP = 0.1  # share of empty captions, for classifier-free guidance (SHAPES_WORLD.md)


def scene_for(seed: int, index: int, objects: int | None = None) -> Scene:
    """Scene ``index`` of the data set with ``seed`` (``objects``: a fixed object count)."""
    return sample_scene(np.random.RandomState([seed, index]), objects)


def scene_to_dict(scene: Scene) -> dict:
    return asdict(scene)


def scene_from_dict(d: dict) -> Scene:
    bg = dict(d["background"])
    bg["colours"] = tuple(bg["colours"])
    return Scene(Background(**bg), tuple(Obj(**o) for o in d["objects"]))


def _render_range(args) -> np.ndarray:
    seed, start, stop, size, objects = args
    return np.stack(
        [np.asarray(render(scene_for(seed, i, objects), size)) for i in range(start, stop)]
    )


def build_dataset(
    folder: str | Path,
    n: int,
    size: int = 128,
    seed: int = 0,
    workers: int | None = None,
    objects: int | None = None,
) -> Path:
    """Render ``n`` scenes at ``size`` px into ``folder`` (skipped when already complete);
    ``objects`` fixes the number of objects per scene (0 to 3 at random by default)."""
    from tqdm.auto import tqdm

    if objects is not None and not 0 <= objects <= 3:
        raise ValueError(f"objects: a scene holds 0 to 3 objects (SHAPES_WORLD.md), got {objects}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images_path = folder / f"images-{size}.npy"
    meta_path = folder / "scenes.json"
    if images_path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta["n"] == n and meta["seed"] == seed and meta.get("objects") == objects:
            return folder
    workers = workers or min(4, os.cpu_count() or 1)
    chunk = 250
    jobs = [(seed, a, min(n, a + chunk), size, objects) for a in range(0, n, chunk)]
    out = np.lib.format.open_memmap(
        str(images_path) + ".tmp.npy", mode="w+", dtype=np.uint8, shape=(n, size, size, 3)
    )
    with (
        get_context("spawn").Pool(workers) as pool,
        tqdm(total=n, desc="render", unit="img") as bar,
    ):
        for (_, a, b, _, _), arr in zip(jobs, pool.imap(_render_range, jobs)):
            out[a:b] = arr
            bar.update(b - a)
    out.flush()
    del out
    os.replace(str(images_path) + ".tmp.npy", images_path)
    scenes = [scene_to_dict(scene_for(seed, i, objects)) for i in range(n)]
    tmp = meta_path.with_suffix(".tmp")
    meta = {"n": n, "seed": seed, "size": size, "objects": objects, "scenes": scenes}
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, meta_path)
    return folder


class SceneData:
    """A built data set: ``images`` (memory-mapped uint8) and ``scenes``."""

    def __init__(self, folder: str | Path, size: int = 128):
        folder = Path(folder)
        path = folder / f"images-{size}.npy"
        if not path.exists():
            raise FileNotFoundError(
                f"data: {path} is missing; build it with "
                f"`python -m blendedit.toy.train data --out {folder}`"
            )
        self.images = np.load(path, mmap_mode="r")
        meta = json.loads((folder / "scenes.json").read_text())
        self.scenes = [scene_from_dict(d) for d in meta["scenes"]]
        self.seed = meta["seed"]

    def __len__(self) -> int:
        return len(self.scenes)

    def batch(self, idx) -> np.ndarray:
        return np.stack([self.images[i] for i in idx])


def train_caption(
    scene: Scene, rng: np.random.RandomState, drop: float = CAPTION_DROP, name_small: bool = False
) -> str:
    """A caption drawn afresh (template, which objects, sizes, background), or '' with
    probability ``drop``; ``name_small``: see :func:`caption`."""
    return "" if rng.rand() < drop else caption(scene, rng, name_small)
