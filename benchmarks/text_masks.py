"""Masks from words on the shipped model (issue 40), where the truth is known: Shapes World
scenes of two or three objects of distinct colours, the query naming one ("a blue square").

Masks scored against the object's true mask (grown 2 px): IoU, and "covers" (at least 80 % of
the object, at most 20 % of the mask outside the object's box grown 2 px). Methods:
- ``ours``: ``pipe.mask_from_text`` with its defaults (the query against its hue swaps);
- ``ours, empty reference``: the same against the empty prompt;
- ``CLIP patches``: the ranking CLIP's similarity of 32-px windows (stride 8) to the query,
  averaged per pixel, normalised, thresholded at 0.5, the part with the most mass kept;
- ``box around the largest difference``: the box of the largest part of our difference map
  (no choice among parts, no outline).
Then the one-command edit (``mask_prompt=``) against the same edit in a hand-drawn box (the
bench's replace box around the object), 2 samples, the best-ranked judged in the hand box.

    python benchmarks/text_masks.py [--scenes 50] [--seed 0] [--edits 50] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from blendedit import BlendedLatentDiffusionPipeline
from blendedit.io import pil_to_tensor, save_json
from blendedit.masks import dilate
from blendedit.text_mask import (
    NothingFoundError,
    TextMaskOptions,
    components,
    default_references,
    fill_holes,
    maps,
)
from blendedit.toy import world as W
from blendedit.toy.judge import judge
from blendedit.toy.tasks import _mask


def scenes(n: int, seed: int) -> list:
    """(scene, index of the queried object): 2 or 3 objects of distinct colours."""
    rng, out = np.random.RandomState(seed), []
    while len(out) < n:
        sc = W.sample_scene(rng, n_objects=int(rng.choice([2, 3])))
        cols = [o.colour for o in sc.objects]
        if len(sc.objects) >= 2 and len(set(cols)) == len(cols):
            out.append((sc, int(rng.randint(len(sc.objects)))))
    return out


def grow(b: np.ndarray, k: int) -> np.ndarray:
    return dilate(torch.from_numpy(b.astype(np.float32))[None, None], 2 * k + 1)[0, 0].numpy() > 0


def biggest_mass(heat: torch.Tensor, threshold: float = 0.5) -> np.ndarray:
    h = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-12)
    parts = components(h >= threshold)
    return fill_holes(max(parts, key=lambda c: float(h[c].sum()))).numpy()


@torch.no_grad()
def clip_patches(pipe, image: Image.Image, text: str, win: int = 32, stride: int = 8):
    x = pil_to_tensor(image)
    s = x.shape[-1]
    starts = range(0, s - win + 1, stride)
    crops = torch.cat([x[..., y : y + win, c : c + win] for y in starts for c in starts])
    img = F.normalize(pipe.ranker.embed_images(crops).float(), dim=-1)
    sim = (img @ F.normalize(pipe.ranker.embed_text(text).float(), dim=-1).T)[:, 0].cpu()
    heat, count = torch.zeros(s, s), torch.zeros(s, s)
    for i, (y, c) in enumerate((y, c) for y in starts for c in starts):
        heat[y : y + win, c : c + win] += sim[i]
        count[y : y + win, c : c + win] += 1
    return grow(biggest_mass(heat / count), 2)


def largest_difference_box(pipe, image, text: str) -> np.ndarray:
    diff, _, _ = maps(pipe, image, text, default_references(text), TextMaskOptions())
    up = F.interpolate(diff[None, None], size=image.size[::-1], mode="bilinear")[0, 0]
    parts = components(up / up.max() >= 0.5)
    big = max(parts, key=lambda c: int(c.sum())).numpy()
    ys, xs = np.nonzero(big)
    box = np.zeros_like(big)
    box[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
    return box


def score(m: np.ndarray, truth: np.ndarray) -> dict:
    gt = grow(truth, 2)
    ys, xs = np.nonzero(gt)
    box = np.zeros_like(truth)
    box[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
    iou = (m & gt).sum() / max(1, (m | gt).sum())
    covers = (m & truth).sum() >= 0.8 * truth.sum() and (m & ~box).sum() <= 0.2 * max(1, m.sum())
    return dict(iou=float(iou), covers=bool(covers))


def edit_pair(pipe, image, obj, rng, i: int) -> dict:
    """One replace edit: the mask from the query's words against the hand-drawn box."""
    size = image.size[0]
    side = max(0.3, 2 * obj.r * 1.15)
    box = (obj.cx - side / 2, obj.cy - side / 2, obj.cx + side / 2, obj.cy + side / 2)
    hand = _mask(size, box, False)
    while True:
        shape, colour = W.SHAPES[rng.randint(5)], list(W.COLOURS)[rng.randint(6)]
        if (shape, colour) != (obj.shape, obj.colour):
            break
    target = W.Obj(shape, colour, obj.cx, obj.cy, obj.r)
    prompt = W.describe(target, with_size=False)
    query = W.describe(obj, with_size=False)
    gens = lambda: [torch.Generator().manual_seed(1000 * i + s) for s in range(2)]  # noqa: E731
    kw = dict(num_inference_steps=25, num_images_per_prompt=2)
    out = {}
    for name, mask_kw in (("words", dict(mask_prompt=query)), ("hand box", dict(mask=hand))):
        try:
            res = pipe(prompt, image, generator=gens(), **kw, **mask_kw)
            out[name] = judge(res.images[0], hand, prompt, source=image).success
        except NothingFoundError:
            out[name] = False
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenes", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--edits", type=int, default=50, help="scenes also edited (0: none)")
    p.add_argument("--out", default="benchmarks/results/text_masks")
    args = p.parse_args(argv)
    pipe = BlendedLatentDiffusionPipeline.from_pretrained("toy")
    size = pipe.native_size
    methods = ["ours", "ours, empty reference", "CLIP patches", "box around the largest difference"]
    rows = {m: [] for m in methods}
    edits, seconds, refused, missed = [], [], [], []
    rng = np.random.RandomState(args.seed + 1000)
    for i, (sc, qi) in enumerate(scenes(args.scenes, args.seed)):
        image, obj = W.render(sc, size), sc.objects[qi]
        truth = W.coverage(obj, size) > 0.5
        query = W.describe(obj, with_size=False)
        for m in methods:
            t0 = time.perf_counter()
            try:
                if m.startswith("ours"):
                    refs = ("",) if "empty" in m else None
                    mask = np.array(pipe.mask_from_text(image, query, references=refs).mask) > 0
                elif m == "CLIP patches":
                    mask = clip_patches(pipe, image, query)
                else:
                    mask = largest_difference_box(pipe, image, query)
            except NothingFoundError:
                mask = np.zeros_like(truth)
                missed.append(m == "ours")
            if m == "ours":
                seconds.append(time.perf_counter() - t0)
            rows[m].append(score(mask, truth))
        absent = [c for c in W.COLOURS if c not in {o.colour for o in sc.objects}]
        colour = absent[rng.randint(len(absent))]
        try:  # a colour that is not in the scene: the text names nothing
            pipe.mask_from_text(image, f"{W.article(colour)} {colour} {W.SHAPES[rng.randint(5)]}")
            refused.append(False)
        except NothingFoundError:
            refused.append(True)
        if i < args.edits:
            edits.append(edit_pair(pipe, image, obj, rng, i))
        print(f"scene {i + 1}/{args.scenes}", file=sys.stderr, flush=True)
    res = {
        m: dict(
            median_iou=statistics.median(r["iou"] for r in v),
            mean_iou=statistics.mean(r["iou"] for r in v),
            covers=sum(r["covers"] for r in v) / len(v),
        )
        for m, v in rows.items()
    }
    both = {k: sum(e[k] for e in edits) for k in ("words", "hand box")} if edits else {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_json(
        dict(config=vars(args), results=res, rows=rows, edits=edits, refused=refused),
        out / "results.json",
    )
    cmd = " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Masks from words on the shipped model (issue 40)",
        "",
        f"`python benchmarks/text_masks.py {cmd}`: {args.scenes} Shapes World scenes (seed "
        f"{args.seed}) of 2-3 objects of distinct colours, the query naming one. Ours: median "
        f"{statistics.median(seconds):.2f} s a mask on this machine's 2 CPU cores.",
        "",
        "| method | median IoU | mean IoU | covers |",
        "|---|---|---|---|",
        *[
            f"| {m} | {r['median_iou']:.2f} | {r['mean_iou']:.2f} | {r['covers']:.0%} |"
            for m, r in res.items()
        ],
        "",
        "The issue asks for median IoU >= 0.6 and >= 80 % covering.",
        "",
        f"Ours refuses {sum(refused)} of {len(refused)} queries of a colour that is not in the "
        f"scene (matches nothing), and {sum(missed)} of the {len(rows['ours'])} queries that are "
        "(a refusal counts as an empty mask above).",
    ]
    if edits:
        only = [sum(e["words"] and not e["hand box"] for e in edits)]
        only.append(sum(e["hand box"] and not e["words"] for e in edits))
        lines += [
            "",
            f"One-command edit (`mask_prompt=`, 25 steps, 2 samples, the pick judged in the "
            f"hand-drawn box) on the first {len(edits)} scenes: {both['words']} succeed, against "
            f"{both['hand box']} with the hand-drawn box ({only[0]} only with words, {only[1]} "
            "only with the box).",
        ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
