"""What `background=decoder` buys and what it costs, per setting, on Shapes World edits.

For each task: one latent edit with `background=none` (its sampling timed), then the background
step redone from the same latents (`reconstruct_background`, no new sampling) with `paste`,
`poisson` and decoder fine-tuning in several settings (layers tuned, steps, learning rate). Each
setting's background time is divided by the sampling time of the same edit, measured in the same
process. Scored by the pixel judge per sample: PSNR outside the mask against the source, seam
error (the step across the mask border against the source's), and success; and how far the
fine-tuning moved the edit inside the mask (PSNR against the raw decode there).

    python benchmarks/decoder_cost.py --model <pipeline folder> [--tasks 12] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from blendedit import BlendedLatentDiffusionPipeline
from blendedit.bench import add_study_flags, edit_task, model_label, study_meta
from blendedit.io import save_json
from blendedit.toy.judge import judge
from blendedit.toy.tasks import task_suite

#: name -> reconstruct_background options
SETTINGS: dict[str, dict] = {
    "paste": dict(background="paste"),
    "poisson": dict(background="poisson"),
    "decoder (defaults: last, 75 @1e-3, margin 1, lambda 10)": dict(background="decoder"),
    "decoder last, 0 steps (the crop alone)": dict(background="decoder", decoder_steps=0),
    "decoder last, lambda 100": dict(background="decoder", decoder_lambda=100.0),
    "decoder last 40 @2e-3": dict(background="decoder", decoder_steps=40, decoder_lr=2e-3),
    "decoder last, margin 2": dict(background="decoder", decoder_crop_margin=2),
    "decoder last, margin 4": dict(background="decoder", decoder_crop_margin=4),
    "decoder head 75 @3e-3": dict(background="decoder", decoder_layers="head"),
    "decoder all 75 @1e-4, margin 1": dict(background="decoder", decoder_layers="all"),
    "decoder all 75 @1e-4, whole frame, lambda 100 (the paper)": dict(
        background="decoder", decoder_layers="all", decoder_crop_margin=-1, decoder_lambda=100.0
    ),
}


def inside_psnr(images, raw, mask: np.ndarray) -> float:
    """PSNR (dB) inside the mask of ``images`` against the raw decode ``raw``."""
    a = np.stack([np.asarray(i, dtype=np.float64) for i in images])
    b = np.stack([np.asarray(i, dtype=np.float64) for i in raw])
    mse = float(((a - b) ** 2)[:, mask].mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="pipeline folder (e.g. the shipped toy one)")
    add_study_flags(
        p, list(SETTINGS), 12, 50, "benchmarks/out/decoder_cost"
    )  # 50: the default edit
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = BlendedLatentDiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.float32)
    pipe.ranker = None  # ranking is not what is measured; keep the samples in seed order
    tasks = task_suite(args.tasks, seed=11)
    rows: dict[str, list[dict]] = {s: [] for s in ["none", *args.settings]}
    t_all = time.perf_counter()
    for task in tasks:
        raw = edit_task(pipe, task, args.samples, args.steps, guidance_scale=5.0, background="none")
        sample_s = raw.timings["sample"]
        inside = np.asarray(task.mask) > 0
        for name in ["none", *args.settings]:
            out = (
                raw
                if name == "none"
                else pipe.reconstruct_background(raw, task.image, **SETTINGS[name])
            )
            verdicts = [judge(im, task.mask, task.prompt, source=task.image) for im in out.images]
            rows[name].append(
                dict(
                    task=task.seed,
                    kind=task.kind,
                    ratio=0.0 if name == "none" else out.timings["background"] / sample_s,
                    seconds=0.0 if name == "none" else out.timings["background"],
                    sample_s=sample_s,
                    psnr_outside=statistics.mean(min(v.psnr_outside, 99.0) for v in verdicts),
                    seam_error=statistics.mean(v.seam_error for v in verdicts),
                    success=sum(v.success for v in verdicts) / len(verdicts),
                    inside_psnr=min(inside_psnr(out.images, raw.images, inside), 99.0),
                )
            )
        print(f"task {task.seed} ({task.kind}) done", flush=True)
    summary = {
        name: {
            k: statistics.mean(r[k] for r in rs)
            for k in ("ratio", "seconds", "psnr_outside", "seam_error", "success", "inside_psnr")
        }
        for name, rs in rows.items()
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = study_meta(args, t_all, model=args.model)
    save_json(dict(meta=meta, summary=summary, rows=rows), out / "decoder_cost.json")
    lines = [
        "# Background reconstruction: what each setting buys and costs",
        "",
        f"{args.tasks} Shapes World edit tasks x {args.samples} samples, model `{args.model}`, "
        f"{args.steps} DDIM steps, guidance 5, {meta['threads']} torch thread(s) on "
        f"{meta['cores']} cores ({meta['cpu']}), torch {meta['torch']}; {meta['wall_s']:.0f} s "
        "in all. Every setting reconstructs from the same latents (one sampling per task). "
        "Cost: the background step's seconds over the sampling's seconds of the same edit, in the "
        "same process. PSNR outside: pixels outside the mask against the source (99 caps exact "
        "results). Seam error: the step across the mask border minus the source's (0-255 levels). "
        "Inside: PSNR inside the mask against the raw decode (how far the reconstruction moved "
        "the edit itself). Success: the judge, per sample.",
        "",
    ]
    label = model_label(args.model)
    if label:
        lines += [label, ""]
    lines += [
        "| setting | cost (x sampling) | s | PSNR outside (dB) | gain over none (dB) | seam "
        "error | inside vs raw (dB) | success |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = summary["none"]["psnr_outside"]
    for name, s in summary.items():
        lines.append(
            f"| {name} | {s['ratio']:.2f} | {s['seconds']:.2f} | {s['psnr_outside']:.2f} | "
            f"{s['psnr_outside'] - base:+.2f} | {s['seam_error']:.2f} | {s['inside_psnr']:.1f} | "
            f"{s['success']:.0%} |"
        )
    (out / "decoder_cost.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(summary, indent=1))
    print(out / "decoder_cost.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
