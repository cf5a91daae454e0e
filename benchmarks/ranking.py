"""Best-of-N ranking, measured: how often CLIP's pick among N samples is an edit the judge
accepts, per ranking region, against an oracle that always picks a judged success.

Our latent method (defaults, ranking off) draws N samples per Shapes World edit task; the judge
reads every sample; CLIP scores each with every region in :data:`REGIONS` (the pipeline's
``rank_region`` and the crop's context). For n = 1, 2, 4 ... N: the success rate of the first
sample, of the best of the first n by each region, and of the oracle (any of the first n a
success: the most any ranker could reach). Pair accuracy: over every (success, failure) pair of
samples of one task, how often the region scores the success higher. Cost: CLIP's scoring time
over the sampling time of the same edits, in this run.

    python benchmarks/ranking.py                       # 120 tasks x 8 samples, about 10 min
    python benchmarks/ranking.py --tasks 30 --samples 4 --out /tmp/ranking

``--pixel-model toy``: Blended Diffusion's samples instead (its defaults, 100 respaced DDPM steps
with a quarter skipped, the background not enforced, as in ``pixel_quality.py``), each region
scored by the CLIP that ranks and by the one that guides, and the samples also ranked by their
final guidance loss (lowest first).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from blendedit import BlendedDiffusionPipeline, BlendedLatentDiffusionPipeline
from blendedit.bench import (
    add_study_flags,
    edit_task,
    model_label,
    paired,
    study_meta,
    wilson,
)
from blendedit.io import mask_to_tensor, pil_to_tensor, save_json
from blendedit.toy.judge import judge
from blendedit.toy.tasks import task_suite

#: name -> (rank_region, crop context); the first is the pipeline's default.
REGIONS: dict[str, tuple[str, float]] = {
    "crop, context 0.25 (default)": ("crop", 0.25),
    "crop, context 0": ("crop", 0.0),
    "crop, context 0.5": ("crop", 0.5),
    "crop, context 1": ("crop", 1.0),
    "masked (the references)": ("masked", 0.25),
    "full frame": ("full", 0.25),
}


LOSS = "lowest final guidance loss (pixel)"


def pair_accuracy(scores: list[list[float]], ok: list[list[bool]]) -> tuple[float, int]:
    """Over every (success, failure) pair of samples of one task, the share the scores order
    right (ties count half), and the number of pairs."""
    right, pairs = 0.0, 0
    for s, y in zip(scores, ok, strict=True):
        good = [i for i, v in enumerate(y) if v]
        bad = [i for i, v in enumerate(y) if not v]
        for a, b in itertools.product(good, bad):
            pairs += 1
            right += 1.0 if s[a] > s[b] else 0.5 if s[a] == s[b] else 0.0
    return (right / pairs if pairs else float("nan")), pairs


def best_of(scores: list[list[float]], ok: list[list[bool]], n: int) -> list[bool]:
    """Per task: is the highest-scoring of the first ``n`` samples a success (first on ties)?"""
    return [y[max(range(n), key=lambda i: (s[i], -i))] for s, y in zip(scores, ok, strict=True)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="toy", help="pipeline (default: the shipped toy one)")
    p.add_argument(
        "--pixel-model",
        default=None,
        help="rank Blended Diffusion's samples of this pixel model (e.g. toy) instead",
    )
    p.add_argument("--seed", type=int, default=0, help="task suite seed (default: 0)")
    add_study_flags(p, list(REGIONS), 120, 0, "benchmarks/out/ranking")
    p.add_argument(
        "--save-samples",
        default=None,
        help="also write every sample (uint8), its judged success and its task to this .npz "
        "(the data of benchmarks/rank_study.py)",
    )
    p.set_defaults(samples=8)
    args = p.parse_args(argv)
    pixel = args.pixel_model is not None
    args.steps = args.steps or (100 if pixel else 25)
    unknown = [s for s in args.settings if s not in REGIONS]
    if unknown:
        p.error(f"--settings: unknown {unknown}; known: {list(REGIONS)}")
    if args.samples < 2:
        p.error("--samples: ranking needs at least 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    if pixel:  # its own ranker stays (it always ranks); samples are put back in seed order
        pipe = BlendedDiffusionPipeline.from_pretrained(args.pixel_model)
        rankers = {"": pipe.ranker, "guidance CLIP, ": pipe.clip}
        options = dict(enforce_background=False)
        tasks = task_suite(args.tasks, seed=args.seed)
    else:
        pipe = BlendedLatentDiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.float32)
        rankers, pipe.ranker = {"": pipe.ranker}, None  # sample in seed order; score here
        options = dict(guidance_scale=5.0)
        tasks = task_suite(args.tasks, size=pipe.native_size, seed=args.seed)
    if rankers[""] is None:
        p.error("--model: this study needs a pipeline with a CLIP ranker (the built-in ones)")
    if pixel and rankers["guidance CLIP, "] is rankers[""]:
        del rankers["guidance CLIP, "]  # one CLIP guides and ranks
    names = [f"{who}{name}" for who in rankers for name in args.settings]
    if pixel:
        names.append(LOSS)
    ok: list[list[bool]] = []
    scores: dict[str, list[list[float]]] = {s: [] for s in names}
    sample_s = score_s = 0.0
    kept: list[np.ndarray] = []  # --save-samples: (samples, H, W, 3) uint8 per task
    t_all = time.perf_counter()
    for i, task in enumerate(tasks):
        t0 = time.perf_counter()
        out = edit_task(pipe, task, args.samples, args.steps, **options)
        sample_s += time.perf_counter() - t0
        images = out.images
        if pixel:  # back in seed order, and the guidance loss as a score
            where = [out.order.index(k) for k in range(len(images))]  # sample k's rank
            images = [images[r] for r in where]
            scores[LOSS].append([-out.clip_losses[r] for r in where])
        ok.append([judge(im, task.mask, task.prompt, source=task.image).success for im in images])
        if args.save_samples:
            kept.append(np.stack([np.asarray(im.convert("RGB")) for im in images]))
        x = torch.cat([pil_to_tensor(im) for im in images])
        m = mask_to_tensor(task.mask)
        t0 = time.perf_counter()
        for who, ranker in rankers.items():
            for name in args.settings:
                region, context = REGIONS[name]
                scores[f"{who}{name}"].append(
                    ranker.score(x, task.prompt, m, region, context).tolist()
                )
        score_s += time.perf_counter() - t0
        print(
            f"task {i + 1}/{len(tasks)} ({task.kind}): {sum(ok[-1])} of {args.samples}", flush=True
        )

    if args.save_samples:
        Path(args.save_samples).parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            args.save_samples,
            images=np.stack(kept),
            ok=np.array(ok, bool),
            task_seeds=np.array([t.seed for t in tasks]),
            suite=json.dumps(dict(n=len(tasks), seed=args.seed, size=tasks[0].image.size[0])),
            method="pixel" if pixel else "latent",
        )
    clip_scored = len(scores) - (LOSS in scores)  # the rankings that ran CLIP (timed above)
    ns = sorted({n for n in (1, 2, 4, 8, 16, args.samples) if n <= args.samples})
    kinds = [t.kind for t in tasks]

    def rate(hits: list[bool]) -> dict:
        k = sum(hits)
        by_kind = {
            kind: statistics.mean(h for h, kk in zip(hits, kinds, strict=True) if kk == kind)
            for kind in dict.fromkeys(kinds)
        }
        return dict(success=k / len(hits), ci=wilson(k, len(hits)), by_kind=by_kind)

    first = [y[0] for y in ok]
    oracle = {n: [any(y[:n]) for y in ok] for n in ns}
    picks = {name: {n: best_of(s, ok, n) for n in ns} for name, s in scores.items()}
    default = next(iter(args.settings))
    n_default = 4 if 4 in ns else ns[-1]  # the bench's samples per edit
    summary = dict(
        first_sample=rate(first),
        per_sample=statistics.mean(v for y in ok for v in y),
        oracle={n: rate(h) for n, h in oracle.items()},
        regions={
            name: dict(
                best_of={n: rate(h) for n, h in picks[name].items()},
                pair_accuracy=pair_accuracy(scores[name], ok),
                paired_with_default=paired(
                    [dict(success=h) for h in picks[default][n_default]],
                    [dict(success=h) for h in picks[name][n_default]],
                ),
            )
            for name in scores
        },
        cost=dict(
            sample_s=sample_s / len(tasks),
            score_s_per_region=score_s / len(tasks) / clip_scored,
            ratio=score_s / clip_scored / sample_s,
        ),
    )
    meta = study_meta(
        args,
        t_all,
        model=args.pixel_model if pixel else args.model,
        method="pixel" if pixel else "latent",
        seed=args.seed,
        ns=ns,
        n_default=n_default,
        label="" if pixel else model_label(args.model),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_json(dict(meta=meta, summary=summary, ok=ok, scores=scores), out / "ranking.json")
    (out / "ranking.md").write_text(report(meta, summary))
    print(json.dumps(summary["cost"], indent=1))
    print(out / "ranking.md")
    return 0


def report(meta: dict, summary: dict) -> str:
    ns, nd = meta["ns"], meta["n_default"]
    pct = lambda r: f"{r['success']:.0%}"  # noqa: E731
    cost = summary["cost"]
    lines = [
        "# Best-of-N ranking: CLIP's pick against the judge",
        "",
        f"{meta['tasks']} Shapes World edit tasks (suite seed {meta['seed']}) x "
        f"{meta['samples']} samples of "
        + (
            f"Blended Diffusion (defaults, {meta['steps']} respaced DDPM steps, a quarter "
            "skipped, the background not enforced)"
            if meta.get("method") == "pixel"
            else f"our latent method (defaults, {meta['steps']} DDIM steps, guidance 5)"
        )
        + f", model `{meta['model']}`; {meta['threads']} torch thread(s) on "
        f"{meta['cores']} cores, torch {meta['torch']}; {meta['wall_s']:.0f} s in all. "
        "Best of n: the judge's success rate of the sample CLIP scores highest among the first n "
        "(the same samples for every region). Oracle: any of the first n a success, the most a "
        "ranker could reach. Pair accuracy: over every (success, failure) pair of samples of a "
        "task, the share the region scores the success higher. Paired: at n = "
        f"{nd} (the bench's samples), the tasks only the default's pick edits against those "
        "only this region's pick edits, and the exact sign test's p.",
        "",
        *([meta["label"], ""] if meta.get("label") else []),
        f"Per sample: {summary['per_sample']:.1%} of samples are judged successes; "
        f"the first sample alone {pct(summary['first_sample'])}.",
        "",
        "| ranking | " + " | ".join(f"best of {n}" for n in ns if n > 1) + " | pair accuracy "
        f"(pairs) | paired at n = {nd} |",
        "|---|" + "---|" * (len([n for n in ns if n > 1]) + 2),
        "| **oracle** | "
        + " | ".join(pct(summary["oracle"][n]) for n in ns if n > 1)
        + " | - | - |",
    ]
    for i, (name, r) in enumerate(summary["regions"].items()):
        acc, pairs = r["pair_accuracy"]
        pr = r["paired_with_default"]
        vs = "-" if i == 0 else f"{pr['only_a']} vs {pr['only_b']}, p = {pr['p']:.2f}"
        lines.append(
            f"| {name} | "
            + " | ".join(pct(r["best_of"][n]) for n in ns if n > 1)
            + f" | {acc:.3f} ({pairs}) | {vs} |"
        )
    default = next(iter(summary["regions"].values()))
    lines += [
        "",
        "By task kind, best of "
        + f"{nd} (default ranking) against the oracle: "
        + ", ".join(
            f"{k} {v:.0%} / {summary['oracle'][nd]['by_kind'][k]:.0%}"
            for k, v in default["best_of"][nd]["by_kind"].items()
        )
        + ".",
        "",
        f"Cost: scoring {meta['samples']} samples with one region takes "
        f"{cost['score_s_per_region']:.3f} s, {cost['ratio']:.3f}x the sampling of the same "
        f"edit ({cost['sample_s']:.2f} s).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
