"""The guidance CLIP for Blended Diffusion (issue 31): a CLIP whose vision tower reads colour and
shape in the pixel model's x̂0, which is what the guidance loss looks at.

The shipped CLIP learned on clean renders; guidance shows it the model's one-step prediction of
the clean image from x_t, blurry at large t, with the background outside the mask zeroed and a
random homography applied (``guidance.clip_loss_grad``). GLIDE trained its guidance CLIP on noised
images for the same reason. Here the vision tower is tuned on exactly that view:

1. a bank of x̂0: one-object 64 px renders (colour and shape drawn at random), noised to a
   random step t of 1000 (one per batch of 32; t = 0, the clean render, for a share of the
   batches) and passed once through the pixel model (``x0_bank``, cached in the run folder);
2. every training step draws from the bank, zeroes outside a random box or ellipse around the
   object with the probability ``--mask-prob`` (as an edit's mask, 0.3 S to 0.5 S), warps each
   image by one of guidance's random homographies, and takes the cross-entropy of the image
   against the 30 "a {colour} {shape}" prompts. The text tower stays as it was, so the prompts
   embed as before and the clean CLIP can still rank.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..common import CLASS_PROMPTS, clip_pixels
from ..world import COLOURS, SHAPES, Scene, place, random_object, render, sample_background
from .loop import Run, _rng, write_card

BANK_FILE = "x0_bank.pt"


def _scene(rng: np.random.RandomState):
    """A one-object scene, its CLASS_PROMPTS label and its object."""
    label = rng.randint(len(CLASS_PROMPTS))  # CLASS_PROMPTS runs colour-major over SHAPES
    colour, shape = list(COLOURS)[label // len(SHAPES)], SHAPES[label % len(SHAPES)]
    obj = None
    while obj is None:
        obj = place(rng, random_object(rng, shape=shape, colour=colour), [])
    return Scene(sample_background(rng), (obj,)), label, obj


@torch.no_grad()
def x0_bank(pixel, n: int, t_max: int, clean_share: float, seed: int, path: Path) -> dict:
    """``n`` x̂0 of one-object renders by the pixel pipeline ``pixel`` (a
    ``BlendedDiffusionPipeline``), as uint8 images with their labels, steps and objects
    (cx, cy, r); read from ``path`` when a bank of the same recipe is there."""
    from tqdm.auto import tqdm

    from ...io import pil_to_tensor

    recipe = torch.tensor([n, t_max, round(clean_share * 1000), seed])
    if path.exists():
        bank = torch.load(path, map_location="cpu", weights_only=True)
        if torch.equal(bank["recipe"], recipe):
            return bank
    size = pixel.native_size
    rng = np.random.RandomState([seed, 31])
    gen = torch.Generator().manual_seed(seed)
    images, labels, steps, objects = [], [], [], []
    for a in tqdm(range(0, n, 32), desc="x0 bank", unit="batch"):
        k = min(32, n - a)
        xs = []
        for _ in range(k):
            scene, label, o = _scene(rng)
            xs.append(pil_to_tensor(render(scene, size))[0] * 2 - 1)
            labels.append(label)
            objects.append([o.cx, o.cy, o.r])
        x = torch.stack(xs)
        t = 0 if rng.rand() < clean_share else int(rng.randint(1, t_max + 1))  # one per batch
        steps += [t] * k
        if t:
            xt = pixel.q_sample(x, t, torch.randn(x.shape, generator=gen))
            x = pixel.model_step_terms(xt, t, t - 1)[1]
        images.append(((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
    bank = dict(
        recipe=recipe,
        images=torch.cat(images),
        labels=torch.tensor(labels),
        steps=torch.tensor(steps),
        objects=torch.tensor(objects, dtype=torch.float32),
    )
    tmp = path.with_suffix(".tmp")
    torch.save(bank, tmp)
    tmp.replace(path)
    return bank


def edit_like_masks(objects: torch.Tensor, size: int, rng: np.random.RandomState) -> torch.Tensor:
    """(B, 1, size, size) masks as an edit's: a box or an ellipse of side 0.3 S to 0.5 S (at
    least the object's diameter and a margin) holding each object (cx, cy, r in units of S)."""
    yy, xx = torch.meshgrid(
        (torch.arange(size) + 0.5) / size, (torch.arange(size) + 0.5) / size, indexing="ij"
    )
    out = torch.zeros(len(objects), 1, size, size)
    for i, (cx, cy, r) in enumerate(objects.tolist()):
        side = max(rng.uniform(0.3, 0.5), 2.3 * r)
        half = side / 2
        mx = cx + rng.uniform(-1, 1) * max(0.0, half - 1.15 * r)
        my = cy + rng.uniform(-1, 1) * max(0.0, half - 1.15 * r)
        if rng.rand() < 0.5:
            m = ((xx - mx).abs() <= half) & ((yy - my).abs() <= half)
        else:
            m = ((xx - mx) ** 2 + (yy - my) ** 2) <= half**2
        out[i, 0] = m.float()
    return out


def _shown(init: Path) -> str:
    """How the card names the CLIP it started from: the shipped one by its place in the
    package, any other by the path given."""
    from ...models import TOY_DIR

    shipped = init.resolve() == (TOY_DIR / "clip").resolve()
    return "The shipped CLIP (src/blendedit/assets/toy/clip)" if shipped else f"The CLIP of {init}"


def train_guide_clip(args) -> None:
    from transformers import CLIPModel, CLIPTokenizerFast

    from ... import BlendedDiffusionPipeline
    from ... import guidance as G
    from ..common import tokenize
    from .clip import save_clip_run
    from .loop import _model_dir

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    init = _model_dir(args.init_from, "--init-from")
    pixel = BlendedDiffusionPipeline.from_pretrained(args.pixel, clip=str(init))
    bank = x0_bank(pixel, args.bank, args.t_max, args.clean_share, args.seed, out / BANK_FILE)
    print(f"x0 bank: {len(bank['labels'])} images at {pixel.native_size} px", file=sys.stderr)
    tok = CLIPTokenizerFast.from_pretrained(init)
    model = CLIPModel.from_pretrained(init, dtype=torch.float32)  # shipped as float16
    model.text_model.requires_grad_(False)
    model.text_projection.requires_grad_(False)
    model.logit_scale.requires_grad_(False)
    with torch.no_grad():
        txt = model.get_text_features(input_ids=tokenize(tok, CLASS_PROMPTS))
        txt = F.normalize(getattr(txt, "pooler_output", txt), dim=-1)
    scale = float(model.logit_scale.exp())
    run = Run(out, model, args, ema=False)
    size = bank["images"].shape[-1]

    def loss_fn(step):
        rng = _rng(args, step)
        idx = torch.from_numpy(rng.randint(len(bank["labels"]), size=args.batch_size))
        x = bank["images"][idx].float() / 255  # [0, 1], as guidance feeds CLIP
        masks = edit_like_masks(bank["objects"][idx], size, rng)
        keep = torch.from_numpy(rng.rand(len(idx)) < args.mask_prob).float().view(-1, 1, 1, 1)
        x = x * (masks * keep + (1 - keep))
        gen = torch.Generator().manual_seed(int(rng.randint(2**31)))
        x = G.warp(x, G.random_homographies(len(idx) + 1, gen)[1:])  # no identity copy
        feats = model.get_image_features(pixel_values=clip_pixels(x * 2 - 1).to(run.device))
        feats = F.normalize(getattr(feats, "pooler_output", feats), dim=-1)
        return F.cross_entropy(scale * feats @ txt.to(run.device).T, bank["labels"][idx])

    if not run.train(loss_fn):
        return
    save_clip_run(run, model, tok)
    write_card(
        out,
        "Shapes World guidance CLIP (x̂0)",
        args,
        run,
        sum(p.numel() for p in model.parameters()),
        {},
        f"{_shown(init)} with its vision tower tuned to read colour and shape in the pixel "
        f"model's ({args.pixel}) x̂0: {args.bank} one-object 64 px renders noised to a random "
        f"step up to {args.t_max} of 1000 ({args.clean_share:.0%} clean) and predicted back in one "
        f"step; each draw masked as an edit with probability {args.mask_prob} (the background "
        "zeroed) and warped by one of guidance's random homographies; cross-entropy against the "
        "30 'a {colour} {shape}' prompts. Text tower, projection and logit scale frozen. "
        "`python benchmarks/clip_on_x0.py --clip <this model/>` measures it.",
    )
