"""A 12-MP photo with a 400x300 mask (issue 44): our default edit (``crop_to_mask="auto"``: the
mask's box zoomed to the model's own scale) against diffusers' ``StableDiffusionInpaintPipeline``
with ``padding_mask_crop`` (its crop-and-resize for big frames), on one random SD-shaped model
(``blendedit.tiny``'s ``sd-shaped`` preset, 512 px native), from the same seed, alternating in one
process after a warm-up; the ratio is the median of same-round ratios (``speed.py``). The peak
memory of each is measured in a process of its own (the high-water mark of its resident set, one
warm-up and one edit).

    python benchmarks/big_photo.py [--rounds 5] [--out benchmarks/results/big_photo]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from speed import alternate, paired_ratio  # noqa: E402

from blendedit import BlendedLatentDiffusionPipeline  # noqa: E402
from blendedit.bench import rss_mb  # noqa: E402
from blendedit.io import save_json  # noqa: E402
from blendedit.models import quiet_transformers  # noqa: E402
from blendedit.tiny import SD_SCHEDULER, build_tiny_components  # noqa: E402

with quiet_transformers():
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline

PROMPT = "a red circle"


def photo(w: int, h: int, mw: int, mh: int) -> tuple[Image.Image, Image.Image]:
    """A smooth random photo-like frame (gradients and soft blobs) and a box mask off centre."""
    rng = np.random.RandomState(0)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        img[..., c] = 0.5 + 0.25 * np.sin(xx / (200 + 50 * c) + rng.rand() * 6)
        img[..., c] *= 0.8 + 0.2 * np.cos(yy / (150 + 40 * c))
    m = np.zeros((h, w), np.uint8)
    x0, y0 = int(w * 0.6), int(h * 0.35)
    m[y0 : y0 + mh, x0 : x0 + mw] = 255
    return Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)), Image.fromarray(m, "L")


def pipelines():
    c = build_tiny_components("sd-shaped", width_div=4, sample_size=64)  # 512 px native
    parts = dict(unet=c["unet"], vae=c["vae"], text_encoder=c["text_encoder"])
    parts["tokenizer"] = c["tokenizer"]
    own = copy.deepcopy(parts)  # ours: its own copy of the weights, as each tool loads them
    ours = BlendedLatentDiffusionPipeline(scheduler=DDIMScheduler(**SD_SCHEDULER), **own)
    theirs = StableDiffusionInpaintPipeline(
        scheduler=DDIMScheduler(**SD_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        **parts,
    )
    theirs.set_progress_bar_config(disable=True)
    return ours, theirs


def runs(ours, theirs, image, mask, steps: int, padding: int) -> dict:
    common = dict(num_inference_steps=steps, guidance_scale=7.5)

    def g():
        return torch.Generator().manual_seed(0)

    return {
        "ours": lambda: ours(PROMPT, image, mask, generator=g(), **common).images[0],
        "diffusers_padding_mask_crop": lambda: theirs(
            PROMPT,
            image=image,
            mask_image=mask,
            height=512,
            width=512,
            strength=1.0,
            padding_mask_crop=padding,
            generator=g(),
            **common,
        ).images[0],
    }


def peak_of(name: str, args) -> float:
    """The peak resident memory (MB) of a process that runs ``name`` twice."""
    cmd = [sys.executable, __file__, "--peak-of", name, "--steps", str(args.steps)]
    cmd += ["--size", str(args.size[0]), str(args.size[1]), "--padding", str(args.padding)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, nargs=2, default=[4000, 3000], help="photo W H")
    p.add_argument("--mask", type=int, nargs=2, default=[400, 300], help="mask box W H")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--padding", type=int, default=32, help="diffusers' padding_mask_crop")
    p.add_argument("--out", default="benchmarks/results/big_photo")
    p.add_argument("--peak-of", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    image, mask = photo(*args.size, *args.mask)
    ours, theirs = pipelines()
    fns = runs(ours, theirs, image, mask, args.steps, args.padding)
    if args.peak_of:  # the child process of peak_of
        fns[args.peak_of]()
        fns[args.peak_of]()
        print(rss_mb("VmHWM"))
        return 0
    t0 = time.time()
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    sizes = {n: fn().size for n, fn in fns.items()}
    wall, cpu = alternate(fns, args.rounds, log)
    res = dict(
        photo=args.size,
        mask=args.mask,
        steps=args.steps,
        rounds=args.rounds,
        padding_mask_crop=args.padding,
        output_sizes=sizes,
        times=wall,
        median={k: statistics.median(v) for k, v in wall.items()},
        ratio=paired_ratio(wall, "ours", "diffusers_padding_mask_crop"),
        peak_mb={n: peak_of(n, args) for n in fns},
        machine=f"{platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}",
        wall_s=round(time.time() - t0, 1),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_json(res, out / "results.json")
    m, pk = res["median"], res["peak_mb"]
    text = (
        "# A 12-MP photo, SD-shaped model: ours against diffusers' padding_mask_crop (issue 44)\n\n"
        f"`python benchmarks/big_photo.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
        f": a {args.size[0]}x{args.size[1]} photo, a {args.mask[0]}x{args.mask[1]} mask, one "
        f"random SD-shaped model (512 px native, channels / 4), {args.steps} steps, one sample, "
        f"{args.rounds} alternating rounds on {res['machine']}; {res['wall_s']} s in all.\n\n"
        "| | median (s) | peak memory (MB) | output |\n|---|---|---|---|\n"
        f"| ours (crop_to_mask auto) | {m['ours']:.2f} | {pk['ours']:.0f} | "
        f"{sizes['ours'][0]}x{sizes['ours'][1]} |\n"
        f"| diffusers, padding_mask_crop={args.padding} | "
        f"{m['diffusers_padding_mask_crop']:.2f} | {pk['diffusers_padding_mask_crop']:.0f} | "
        f"{sizes['diffusers_padding_mask_crop'][0]}x{sizes['diffusers_padding_mask_crop'][1]} |\n"
        f"\nOurs / theirs: **{res['ratio']:.3f}x** (median of same-round ratios).\n"
    )
    (out / "report.md").write_text(text)
    print(text)
    print(json.dumps(res["peak_mb"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
