"""LoRA speed (issue 41): an edit with a LoRA loaded the default way (fused into the weights),
with peft's adapter layers kept (``fuse=False``) and on a model with the LoRA merged into its
weights beforehand (plain modules, nothing of peft), on one SD-shaped random model
(``blendedit.tiny``'s ``sd-shaped`` preset, 512 px native, channels / ``--width-div``) and a
random rank-``--rank`` LoRA on its UNet's attention and its text encoder. The runs alternate in
one process after a warm-up; each ratio is the median of same-round ratios against the merged
model, and seconds per step are the edit's sampling time over its steps.

    python benchmarks/lora_speed.py [--rounds 7] [--out benchmarks/results/lora_speed]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from speed import alternate  # noqa: E402

from blendedit import BlendedLatentDiffusionPipeline  # noqa: E402
from blendedit.io import save_json  # noqa: E402
from blendedit.tiny import SD_SCHEDULER, build_tiny_components  # noqa: E402
from blendedit.tiny_lora import save_random_lora  # noqa: E402


def base(width_div: int) -> BlendedLatentDiffusionPipeline:
    from diffusers import DDIMScheduler

    c = build_tiny_components("sd-shaped", width_div=width_div, sample_size=64)
    parts = {k: c[k] for k in ("unet", "vae", "text_encoder", "tokenizer")}
    return BlendedLatentDiffusionPipeline(scheduler=DDIMScheduler(**SD_SCHEDULER), **parts)


def variants(width_div: int, rank: int, folder: Path) -> dict:
    """merged / fused / unfused pipelines over the same weights and LoRA."""
    plain = base(width_div)
    lora = save_random_lora(plain, folder, seed=1, rank=rank)
    fused = copy.deepcopy(plain)
    fused.load_lora_weights(lora)
    unfused = copy.deepcopy(plain)
    unfused.load_lora_weights(lora, fuse=False)
    merged = copy.deepcopy(plain)  # plain modules holding the merged weights
    merged.unet.load_state_dict(fused.unet.state_dict())
    merged.text_encoder.load_state_dict(fused.text_encoder.state_dict())
    return {"merged": merged, "fused (default)": fused, "unfused": unfused}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=256, help="image side in px")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--width-div", type=int, default=4)
    p.add_argument("--out", default="benchmarks/results/lora_speed")
    args = p.parse_args(argv)
    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(args.size, args.size, 3) * 255).astype(np.uint8))
    mask = np.zeros((args.size, args.size), bool)
    mask[args.size // 4 : 3 * args.size // 4, args.size // 4 : 3 * args.size // 4] = True
    with tempfile.TemporaryDirectory() as tmp:
        pipes = variants(args.width_div, args.rank, Path(tmp))
    sampling: dict[str, list[float]] = {k: [] for k in pipes}
    images = {}

    def run(name):
        def go():
            out = pipes[name](
                "a red circle",
                image,
                mask,
                num_inference_steps=args.steps,
                generator=torch.Generator().manual_seed(0),
                crop_to_mask=False,
            )
            sampling[name].append(out.timings["sample"] / args.steps)
            images[name] = np.asarray(out.images[0])

        return go

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    wall, _ = alternate({k: run(k) for k in pipes}, args.rounds, log)
    for k in sampling:  # the warm-up's
        sampling[k] = sampling[k][1:]
    ratio = {
        k: statistics.median(a / b for a, b in zip(sampling[k], sampling["merged"])) for k in pipes
    }
    diff = {k: int(np.abs(images[k].astype(int) - images["merged"]).max()) for k in pipes}
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    res = dict(
        config=vars(args),
        step_seconds={k: statistics.median(v) for k, v in sampling.items()},
        step_ratio_to_merged=ratio,
        edit_seconds={k: statistics.median(v) for k, v in wall.items()},
        max_pixel_diff_to_merged=diff,
        machine=machine,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_json(res, out / "results.json")
    lines = [
        "# LoRA speed: fused (the default), unfused and merged (issue 41)",
        "",
        f"`python benchmarks/lora_speed.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
        f": SD-shaped random model (512 px native, channels / {args.width_div}), a random rank-"
        f"{args.rank} LoRA on the UNet's attention and the text encoder, a {args.size} px edit, "
        f"{args.steps} steps, {args.rounds} alternating rounds; {machine}.",
        "",
        "| model | s / step (median) | step time / merged (median of same-round ratios) | "
        "edit s (median) | largest pixel difference to merged |",
        "|---|---|---|---|---|",
        *[
            f"| {k} | {res['step_seconds'][k]:.3f} | {ratio[k]:.3f}x | "
            f"{res['edit_seconds'][k]:.2f} | {diff[k]} |"
            for k in pipes
        ],
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
