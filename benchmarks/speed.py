"""Speed of a Blended Latent Diffusion edit, side by side with what a user would run instead.

All runs share one model, steps, size, guidance and batch, alternate in one process (the order
rotates every round) and are compared as ratios of medians:

1. our edit vs diffusers' StableDiffusionInpaintPipeline driving the same 4-channel UNet (which
   also blends latents) and vs plain text-to-image of the same steps;
2. ``crop_to_mask`` on a large image with a small mask vs a full-frame edit.

The model is a randomly initialised Stable-Diffusion-shaped pipeline (SD 1.x's blocks with the
channels divided by ``--width-div``): speed does not depend on the weights' values, and no real
weights can be downloaded here. Writes ``report.md`` and ``results.json`` to ``--out``.

    python benchmarks/speed.py              # full run (see the report for its time)
    python benchmarks/speed.py --quick      # a few minutes
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from blendedit import BlendedLatentDiffusionPipeline
from blendedit.io import save_json
from blendedit.models import quiet_transformers
from blendedit.tiny import SD_SCHEDULER, build_tiny_components

with quiet_transformers():
    from diffusers import (
        DDIMScheduler,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
    )

PROMPT = "a red circle"


def scene(size: int, mask_side: int, seed: int = 0) -> tuple[Image.Image, Image.Image]:
    """A random image and a centred square mask of ``mask_side`` pixels."""
    rng = np.random.RandomState(seed)
    img = Image.fromarray((rng.rand(size, size, 3) * 255).astype(np.uint8), "RGB")
    m = np.zeros((size, size), np.uint8)
    a = (size - mask_side) // 2
    m[a : a + mask_side, a : a + mask_side] = 255
    return img, Image.fromarray(m, "L")


def pipelines(width_div: int, sample_size: int) -> dict:
    c = build_tiny_components("sd-shaped", width_div=width_div, sample_size=sample_size)
    shared = dict(
        unet=c["unet"], vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"]
    )
    sched = lambda: DDIMScheduler(**SD_SCHEDULER)  # noqa: E731
    off = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    inpaint = StableDiffusionInpaintPipeline(scheduler=sched(), **shared, **off)
    t2i = StableDiffusionPipeline(scheduler=sched(), **shared, **off)
    for p in (inpaint, t2i):
        p.set_progress_bar_config(disable=True)
    own = copy.deepcopy(shared)  # ours: its own copy of the weights, as each tool loads them
    ours = BlendedLatentDiffusionPipeline(scheduler=sched(), ranker=None, **own)
    params = {
        k: sum(p.numel() for p in m.parameters())
        for k, m in shared.items()
        if hasattr(m, "parameters")
    }
    return dict(ours=ours, inpaint=inpaint, t2i=t2i, params=params)


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process: all its threads, not other processes)."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def paired_ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of a's time / b's time in the same round: runs of one round are
    back to back, so slow drift of the machine's speed cancels."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def alternate(runs: dict, rounds: int, log) -> tuple[dict, dict]:
    """Warm each run up once, then ``rounds`` rounds with the order rotated every round.
    Returns (wall times, CPU times), each {name: [seconds per round]}."""
    names = list(runs)
    for n in names:
        runs[n]()
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            w, c = timed(runs[n])
            wall[n].append(w)
            cpu[n].append(c)
        log(
            f"  round {r + 1}/{rounds}: "
            + ", ".join(f"{n} {wall[n][-1]:.2f}s (cpu {cpu[n][-1]:.2f}s)" for n in names)
        )
    return wall, cpu


def machine() -> str:
    """This machine as the speed reports name it: architecture, torch's threads and version."""
    return f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def write_report(out, res: dict, lines: list[str]) -> None:
    """``res`` as ``out/results.json`` and ``lines`` as ``out/report.md`` (``out`` created),
    the report also printed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_json(res, out / "results.json")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def vs_baselines(size: int, steps: int, rounds: int, width_div: int, log) -> dict:
    P = pipelines(width_div, size // 8)
    image, mask = scene(size, size * 3 // 8)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    common = dict(num_inference_steps=steps, guidance_scale=7.5, generator=None)
    stages: list[dict] = []  # our pipeline's own per-stage timings
    runs = {
        "ours": lambda: stages.append(
            P["ours"](
                PROMPT, image, mask, crop_to_mask=False, **{**common, "generator": g()}
            ).timings
        ),
        "diffusers_inpaint": lambda: P["inpaint"](
            PROMPT,
            image=image,
            mask_image=mask,
            height=size,
            width=size,
            strength=1.0,
            **{**common, "generator": g()},
        ),
        "text_to_image": lambda: P["t2i"](
            PROMPT, height=size, width=size, **{**common, "generator": g()}
        ),
    }
    log(f"ours vs baselines: {size}px, {steps} steps, width/{width_div}, {rounds} rounds")
    times, cpu = alternate(runs, rounds, log)
    med = {k: statistics.median(v) for k, v in times.items()}
    ours_stages = {k: statistics.median(t[k] for t in stages) for k in stages[0]}
    return dict(
        size=size,
        steps=steps,
        rounds=rounds,
        width_div=width_div,
        params=P["params"],
        times=times,
        median=med,
        ratio_to_inpaint=paired_ratio(times, "ours", "diffusers_inpaint"),
        overhead_over_t2i=paired_ratio(times, "ours", "text_to_image") - 1,
        cpu_times=cpu,
        cpu_ratio_to_inpaint=paired_ratio(cpu, "ours", "diffusers_inpaint"),
        cpu_overhead_over_t2i=paired_ratio(cpu, "ours", "text_to_image") - 1,
        ratio_of_medians=dict(
            to_inpaint=med["ours"] / med["diffusers_inpaint"],
            to_t2i=med["ours"] / med["text_to_image"],
        ),
        our_stages=ours_stages,
    )


def crop_speedup(
    size: int, mask_side: int, native: int, steps: int, rounds: int, width_div: int, log
) -> dict:
    P = pipelines(width_div, native // 8)
    image, mask = scene(size, mask_side, seed=1)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    kw = dict(num_inference_steps=steps, guidance_scale=7.5)
    boxes: list[tuple] = []  # the crop box of every cropped run
    runs = {
        "crop": lambda: boxes.append(
            P["ours"](PROMPT, image, mask, crop_to_mask=True, generator=g(), **kw).crop_box
        ),
        "full_frame": lambda: P["ours"](
            PROMPT, image, mask, crop_to_mask=False, generator=g(), **kw
        ),
    }
    log(f"crop_to_mask: {size}px image, {mask_side}px mask, native {native}px, {steps} steps")
    times, _ = alternate(runs, rounds, log)
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(
        size=size,
        mask_side=mask_side,
        native=native,
        steps=steps,
        rounds=rounds,
        width_div=width_div,
        crop_box=boxes[-1],
        times=times,
        median=med,
        speedup=med["full_frame"] / med["crop"],
    )


def report(res: dict, wall: float) -> str:
    b = res["baselines"]
    st = b["our_stages"]
    ok = lambda c: "**pass**" if c else "**FAIL**"  # noqa: E731
    lines = [
        "# Speed benchmark",
        "",
        f"Run {res['date']} on {res['machine']}, torch {res['torch']}, "
        f"{res['threads']} threads; wall time {wall / 60:.1f} min. Command: `{res['command']}`.",
        "",
        "Model: a random Stable-Diffusion-1.x-shaped pipeline, channels / "
        f"{b['width_div']} (UNet {b['params']['unet'] / 1e6:.1f} M, VAE "
        f"{b['params']['vae'] / 1e6:.1f} M, text encoder {b['params']['text_encoder'] / 1e6:.1f} M"
        " parameters). DDIM, guidance 7.5, one image, strength 1.",
        "",
        f"## Our edit vs the alternatives ({b['size']} px, {b['steps']} steps, "
        f"{b['rounds']} alternating rounds)",
        "",
        "| pipeline | median wall s | median CPU s | wall per round (s) |",
        "|---|---|---|---|",
    ]
    for k, v in b["times"].items():
        lines.append(
            f"| {k} | {b['median'][k]:.3f} | {statistics.median(b['cpu_times'][k]):.3f} | "
            f"{', '.join(f'{t:.2f}' for t in v)} |"
        )
    lines += [
        "",
        "| measure | ratio to diffusers' inpainting (target <= 1.0) | overhead over "
        "text-to-image (target <= 3 %) |",
        "|---|---|---|",
        f"| CPU time of this process | **{b['cpu_ratio_to_inpaint']:.3f}** "
        f"{ok(b['cpu_ratio_to_inpaint'] <= 1.0)} | **{100 * b['cpu_overhead_over_t2i']:.2f} %** "
        f"{ok(b['cpu_overhead_over_t2i'] <= 0.03)} |",
        f"| wall time | **{b['ratio_to_inpaint']:.3f}** {ok(b['ratio_to_inpaint'] <= 1.0)} | "
        f"**{100 * b['overhead_over_t2i']:.2f} %** {ok(b['overhead_over_t2i'] <= 0.03)} |",
        "",
        "CPU time counts only this process's work (all its threads), so other processes on the "
        "machine do not inflate it; wall time is what a user waits.",
        "",
        "Ratios are medians over rounds of the ratio within a round (runs of a round are back to "
        "back, so drift of the machine cancels); ratios of the medians: "
        f"{b['ratio_of_medians']['to_inpaint']:.3f} to inpainting, "
        f"{b['ratio_of_medians']['to_t2i']:.3f} to text-to-image.",
        "",
        "Our stages (median s): "
        + ", ".join(f"{k} {v:.3f}" for k, v in b["our_stages"].items())
        + f". The work text-to-image does not do (encode the image, paste the background) is "
        f"{100 * (st['encode'] + st['background']) / st['total']:.2f} % of our edit; blending "
        "inside the sampling loop adds two small tensor operations per step.",
        "",
    ]
    for c in res["crop"]:
        lines += [
            f"## crop_to_mask: {c['size']}x{c['size']} image, {c['mask_side']}x{c['mask_side']} "
            f"mask, native {c['native']} px ({c['steps']} steps, {c['rounds']} rounds)",
            "",
            f"Crop box {tuple(c['crop_box'])}. Median crop {c['median']['crop']:.2f} s, full "
            f"frame {c['median']['full_frame']:.2f} s: speed-up **{c['speedup']:.1f}x** "
            f"(target >= 5x) {ok(c['speedup'] >= 5)}",
            "",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    ap.add_argument("--size", type=int, default=256, help="edit size for the baseline comparison")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--width-div", type=int, default=4, help="SD channels divided by this")
    ap.add_argument(
        "--crop-natives",
        default="256,512",
        help="native sizes (px) of the models for the crop comparison",
    )
    ap.add_argument("--crop-steps", type=int, default=3)
    ap.add_argument("--crop-rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--skip-crop", action="store_true", help="only the baseline comparison")
    ap.add_argument("--out", default="benchmarks/out/speed")
    a = ap.parse_args(argv)
    if a.quick:
        a.steps, a.rounds, a.crop_natives, a.crop_steps, a.crop_rounds = 20, 3, "256", 2, 1
    if a.threads:
        torch.set_num_threads(a.threads)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    res = dict(
        date=time.strftime("%Y-%m-%d %H:%M"),
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        command="python benchmarks/speed.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
    )
    res["baselines"] = vs_baselines(a.size, a.steps, a.rounds, a.width_div, log)
    res["crop"] = []
    for native in [] if a.skip_crop else [int(x) for x in a.crop_natives.split(",")]:
        wd = a.width_div * (2 if native > 256 else 1)
        res["crop"].append(crop_speedup(1024, 96, native, a.crop_steps, a.crop_rounds, wd, log))
    wall = time.perf_counter() - t0
    res["wall_seconds"] = wall
    out = Path(a.out)
    save_json(res, out / "results.json")
    text = report(res, wall)
    (out / "report.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
