"""Issue 31's first measurement: what the guidance CLIP reads in the pixel model's x̂0.

Blended Diffusion guides with the CLIP loss of x̂0, the model's prediction of the clean image
from x_t, not of clean images. This measures the shipped CLIP's zero-shot choice among the 30
"a {colour} {shape}" prompts on one-object 64 px renders (colours and shapes cycled, size,
place, rotation and background random), clean and as the shipped pixel model's x̂0 from
t = 250, 500 and 750 of 1000 (the same noise for every t), with colour, shape and joint
accuracy; and, beside it, whether the pixel judge still reads the true object in x̂0 (upsampled
to 128 px), which says how much shape x̂0 holds at all.

    python benchmarks/clip_on_x0.py [--n 300] [--clip FOLDER] [--out benchmarks/results/clip_on_x0]

``--clip``: another CLIP in place of the shipped one (e.g. a `train-toy guide-clip` run's model/).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from blendedit import BlendedDiffusionPipeline  # noqa: E402
from blendedit.io import pil_to_tensor, tensor_to_pil  # noqa: E402
from blendedit.toy.common import CLASS_PROMPTS  # noqa: E402
from blendedit.toy.evaluate import single_object_scene  # noqa: E402
from blendedit.toy.judge import read_objects  # noqa: E402
from blendedit.toy.world import render  # noqa: E402

STEPS = (0, 250, 500, 750)  # 0: the clean render itself


def renders(n: int, seed: int, size: int):
    """``n`` one-object renders at ``size`` px in [-1, 1] and their label indices."""
    labels = [i % len(CLASS_PROMPTS) for i in range(n)]
    xs = []
    for i, label in enumerate(labels):
        colour, shape = CLASS_PROMPTS[label].split()[1:]
        xs.append(pil_to_tensor(render(single_object_scene(seed, i, colour, shape), size))[0])
    return torch.stack(xs) * 2 - 1, torch.tensor(labels)


@torch.no_grad()
def x0_from(pipe: BlendedDiffusionPipeline, x: torch.Tensor, t: int, noise) -> torch.Tensor:
    """The model's x̂0 (in [-1, 1]) from x noised to step ``t``; ``x`` itself at t = 0."""
    if t == 0:
        return x
    out = []
    for a in range(0, len(x), 50):
        xt = pipe.q_sample(x[a : a + 50], t, noise[a : a + 50])
        out.append(pipe.model_step_terms(xt, t, t - 1)[1])
    return torch.cat(out)


@torch.no_grad()
def clip_choice(pipe: BlendedDiffusionPipeline, x: torch.Tensor) -> torch.Tensor:
    """The index of the prompt the CLIP finds nearest for each image (in [-1, 1])."""
    clip = pipe.clip
    txt = F.normalize(torch.cat([clip.embed_text(p) for p in CLASS_PROMPTS]).float(), dim=-1)
    img = torch.cat([clip.embed_images((x[a : a + 100] + 1) / 2) for a in range(0, len(x), 100)])
    return (F.normalize(img.float(), dim=-1) @ txt.T).argmax(1)


def judge_reads(x: torch.Tensor, labels: torch.Tensor) -> float:
    up = F.interpolate((x + 1) / 2, size=128, mode="bilinear", align_corners=False).clamp(0, 1)
    kept = 0
    for img, label in zip(tensor_to_pil(up), labels.tolist()):
        colour, shape = CLASS_PROMPTS[label].split()[1:]
        kept += any(c == colour and s == shape for c, s, _ in read_objects(img))
    return kept / len(labels)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--clip", default=None, help="CLIP folder (default: the shipped one)")
    p.add_argument("--out", default="benchmarks/results/clip_on_x0")
    args = p.parse_args(argv)
    t0 = time.time()
    pipe = BlendedDiffusionPipeline.from_pretrained("toy", clip=args.clip)
    size = pipe.native_size
    x, labels = renders(args.n, args.seed, size)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(args.seed))
    colour_of = [c.split()[1] for c in CLASS_PROMPTS]
    shape_of = [c.split()[2] for c in CLASS_PROMPTS]
    rows = []
    for t in STEPS:
        x0 = x0_from(pipe, x, t, noise)
        pick = clip_choice(pipe, x0)
        row = dict(
            t=t,
            joint=float((pick == labels).float().mean()),
            colour=sum(colour_of[a] == colour_of[b] for a, b in zip(pick, labels)) / args.n,
            shape=sum(shape_of[a] == shape_of[b] for a, b in zip(pick, labels)) / args.n,
            judge_reads_x0=judge_reads(x0, labels),
        )
        rows.append({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(
        n=args.n, seed=args.seed, size=size, clip=args.clip, seconds=round(time.time() - t0, 1)
    )
    (out / "results.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    lines = [
        "# The guidance CLIP on the pixel model's x̂0 (issue 31)",
        "",
        f"`python benchmarks/clip_on_x0.py --n {args.n}"
        + (f" --clip {args.clip}" if args.clip else "")
        + "`: the "
        + (f"CLIP {args.clip}'s" if args.clip else "shipped CLIP's")
        + " zero-shot choice "
        f"among the 30 'a {{colour}} {{shape}}' prompts on {args.n} one-object {size} px "
        "renders (colours and shapes cycled), clean (t = 0) and as the shipped pixel model's "
        "x̂0 from step t of 1000 (one step, the same noise at every t); and whether the pixel "
        f"judge reads the true object in that x̂0. {meta['seconds']} s on this machine.",
        "",
        "| t | joint (chance 3.3 %) | colour (chance 16.7 %) | shape (chance 20 %) "
        "| judge reads x̂0 |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['t']} | {r['joint']:.1%} | {r['colour']:.1%} | {r['shape']:.1%} | "
            f"{r['judge_reads_x0']:.1%} |"
        )
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
