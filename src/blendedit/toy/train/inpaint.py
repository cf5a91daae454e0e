"""The inpainting UNet: the text-to-image UNet fine-tuned with the mask and the masked image.

As Stable Diffusion's inpainting model was made from its text-to-image model: the UNet's first
convolution is widened from 4 to 9 input channels, the five new ones zero-initialised (so step 0
predicts exactly what the text-to-image UNet does), and the UNet is fine-tuned on synthetic masks,
a quarter of them covering the whole image so it still draws from nothing. The input layout is
diffusers' (``StableDiffusionInpaintPipeline``): ``cat([z_t, mask, masked_image_latents])``, the
mask downsampled to the latent grid by nearest neighbour and the masked image ``x * (mask < 0.5)``
in [-1, 1], encoded by the VAE and scaled by its scaling factor.

Only the parameters under ``--train-only`` are tuned (by default the first convolution, the time
embedding, the down blocks and the last up block: the path that reads the context, and the one
that draws at full resolution); the others stay the text-to-image UNet's, so the shipped model
stores only the tuned tensors beside the plain UNet's (see ``assemble``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from ...models import DELTA_FILE
from ..common import image_batch
from ..data import CAPTION_DROP, SceneData, train_caption
from ..world import SHADOW_OFFSET, Scene, describe
from .arch import UNET_RUN_CONFIG, _latent_ddpm
from .loop import Run, _model_dir, _rng, train_device, write_card
from .unet import CaptionIds, _encode_latents, _min_snr_weight, _noise_and_steps

INPAINT_CHANNELS = 9  # latents 4 + mask 1 + masked-image latents 4 (diffusers' layout)
TRAIN_ONLY = (
    "conv_in",
    "time_embedding",
    "down_blocks",
    "up_blocks.2",
    "conv_norm_out",
    "conv_out",
)
# shares of the mask kinds (SHAPES_WORLD.md's edits; Stable Diffusion's recipe for the rest)
MASK_KINDS = {"object": 0.4, "empty": 0.15, "free": 0.2, "full": 0.25}


def widen_conv_in(unet, channels: int = INPAINT_CHANNELS):
    """A copy of the text-to-image ``unet`` with ``channels`` input channels; the new input
    weights are zero, so its output equals ``unet``'s whatever the extra channels hold."""
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    config["in_channels"] = channels
    wide = UNet2DConditionModel.from_config(config)
    state = unet.state_dict()
    w = state["conv_in.weight"]  # (C, 4, k, k)
    state["conv_in.weight"] = torch.cat(
        [w, w.new_zeros(w.shape[0], channels - w.shape[1], *w.shape[2:])], 1
    )
    wide.load_state_dict(state)
    return wide


def _box(cx: float, cy: float, side: float) -> tuple[float, float, float, float]:
    return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)


def _clear_of(box, objects) -> bool:
    x0, y0, x1, y1 = box
    for o in objects:
        nx, ny = min(max(o.cx, x0), x1), min(max(o.cy, y0), y1)
        if math.hypot(o.cx - nx, o.cy - ny) < o.r + 2 * SHADOW_OFFSET:
            return False
    return True


def _draw(size: int, shapes) -> np.ndarray:
    """A 0/1 mask of boxes and ellipses given as (box in units of S, ellipse?)."""
    m = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(m)
    for box, ellipse in shapes:
        x0, y0, x1, y1 = (v * size for v in box)
        (draw.ellipse if ellipse else draw.rectangle)([x0, y0, x1 - 1, y1 - 1], fill=255)
    return (np.asarray(m) > 127).astype(np.float32)


def training_mask(scene: Scene, rng: np.random.RandomState, size: int) -> tuple[np.ndarray, str]:
    """One training pair's mask (``size`` x ``size``, 1 = inpaint) and caption:

    - ``object``: a box or ellipse of side 0.3 S to 0.5 S (or, for a small object, sometimes a
      box of 0.18 S to 0.24 S) around one object, the caption naming that object alone (as an
      edit's prompt names what it asks for);
    - ``empty``: a box over background clear of every object, the scene's caption (names only
      what is outside: the model learns to continue the background there);
    - ``free``: one to three random boxes and ellipses, the scene's caption;
    - ``full``: the whole image, the scene's caption (so it still draws from nothing).
    Captions are dropped (empty) with the training data's share, for classifier-free guidance."""
    kinds, shares = zip(*MASK_KINDS.items())
    kind = kinds[int(rng.choice(len(kinds), p=np.array(shares) / sum(shares)))]
    if kind == "object" and not scene.objects:
        kind = "empty"
    if kind == "object":
        o = scene.objects[rng.randint(len(scene.objects))]
        small = o.size_word == "small" and rng.rand() < 0.3
        side = max(rng.uniform(0.18, 0.24) if small else rng.uniform(0.3, 0.5), 2.3 * o.r)
        jitter = rng.uniform(-1, 1, size=2) * max(0.0, side / 2 - 1.15 * o.r)
        ellipse = not small and rng.rand() < 0.5
        mask = _draw(size, [(_box(o.cx + jitter[0], o.cy + jitter[1], side), ellipse)])
        text = describe(o, with_size=small or rng.rand() < 0.3)
        return mask, "" if rng.rand() < CAPTION_DROP else text
    if kind == "empty":
        for _ in range(20):
            side = rng.uniform(0.18, 0.5)
            box = _box(*rng.uniform(side / 2, 1 - side / 2, size=2), side)
            if _clear_of(box, scene.objects):
                return _draw(size, [(box, rng.rand() < 0.5)]), train_caption(scene, rng)
        kind = "free"
    if kind == "free":
        shapes = []
        for _ in range(rng.randint(1, 4)):
            w, h = rng.uniform(0.1, 0.6, size=2)
            x0, y0 = rng.uniform(-0.1, 1.0 - w + 0.1), rng.uniform(-0.1, 1.0 - h + 0.1)
            shapes.append(((x0, y0, x0 + w, y0 + h), rng.rand() < 0.5))
        return _draw(size, shapes), train_caption(scene, rng)
    return np.ones((size, size), np.float32), train_caption(scene, rng)


def inpaint_inputs(vae, x: torch.Tensor, mask: torch.Tensor, grid) -> tuple:
    """diffusers' inpainting conditioning of images ``x`` (B, 3, H, W) in [-1, 1] and pixel masks
    (B, 1, H, W), 1 = inpaint: the mask on the latent ``grid`` (nearest neighbour) and the masked
    image's latents (the posterior mean, scaled)."""
    keep = (mask < 0.5).to(x.dtype)
    rows = keep.flatten(1).amax(1) > 0  # images with something kept; the rest encode zeros
    first = int(rows.float().argmin()) if not rows.all() else None  # one all-masked image
    pick = rows.clone()
    if first is not None:
        pick[first] = True
    enc = vae.encode((x * keep)[pick]).latent_dist.mode() * vae.config.scaling_factor
    masked = enc.new_empty(x.shape[0], *enc.shape[1:])
    masked[pick] = enc
    if first is not None:
        masked[~rows] = masked[first].clone()
    small = F.interpolate((1 - keep), size=tuple(grid))  # nearest, as diffusers
    return small, masked


def _trainable(model, prefixes) -> int:
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(any(name == q or name.startswith(q + ".") for q in prefixes))
        n += p.numel() if p.requires_grad else 0
    return n


def train_inpaint(args) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = Path(args.pipeline)
    for part in ("unet", "vae", "text_encoder", "tokenizer"):
        if not (pipe / part).is_dir():
            raise SystemExit(f"--pipeline: {pipe} has no {part}/ (a toy pipeline folder)")
    device = train_device(args)
    data = SceneData(args.data)
    z_all = _encode_latents(pipe / "vae", data, out / "latents.pt", device=device).to(device)
    vae = AutoencoderKL.from_pretrained(pipe / "vae").float().eval().requires_grad_(False)
    vae.to(device)
    tok = AutoTokenizer.from_pretrained(pipe / "tokenizer")
    text = CLIPTextModel.from_pretrained(pipe / "text_encoder").float().eval().to(device)
    text.requires_grad_(False)
    base = UNet2DConditionModel.from_pretrained(
        _model_dir(args.init_from, "--init-from") if args.init_from else pipe / "unet"
    ).float()
    model = base if base.config.in_channels == INPAINT_CHANNELS else widen_conv_in(base)
    tuned = _trainable(model, args.train_only)
    if not tuned:
        raise SystemExit(f"--train-only {args.train_only}: names none of the UNet's parameters")
    out.joinpath(UNET_RUN_CONFIG).write_text(json.dumps(dict(model.config), indent=2, default=str))
    out.joinpath("train_only.json").write_text(json.dumps(list(args.train_only)))
    sched = _latent_ddpm(False)
    torch.manual_seed(args.seed)
    run = Run(out, model, args, ema=True)
    caption_ids = CaptionIds(tok, device)
    size, grid = data.images.shape[1], z_all.shape[-2:]

    def loss_fn(step):
        rng = _rng(args, step)
        idx = rng.randint(len(data), size=args.batch_size)
        pairs = [training_mask(data.scenes[i], rng, size) for i in idx]
        mask = torch.from_numpy(np.stack([m for m, _ in pairs]))[:, None].to(device)
        x = image_batch(data, idx).to(device)
        z0 = z_all[torch.from_numpy(idx).to(device)]
        with torch.no_grad():
            cond = text(caption_ids([c for _, c in pairs]))[0]
            small, masked = inpaint_inputs(vae, x, mask, grid)
        noise, t = _noise_and_steps(rng, z0.shape, sched, device)
        zt = sched.add_noise(z0, noise, t)
        pred = model(torch.cat([zt, small, masked], 1), t, cond).sample
        per_image = (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))
        return (_min_snr_weight(sched, t, args.min_snr) * per_image).mean()

    if not run.train(loss_fn):
        return
    pipe = Path(os.path.relpath(pipe)) if pipe.resolve().is_relative_to(Path.cwd()) else pipe
    model.load_state_dict(run.final_state())
    model.save_pretrained(out / "model")
    write_card(
        out,
        "Shapes World inpainting UNet",
        args,
        run,
        tuned,
        {},
        "The text-to-image UNet of "
        f"{args.init_from or pipe / 'unet'} with 9 input channels (diffusers' inpainting layout: "
        "latents, mask, masked-image latents; the 5 new input channels zero-initialised), "
        f"fine-tuned with only {', '.join(args.train_only)} trained ({tuned / 1e6:.2f} M of "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; the rest are the "
        "text-to-image UNet's). Masks per sample: "
        + ", ".join(f"{k} {v:.0%}" for k, v in MASK_KINDS.items())
        + " (blendedit.toy.train.inpaint.training_mask); epsilon prediction, Stable Diffusion "
        f"1.x's noise schedule, min-SNR weighting (gamma {args.min_snr}); captions "
        f"{CAPTION_DROP:.0%} empty. VAE and text encoder of {pipe} (frozen). Weights are the EMA.",
        started_from=args.init_from,
    )


def ship_inpaint(run: Path, dest: Path, base_unet: Path, unfinished: bool = False) -> Path:
    """Write the shipped inpainting model ``dest`` (``assets/toy/inpaint``) from an ``inpaint``
    run: ``unet/config.json`` and ``unet/{DELTA_FILE}``, the run's tuned tensors in float16 (the
    others are the text-to-image UNet's, ``base_unet``, which the loader reads them from), and
    its card. With ``unfinished`` the run's latest checkpoint (EMA) stands in for its model."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from .assemble import _card_chain, _model_folder

    run, dest = Path(run), Path(dest)
    model = _model_folder(run, unfinished)
    prefixes = json.loads((run / "train_only.json").read_text())
    unet = UNet2DConditionModel.from_pretrained(model)
    base = UNet2DConditionModel.from_pretrained(base_unet).state_dict()
    state = unet.state_dict()
    tuned = {k for k in state if any(k == q or k.startswith(q + ".") for q in prefixes)}
    frozen = [k for k in state if k not in tuned and not torch.equal(state[k].half(), base[k])]
    if frozen:
        raise SystemExit(f"{run}: tensors outside --train-only changed: {frozen[:3]}")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "unet").mkdir(parents=True)
    cfg = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    cfg = {"_class_name": "UNet2DConditionModel", **cfg, "_base": "pipeline/unet"}
    (tmp / "unet" / "config.json").write_text(json.dumps(cfg, indent=2, default=str) + "\n")
    delta = {k: state[k].half().contiguous() for k in sorted(tuned)}
    save_file(delta, str(tmp / "unet" / DELTA_FILE), metadata={"base": "pipeline/unet"})
    cards = [c.read_text() for c in _card_chain(run) if c.exists()]
    head = (
        "# Shapes World inpainting UNet (`toy-inpaint`)\n\nThe shipped text-to-image UNet "
        "(`pipeline/unet`) widened to 9 input channels and fine-tuned to inpaint; "
        f"`unet/{DELTA_FILE}` holds the tuned tensors (float16), the others are "
        "`pipeline/unet`'s. Loaded by `blendedit.models.load_toy_inpaint_unet`.\n"
    )
    (tmp / "MODEL_CARD.md").write_text("\n".join([head, *cards]))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    size = (dest / "unet" / DELTA_FILE).stat().st_size
    print(f"shipped {dest}: {len(delta)} tensors, {size / 1e6:.1f} MB", file=sys.stderr)
    return dest
