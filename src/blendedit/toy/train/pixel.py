"""The unconditional pixel-space model, for Blended Diffusion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..common import image_batch
from ..data import SceneData
from . import arch
from .arch import PIXEL_SCHEDULER
from .loop import Run, _rng, write_card
from .unet import _min_snr_weight, _noise_and_steps


def train_pixel(args) -> None:
    from diffusers import DDPMScheduler, UNet2DModel

    out = Path(args.out)
    data = SceneData(args.data)
    sched = DDPMScheduler(**PIXEL_SCHEDULER)
    torch.manual_seed(args.seed)
    # an unconditional model draws empty scenes as often as its data holds them
    pool = np.flatnonzero([len(sc.objects) >= args.min_objects for sc in data.scenes])
    if len(pool) == 0:
        raise SystemExit(f"--min-objects {args.min_objects}: no scene in {args.data} has as many")
    model = UNet2DModel(**arch.PIXEL_CONFIG)
    if args.init_from:
        start = Path(args.init_from)
        start = start / "unet" if (start / "unet").is_dir() else start
        model.load_state_dict(UNet2DModel.from_pretrained(start).state_dict())
    run = Run(out, model, args, ema=True)
    factor = data.images.shape[1] // arch.PIXEL_CONFIG["sample_size"]
    device = run.device

    def loss_fn(step):
        rng = _rng(args, step)
        idx = pool[rng.randint(len(pool), size=args.batch_size)]
        x0 = F.avg_pool2d(image_batch(data, idx), factor).to(device)  # box-filtered 128 px
        noise, t = _noise_and_steps(rng, x0.shape, sched, device)
        pred = model(sched.add_noise(x0, noise, t), t).sample
        w = _min_snr_weight(sched, t, args.min_snr)
        return (w * (pred.float() - noise).pow(2).mean((1, 2, 3))).mean()

    if not run.train(loss_fn):
        return
    model.load_state_dict(run.final_state())
    folder = out / "model"
    model.save_pretrained(folder / "unet")
    sched.save_pretrained(folder / "scheduler")
    params = sum(p.numel() for p in model.parameters())
    write_card(
        out,
        "Shapes World pixel model",
        args,
        run,
        params,
        {},
        "Unconditional `diffusers.UNet2DModel` at 64 px (the 128 px renders box-filtered by 2), "
        "epsilon prediction, DDPM's linear schedule (1e-4 to 0.02, 1000 steps), min-SNR "
        f"weighting (gamma {args.min_snr}). For Blended Diffusion. Weights are the EMA."
        + (
            f" Scenes with at least {args.min_objects} object(s) only ({len(pool)} of {len(data)})."
            if args.min_objects
            else ""
        ),
        started_from=args.init_from,
    )
