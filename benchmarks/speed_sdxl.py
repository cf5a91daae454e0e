"""Speed of a Blended Latent Diffusion edit on an SDXL-shaped model, side by side with diffusers'
StableDiffusionXLInpaintPipeline (on the same 4-channel UNet, which also blends latents) and
with SDXL text-to-image of the same steps: all three share one random SDXL-shaped model
(`blendedit.tiny.build_tiny_sdxl_components("sdxl-shaped")`: SDXL's block layout, channels
divided by ``--width-div``), steps, size, guidance and seed, and alternate in one process (the
order rotates every round); ratios are medians of same-round ratios, as in ``speed.py``.

    python benchmarks/speed_sdxl.py [--quick] [--out benchmarks/results/speed_sdxl]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from blendedit import BlendedLatentDiffusionPipeline
from blendedit.io import save_json
from blendedit.models import quiet_transformers
from blendedit.tiny import build_tiny_sdxl_components

sys.path.insert(0, str(Path(__file__).parent))
from speed import PROMPT, alternate, paired_ratio, scene  # noqa: E402

with quiet_transformers():
    from diffusers import StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline


def pipelines(width_div: int, sample_size: int) -> dict:
    c = build_tiny_sdxl_components("sdxl-shaped", width_div=width_div, sample_size=sample_size)
    sched = c.pop("scheduler")
    fresh = lambda: type(sched).from_config(sched.config)  # noqa: E731
    inpaint = StableDiffusionXLInpaintPipeline(scheduler=fresh(), **c)
    t2i = StableDiffusionXLPipeline(scheduler=fresh(), **c)
    for p in (inpaint, t2i):
        p.set_progress_bar_config(disable=True)
    c = copy.deepcopy(c)  # ours: its own copy of the weights, as each tool loads them
    ours = BlendedLatentDiffusionPipeline(
        c["unet"],
        c["vae"],
        c["text_encoder"],
        c["tokenizer"],
        fresh(),
        text_encoder_2=c["text_encoder_2"],
        tokenizer_2=c["tokenizer_2"],
        force_zeros_for_empty_prompt=True,
    )
    ours.set_scheduler("euler")  # SDXL's own sampler, as the diffusers pipelines use
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in c.items() if "tok" not in k}
    return dict(ours=ours, inpaint=inpaint, t2i=t2i, params=params)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="fewer rounds and steps")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--width-div", type=int, default=16)
    p.add_argument("--out", default="benchmarks/results/speed_sdxl")
    args = p.parse_args(argv)
    steps, rounds = (10, 5) if args.quick else (25, 11)
    t_all = time.time()
    P = pipelines(args.width_div, args.size // 8)
    image, mask = scene(args.size, args.size * 3 // 8)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    common = dict(num_inference_steps=steps, guidance_scale=5.0)
    size = dict(height=args.size, width=args.size)
    runs = {
        "ours": lambda: P["ours"](PROMPT, image, mask, crop_to_mask=False, generator=g(), **common),
        "diffusers_sdxl_inpaint": lambda: P["inpaint"](
            PROMPT, image=image, mask_image=mask, strength=1.0, generator=g(), **size, **common
        ),
        "sdxl_text_to_image": lambda: P["t2i"](PROMPT, generator=g(), **size, **common),
    }
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    log(f"SDXL-shaped: {args.size}px, {steps} steps, width/{args.width_div}, {rounds} rounds")
    times, cpu = alternate(runs, rounds, log)
    res = dict(
        size=args.size,
        steps=steps,
        rounds=rounds,
        width_div=args.width_div,
        params=P["params"],
        times=times,
        median={k: statistics.median(v) for k, v in times.items()},
        ratio_to_inpaint=paired_ratio(times, "ours", "diffusers_sdxl_inpaint"),
        overhead_over_t2i=paired_ratio(times, "ours", "sdxl_text_to_image") - 1,
        cpu_ratio_to_inpaint=paired_ratio(cpu, "ours", "diffusers_sdxl_inpaint"),
        machine=f"{platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}",
        wall_seconds=round(time.time() - t_all, 1),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_json(res, out / "results.json")
    med = res["median"]
    text = "\n".join(
        [
            "# Speed on an SDXL-shaped model (issue 29)",
            "",
            f"`python benchmarks/speed_sdxl.py{' --quick' if args.quick else ''}`: "
            f"{args.size} px, {steps} Euler steps, guidance 5, one sample, a random "
            f"SDXL-shaped model (channels / {args.width_div}; UNet "
            f"{res['params']['unet'] / 1e6:.1f} M parameters), {rounds} alternating rounds on "
            f"{res['machine']}; {res['wall_seconds']} s in all.",
            "",
            "| run | median seconds |",
            "|---|---|",
            *[f"| {k} | {v:.3f} |" for k, v in med.items()],
            "",
            f"- ours / diffusers' SDXL inpainting: **{res['ratio_to_inpaint']:.3f}x** (median of "
            f"same-round ratios; CPU time {res['cpu_ratio_to_inpaint']:.3f}x)",
            f"- ours over SDXL text-to-image: **{100 * res['overhead_over_t2i']:+.1f} %**",
        ]
    )
    (out / "report.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
