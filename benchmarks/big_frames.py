"""Big frames (issue 44): the bench's Shapes World edit tasks rendered ``--scale`` times larger
(the mask with them), edited with the default options, brought back to the native size and judged
there, against the same tasks edited at the native size: seconds per edit and success, paired.

    python benchmarks/big_frames.py [--tasks 30] [--scale 6] [--detail 0.25]
        [--out benchmarks/results/big_frames]

The two runs of a task alternate (native first on even tasks, big first on odd ones), so that a
slow drift of the machine's speed falls on both. ``--detail S`` adds a third run of each big
task, the same seeds with ``detail_strength=S`` (the detail pass), and the sharpness figure of
every big result: log of the high-frequency energy inside the mask over that of a ring around it
(:func:`sharpness`; 0 = as sharp as the surroundings).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from blendedit import BlendedLatentDiffusionPipeline
from blendedit.bench_stats import paired, wilson
from blendedit.io import mask_to_tensor, pil_to_tensor, save_json
from blendedit.toy.judge import judge
from blendedit.toy.tasks import make_task, task_suite


def edit(pipe, image, mask, prompt, seed: int, samples: int, steps: int, **options):
    gens = [torch.Generator().manual_seed(seed * 100 + i) for i in range(samples)]
    t0 = time.perf_counter()
    out = pipe(
        prompt,
        image,
        mask,
        num_inference_steps=steps,
        num_images_per_prompt=samples,
        generator=gens,
        **options,
    )
    return out, time.perf_counter() - t0


def sharpness(image: Image.Image, mask: Image.Image, eps: float = 1e-4) -> float:
    """log(E_in / E_ring): E the mean squared difference of the grey image from its 5x5 box
    blur, over the mask shrunk by 3 px (off the seam) and over a ring outside it a quarter of
    the mask's side wide; ``eps`` (in squared [0, 1] units) keeps flat areas finite."""
    x = pil_to_tensor(image).mean(1, keepdim=True)
    m = (mask_to_tensor(mask) > 0.5).float()
    e = (x - F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), 5, 1)) ** 2
    side = int(max(m.sum(-1).max(), m.sum(-2).max()))
    r = max(4, side // 4)
    ring = (F.max_pool2d(m, 2 * r + 1, 1, r) - m).clamp(0, 1)
    inner = -F.max_pool2d(-m, 7, 1, 3)
    e_in, e_ring = (e * inner).sum() / inner.sum(), (e * ring).sum() / ring.sum()
    return math.log((float(e_in) + eps) / (float(e_ring) + eps))


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="toy")
    p.add_argument("--tasks", type=int, default=30)
    p.add_argument("--scale", type=int, default=6)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--detail", type=float, default=0.0, help="also run detail_strength=S")
    p.add_argument("--out", default="benchmarks/results/big_frames")
    args = p.parse_args(argv)
    pipe = BlendedLatentDiffusionPipeline.from_pretrained(args.model)
    native = pipe.native_size
    rows = {"native": [], "big": []} | ({"big, detail": []} if args.detail else {})
    for i, task in enumerate(task_suite(args.tasks, size=native)):
        big = make_task(task.seed, task.kind, native * args.scale, task.seed % 4 == 3)
        runs = [("native", task.image, task.mask, {}), ("big", big.image, big.mask, {})]
        if args.detail:
            runs.append(("big, detail", big.image, big.mask, {"detail_strength": args.detail}))
        for name, image, mask, options in runs if i % 2 == 0 else runs[::-1]:
            out, dt = edit(
                pipe, image, mask, task.prompt, task.seed, args.samples, args.steps, **options
            )
            result = out.images[0].resize((native, native), Image.BICUBIC)
            v = judge(result, task.mask, task.prompt, source=None)
            rows[name].append(
                dict(
                    task=task.seed,
                    success=v.success,
                    seconds=dt,
                    zoomed=out.zoomed,
                    sharpness=sharpness(out.images[0], mask) if name != "native" else None,
                )
            )
        print(
            f"task {i + 1}/{args.tasks}: "
            + ", ".join(
                f"{k} {r[-1]['seconds']:.2f}s {'ok' if r[-1]['success'] else '-'}"
                for k, r in rows.items()
            ),
            file=sys.stderr,
            flush=True,
        )
    ratio = statistics.median(
        b["seconds"] / a["seconds"] for a, b in zip(rows["native"], rows["big"])
    )
    res = dict(
        config=vars(args),
        native_px=native,
        seconds={k: statistics.median(r["seconds"] for r in v) for k, v in rows.items()},
        success={k: sum(r["success"] for r in v) / len(v) for k, v in rows.items()},
        ci={k: wilson(sum(r["success"] for r in v), len(v)) for k, v in rows.items()},
        time_ratio=ratio,
        paired=paired(rows["big"], rows["native"]),
        zoomed=sum(r["zoomed"] for r in rows["big"]),
        rows=rows,
    )
    detail_lines = []
    if args.detail:
        plain, det = rows["big"], rows["big, detail"]
        sharp = {
            k: statistics.median(abs(r["sharpness"]) for r in rows[k])
            for k in ("big", "big, detail")
        }
        closer = sum(abs(b["sharpness"]) < abs(a["sharpness"]) for a, b in zip(plain, det))
        res["detail"] = dict(
            strength=args.detail,
            median_abs_sharpness=sharp,
            median_sharpness={k: statistics.median(r["sharpness"] for r in rows[k]) for k in sharp},
            closer=closer,
            paired=paired(det, plain),
            time_ratio=statistics.median(b["seconds"] / a["seconds"] for a, b in zip(plain, det)),
        )
        d = res["detail"]
        detail_lines = [
            "",
            f"Detail pass (`detail_strength={args.detail}`) on the big frames, same seeds: "
            f"sharpness figure |log(E_in / E_ring)| median {sharp['big']:.2f} without, "
            f"{sharp['big, detail']:.2f} with (signed medians {d['median_sharpness']['big']:.2f}"
            f" and {d['median_sharpness']['big, detail']:.2f}; 0 = the surroundings' "
            f"high-frequency energy); closer to the surroundings with it in {closer} of "
            f"{len(det)} tasks; success paired: only with it {d['paired']['only_a']}, only "
            f"without {d['paired']['only_b']}, p = {d['paired']['p']:.2f}; time "
            f"{d['time_ratio']:.2f}x the big edit's.",
        ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_json(res, out / "results.json")
    d = res["paired"]
    lines = [
        f"# Big frames: the bench's tasks at {args.scale}x (issue 44)",
        "",
        f"`python benchmarks/big_frames.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
        f": {args.tasks} tasks, model `{args.model}` ({native} px native, tasks at "
        f"{native * args.scale} px), {args.steps} steps, {args.samples} samples, default options; "
        "big results resized to the native size and judged against the native task's mask.",
        "",
        "| frames | success [95 % CI] | s / edit (median) |",
        "|---|---|---|",
        *[
            f"| {k} | {res['success'][k]:.0%} [{res['ci'][k][0]:.0%}, {res['ci'][k][1]:.0%}] | "
            f"{res['seconds'][k]:.2f} |"
            for k in rows
        ],
        "",
        f"Time, big over native (median of same-task ratios): **{ratio:.2f}x**; the big frames' "
        f"regions zoomed in {res['zoomed']} of {args.tasks}. Paired: only big edits "
        f"{d['only_a']}, only native {d['only_b']}, exact sign test p = {d['p']:.2f}.",
        *detail_lines,
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
