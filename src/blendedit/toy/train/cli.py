"""The command line of `blendedit train-toy` / `python -m blendedit.toy.train`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from ...models import TOY_DIR, quiet_transformers
from ..data import build_dataset
from .arch import UNET_CONFIG, VAE_FACTORS, ZERO_SNR_SAMPLING
from .assemble import SHIPPED_PARTS, assemble
from .clip import train_clip, train_vision
from .guide_clip import train_guide_clip
from .inpaint import TRAIN_ONLY, ship_inpaint, train_inpaint
from .pixel import train_pixel
from .snapshots import snapshot
from .unet import train_unet
from .vae import train_vae

DEFAULTS = {  # per model: steps, batch size, lr, warm-up
    "vision": dict(steps=8000, batch_size=128, lr=1e-3, warmup=200),
    "clip": dict(steps=3000, batch_size=128, lr=5e-4, warmup=200),
    "vae": dict(steps=6000, batch_size=16, lr=3e-4, warmup=200),
    "unet": dict(steps=3000, batch_size=32, lr=4e-4, warmup=200),
    "pixel": dict(steps=3000, batch_size=16, lr=3e-4, warmup=200),
    "guide-clip": dict(steps=2000, batch_size=128, lr=2e-4, warmup=100),
    "inpaint": dict(steps=4000, batch_size=32, lr=2e-4, warmup=100),
}
HELP = {
    "guide-clip": "tune a CLIP's vision tower to read the pixel model's x̂0 (for guidance)",
    "inpaint": "fine-tune the text-to-image UNet into a 9-channel inpainting UNet",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="blendedit train-toy", description="Train the shipped Shapes World models."
    )
    sub = p.add_subparsers(dest="what", required=True)
    d = sub.add_parser("data", help="render a training data set")
    d.add_argument("--out", default="runs/toy/data")
    d.add_argument("-n", type=int, default=30000)
    d.add_argument("--size", type=int, default=128)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--workers", type=int, default=None)
    d.add_argument(
        "--objects", type=int, default=None, help="objects per scene (default: 0 to 3 at random)"
    )
    for name, dflt in DEFAULTS.items():
        s = sub.add_parser(name, help=HELP.get(name, f"train the {name} model"))
        if name not in ("unet", "guide-clip"):  # the UNet's takes several; guide-clip renders
            s.add_argument("--data", default="runs/toy/data")
        s.add_argument("--heldout", default="runs/toy/heldout")
        s.add_argument("--out", default=f"runs/toy/{name}")
        s.add_argument("--steps", type=int, default=dflt["steps"])
        s.add_argument("--batch-size", type=int, default=dflt["batch_size"])
        s.add_argument("--lr", type=float, default=dflt["lr"])
        s.add_argument("--warmup", type=int, default=dflt["warmup"])
        s.add_argument("--ema", type=float, default=0.999)
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--threads", type=int, default=None)
        s.add_argument("--log-every", type=int, default=25)
        s.add_argument("--ckpt-every", type=int, default=250)
        s.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
        s.add_argument(
            "--stop-at",
            type=int,
            default=None,
            help="checkpoint and exit at this step (the schedule still runs to --steps); "
            "run again without it to go on",
        )
        if name in ("vision", "clip"):
            s.add_argument("--patch", type=int, default=8, help="ViT patch size (px at 64 px)")
        if name == "vision":
            s.set_defaults(data="runs/toy/data-single")
        if name == "clip":
            s.add_argument("--crop-prob", type=float, default=0.3)
            s.add_argument(
                "--class-loss",
                type=float,
                default=0.0,
                help="weight of an extra loss: one-object images against all 30 "
                "'a {colour} {shape}' prompts",
            )
            s.add_argument(
                "--init-from",
                default=None,
                help="CLIP folder, or a `vision` run's model/, to start from (weights whose "
                "shapes fit; e.g. another patch size keeps only the text encoder)",
            )
            s.add_argument(
                "--freeze-vision",
                action="store_true",
                help="do not train the vision tower (locked-image tuning from --init-from)",
            )
            s.add_argument(
                "--freeze-text",
                action="store_true",
                help="do not train the text encoder (its hidden states condition the UNet)",
            )
        if name == "guide-clip":
            s.add_argument(
                "--init-from",
                default=str(TOY_DIR / "clip"),
                help="CLIP folder (or a clip run) to tune; its text tower stays as it is "
                "(default: the shipped CLIP)",
            )
            s.add_argument(
                "--pixel",
                default="toy",
                help="pixel model whose x̂0 the CLIP learns to read (folder or built-in name)",
            )
            s.add_argument("--bank", type=int, default=6000, help="x̂0 images to compute")
            s.add_argument("--t-max", type=int, default=800, help="noise up to this step of 1000")
            s.add_argument("--clean-share", type=float, default=0.15, help="share of clean renders")
            s.add_argument(
                "--mask-prob",
                type=float,
                default=0.7,
                help="share of draws masked as an edit (the background zeroed, as guidance does)",
            )
        if name == "vae":
            s.add_argument(
                "--factor",
                type=int,
                default=8,
                choices=VAE_FACTORS,
                help="downscale: 8 (16x16 latents at 128 px, as Stable Diffusion) or 4 (32x32, "
                "three levels of two layers)",
            )
            s.add_argument("--crop", type=int, default=32, help="training crop side (px)")
            s.add_argument("--kl", type=float, default=1e-6)
            s.add_argument(
                "--decoder-only",
                default=None,
                metavar="VAE_FOLDER",
                help="fine-tune only the decoder of this VAE (encoder and latents unchanged)",
            )
            s.add_argument(
                "--init-from",
                default=None,
                metavar="VAE_FOLDER",
                help="fine-tune all of this VAE (a run or a model folder; the latents change, so "
                "the UNet must be trained again on them)",
            )
            s.add_argument(
                "--denoised-by",
                default=None,
                metavar="PIPELINE",
                help="with --decoder-only: decode also what this pipeline's UNet predicts from "
                "the latents noised (a decoder that draws crisp shapes from imperfect latents)",
            )
            s.add_argument(
                "--max-t", type=int, default=300, help="--denoised-by: noise up to this step"
            )
            s.add_argument(
                "--clean-share",
                type=float,
                default=0.25,
                help="--denoised-by: share of each batch decoded from the clean latents",
            )
            s.add_argument(
                "--object-weight",
                type=float,
                default=0.0,
                help="extra loss weight on object pixels and a 2 px band around them (the scenes "
                "are mostly background, which a plain loss favours; 0: unweighted)",
            )
        if name in ("unet", "pixel", "inpaint"):
            s.add_argument("--min-snr", type=float, default=5.0)
        if name == "inpaint":
            s.add_argument(
                "--pipeline",
                default=str(TOY_DIR / "pipeline"),
                help="toy pipeline folder whose UNet is widened and whose VAE, text encoder and "
                "tokenizer are used (default: the shipped one)",
            )
            s.add_argument(
                "--init-from",
                default=None,
                help="UNet run or folder to start from instead of the pipeline's (a 9-channel "
                "one goes on as it is)",
            )
            s.add_argument(
                "--train-only",
                nargs="+",
                default=list(TRAIN_ONLY),
                metavar="PREFIX",
                help="tune only the parameters under these names (the rest stay the text-to-"
                f"image UNet's); default {' '.join(TRAIN_ONLY)}",
            )
        if name in ("unet", "pixel", "vae", "inpaint"):
            s.add_argument(
                "--time-budget",
                type=float,
                default=None,
                metavar="SECONDS",
                help="train for this many seconds (summed over resumed runs) instead of --steps; "
                "the learning rate decays over the budget (for equal-compute comparisons)",
            )
            s.add_argument(
                "--snapshots",
                type=int,
                default=0,
                help="with --time-budget: keep the weights (EMA) at each K-th of the budget in "
                "RUN/snapshot-1 ... snapshot-K",
            )
            s.add_argument(
                "--device",
                default="auto",
                help="where to train: auto (a CUDA GPU when there is one, else the CPU), cpu, "
                "cuda, cuda:1 ... (noise and steps are drawn on the CPU either way: a run sees the "
                "same draws on any device)",
            )
            s.add_argument(
                "--bf16",
                action="store_true",
                help="bfloat16 autocast for the forward pass (weights, optimizer and EMA stay "
                "float32): for GPUs (on a CPU, convolutions in bfloat16 can be far slower)",
            )
        if name == "pixel":
            s.add_argument(
                "--init-from",
                default=None,
                help="pixel run's model/ (or a UNet2DModel folder) to start from",
            )
            s.add_argument(
                "--min-objects",
                type=int,
                default=0,
                help="train only on scenes with at least this many objects (the data sets hold "
                "0 to 3, a quarter of them empty)",
            )
        if name == "unet":
            s.add_argument(
                "--data",
                nargs="+",
                default=["runs/toy/data"],
                help="one or more data sets; batches are drawn uniformly over all their images",
            )
            s.add_argument(
                "--limit",
                type=int,
                default=None,
                help="take only the first N images of each data set (fewer latents to encode)",
            )
            s.add_argument("--clip", default="runs/toy/clip")
            s.add_argument("--vae", default="runs/toy/vae")
            s.add_argument(
                "--init-from",
                default=None,
                help="UNet run or folder to start from (e.g. one trained on an earlier text "
                "encoder)",
            )
            s.add_argument(
                "--object-weight",
                type=float,
                default=0.0,
                help="extra loss weight on latent cells under an object (the scenes are mostly "
                "background, where the noise is easy to predict; 0: unweighted)",
            )
            s.add_argument(
                "--channels",
                type=int,
                nargs=3,
                default=None,
                metavar=("C16", "C8", "C4"),
                help="widths of the UNet's three levels (16x16, 8x8, 4x4 latents); default "
                f"{' '.join(map(str, UNET_CONFIG['block_out_channels']))}",
            )
            s.add_argument(
                "--layers",
                type=int,
                default=None,
                help=f"ResNet layers per block (default {UNET_CONFIG['layers_per_block']})",
            )
            s.add_argument(
                "--zero-snr",
                action="store_true",
                help="train on Stable Diffusion's schedule rescaled to zero terminal SNR, with "
                "v-prediction (the last step is pure noise, so the seed's noise does not set the "
                "layout); the pipeline then samples with "
                + ", ".join(f"{k}={v}" for k, v in ZERO_SNR_SAMPLING.items()),
            )
            s.add_argument(
                "--noise-on-device",
                action="store_true",
                help="draw each batch's noise and timesteps on the training device (faster on a "
                "GPU for large batches; the draws then differ from a CPU run's)",
            )
            s.add_argument(
                "--max-t",
                type=int,
                default=None,
                help="train only on timesteps below this (of 1000): a fine-tuning of the "
                "low-noise steps, where an object's outline is drawn",
            )
            s.add_argument(
                "--name-small",
                action="store_true",
                help="always call a small object small in the captions (otherwise half the "
                "time, as every size word): a prompt without a size word then asks for a medium "
                "or big object, which the VAE keeps and the judge reads",
            )
            s.add_argument(
                "--pooled-text",
                action="store_true",
                help="also add the attention-pooled text to the time embedding (diffusers' "
                "addition_embed_type='text'); a UNet without it can be continued with it",
            )
            s.add_argument(
                "--train-text-encoder",
                action="store_true",
                help="train --clip's text encoder with the UNet (saved in model/text_encoder/, "
                "which the pipeline then ships); without it the text encoder stays frozen",
            )
    a = sub.add_parser("assemble", help="build the shipped folder from finished runs")
    a.add_argument("--work", default="runs/toy")
    a.add_argument("--vae", default="vae", help="run folder (under --work) of the VAE to ship")
    a.add_argument("--clip", default="clip", help="run folder (under --work) of the CLIP to ship")
    a.add_argument(
        "--vision",
        default="vision",
        help="run folder of the CLIP's first (vision) stage, for its model card ('' for none)",
    )
    a.add_argument(
        "--text-encoder",
        default=None,
        help="run folder of the CLIP whose text encoder the UNet was trained with (the "
        "pipeline's text encoder; the shipped CLIP may be a later one). Default: `clip`, or for "
        "a UNet trained with its text encoder (`unet --train-text-encoder`) that one",
    )
    a.add_argument("--unet", default="unet", help="run folder of the text-to-image UNet")
    a.add_argument("--pixel", default="pixel", help="run folder of the pixel model ('' for none)")
    a.add_argument(
        "--guide-clip",
        default="",
        help="run folder of the pixel model's guidance CLIP (`guide-clip`; '' for none: the "
        "shipped CLIP then guides too)",
    )
    a.add_argument(
        "--unfinished",
        action="store_true",
        help="use the latest checkpoint (EMA) of runs that have not finished, for previews",
    )
    a.add_argument("--dest", default=str(Path(__file__).parents[2] / "assets" / "toy"))
    a.add_argument(
        "--only",
        nargs="+",
        choices=SHIPPED_PARTS,
        default=None,
        help="replace only these parts of the existing --dest folder (e.g. `--only unet --unet "
        "unet8`), keeping the others as they are; their runs' cards are added to its card",
    )
    a.add_argument(
        "--guidance-scale",
        type=float,
        default=5.0,
        help="classifier-free guidance an edit with the pipeline takes when it names none, "
        "written to pipeline/blendedit.json (default: 5, measured best on the shipped models)",
    )
    a.add_argument(
        "--clip-guidance-scale",
        type=float,
        default=500.0,
        help="Blended Diffusion's CLIP guidance an edit with the pixel model takes when it names "
        "none, written to pixel/blendedit.json (default: 500, measured best on the shipped "
        "models)",
    )
    i = sub.add_parser(
        "ship-inpaint", help="write the shipped toy-inpaint model (assets/toy/inpaint) from a run"
    )
    i.add_argument("--run", default="runs/toy/inpaint", help="the `inpaint` run")
    i.add_argument("--dest", default=str(TOY_DIR / "inpaint"))
    i.add_argument(
        "--base",
        default=str(TOY_DIR / "pipeline" / "unet"),
        help="the text-to-image UNet the run started from (its untuned tensors are read there)",
    )
    i.add_argument("--unfinished", action="store_true", help="from the run's latest checkpoint")
    n = sub.add_parser("snapshot", help="write an unfinished run's current weights to RUN/snapshot")
    n.add_argument("run", nargs="+", help="run folders, e.g. runs/toy/unet")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if args.what == "data":
        build_dataset(args.out, args.n, args.size, args.seed, args.workers, args.objects)
        return 0
    if args.what == "assemble":
        with quiet_transformers():
            assemble(args)
        return 0
    if args.what == "ship-inpaint":
        with quiet_transformers():
            ship_inpaint(Path(args.run), Path(args.dest), Path(args.base), args.unfinished)
        return 0
    if args.what == "snapshot":
        with quiet_transformers():
            for run in args.run:
                snapshot(Path(run))
        return 0
    with quiet_transformers():
        trainers = {
            "vision": train_vision,
            "clip": train_clip,
            "vae": train_vae,
            "unet": train_unet,
            "pixel": train_pixel,
            "guide-clip": train_guide_clip,
            "inpaint": train_inpaint,
        }
        trainers[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
