"""The toy CLIP: its vision tower as a classifier, then contrastive (locked-image) tuning."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ..common import CLASS_PROMPTS, TEXT_MAX_LENGTH, clip_pixels, image_batch, tokenize
from ..data import SceneData, train_caption
from ..world import SHAPES, describe
from .arch import VisionClassifier, clip_config, world_words, write_preprocessor
from .loop import Run, _rng, write_card


def _object_crop(scene, rng, size: int):
    """A square crop (x0, y0, side) in pixels around one object, its caption and the object."""
    o = scene.objects[rng.randint(len(scene.objects))]
    side = rng.uniform(min(1.0, max(2.4 * o.r, 0.3)), 1.0)
    lo_x, hi_x = max(0.0, o.cx + o.r - side), min(o.cx - o.r, 1 - side)
    lo_y, hi_y = max(0.0, o.cy + o.r - side), min(o.cy - o.r, 1 - side)
    x0 = rng.uniform(lo_x, max(lo_x, hi_x))
    y0 = rng.uniform(lo_y, max(lo_y, hi_y))
    px = max(8, round(side * size))
    box = (min(size - px, round(x0 * size)), min(size - px, round(y0 * size)), px)
    return box, describe(o, with_size=False), o


def _fitting_weights(model: torch.nn.Module, folder: Path) -> dict:
    """The weights in ``folder`` (a CLIPModel's or a CLIPVisionModel's model.safetensors; the
    latter names its tensors without CLIPModel's ``vision_model.``) whose names and shapes
    ``model`` shares."""
    from safetensors.torch import load_file

    path = folder / "model.safetensors"
    if not path.exists():
        raise SystemExit(f"--init-from: {path} is missing (expected a finished run's model/)")
    mine = model.state_dict()
    fits = {}
    for k, v in load_file(path).items():
        for name in (k, f"vision_model.{k}"):
            if name in mine and mine[name].shape == v.shape:
                fits[name] = v.to(mine[name].dtype)
                break
    if not fits:
        raise SystemExit(f"--init-from: no weight in {path} fits this CLIP")
    print(f"--init-from: {len(fits)} of {len(mine)} tensors from {folder}", file=sys.stderr)
    return fits


def train_clip(args) -> None:
    from transformers import CLIPModel

    from ...tokenizer import build_clip_tokenizer

    if args.freeze_vision and not args.init_from:
        raise SystemExit("--freeze-vision keeps a trained vision tower: give it with --init-from")
    out = Path(args.out)
    data = SceneData(args.data)
    tok = build_clip_tokenizer(world_words(), out / "tokenizer", max_length=TEXT_MAX_LENGTH)
    torch.manual_seed(args.seed)
    model = CLIPModel(clip_config(tok, args.patch))
    if args.init_from:  # a trained CLIP or vision tower: every weight whose shape still fits
        model.load_state_dict(_fitting_weights(model, Path(args.init_from)), strict=False)
    if args.freeze_text:
        model.text_model.requires_grad_(False)
    if args.freeze_vision:
        model.vision_model.requires_grad_(False)
    run = Run(out, model, args, ema=False)

    def loss_fn(step):
        rng = _rng(args, step)
        idx = rng.randint(len(data), size=args.batch_size)
        x = image_batch(data, idx)
        pix, texts = [], []
        labels = []  # index into CLASS_PROMPTS where the image shows one object, else -100
        for k, i in enumerate(idx):
            scene = data.scenes[i]
            img = x[k : k + 1]
            label = -100
            if scene.objects and rng.rand() < args.crop_prob:
                (x0, y0, px), text, obj = _object_crop(scene, rng, img.shape[-1])
                img = img[..., y0 : y0 + px, x0 : x0 + px]
                label = CLASS_PROMPTS.index(describe(obj, with_size=False))
            else:
                text = train_caption(scene, rng, drop=0.0)
                if len(scene.objects) == 1:
                    label = CLASS_PROMPTS.index(describe(scene.objects[0], with_size=False))
            pix.append(clip_pixels(img))
            texts.append(text)
            labels.append(label)
        n = len(texts)
        ids = tokenize(tok, texts + (CLASS_PROMPTS if args.class_loss else []))
        o = model(input_ids=ids, pixel_values=torch.cat(pix))
        logits = o.logits_per_image[:, :n]  # (B, B), scaled
        same = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)  # identical captions are all positives
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
        if args.class_loss:  # zero-shot classification against every "a {colour} {shape}"
            cls = o.logits_per_image[:, n:]
            loss = loss + args.class_loss * F.cross_entropy(cls, torch.tensor(labels))
        return loss

    if not run.train(loss_fn):
        return
    folder = save_clip_run(run, model, tok)
    from ..evaluate import clip_zero_shot

    acc = clip_zero_shot(folder, n=300)
    params = sum(p.numel() for p in model.parameters())
    write_card(
        out,
        "Shapes World CLIP",
        args,
        run,
        params,
        {"zero-shot top-1 (300 renders)": acc},
        f"Contrastive image-text model (`transformers.CLIPModel`, ViT 64 px / patch {args.patch}"
        ", 4 layers of 128 wide in each tower) with a CLIP BPE tokenizer learned offline on the "
        "world's words. Captions are drawn afresh every step; with probability "
        f"{args.crop_prob} the image is a square crop around one object captioned with that "
        "object (what ranking sees). Identical captions in a batch count as positives."
        + (
            f" Plus {args.class_loss} x cross-entropy of one-object images against all 30 "
            "'a {colour} {shape}' prompts."
            if args.class_loss
            else ""
        )
        + (
            f" Started from {args.init_from}"
            + ("; the text encoder stays frozen (locked-text tuning)" if args.freeze_text else "")
            + (
                "; the vision tower stays frozen (locked-image tuning, LiT: the text side and "
                "both projections learn to read it)"
                if args.freeze_vision
                else ""
            )
            + "."
            if args.init_from
            else ""
        ),
    )


def save_clip_run(run: Run, model, tok) -> Path:
    """A finished CLIP run's weights (the final state) and tokenizer, as a CLIP folder in the
    run's ``model/``, with the image preprocessor the shipped CLIP has."""
    model.load_state_dict(run.final_state())
    folder = run.out / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    write_preprocessor(folder)
    return folder


def _dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """One of the 8 rotations / reflections of a batch of images (k in 0..7)."""
    x = torch.rot90(x, k % 4, (-2, -1))
    return x.flip(-1) if k >= 4 else x


def _vision_labels(data: SceneData, idx) -> torch.Tensor:
    """CLASS_PROMPTS index of the one object of each scene."""
    labels = []
    for i in idx:
        objects = data.scenes[i].objects
        if len(objects) != 1:
            raise SystemExit(
                f"vision: scene {i} of the data set has {len(objects)} objects; build "
                "a one-object data set with `python -m blendedit.toy.train data --objects 1 "
                "--out runs/toy/data-single`"
            )
        labels.append(CLASS_PROMPTS.index(describe(objects[0], with_size=False)))
    return torch.tensor(labels)


@torch.no_grad()
def vision_accuracy(model: VisionClassifier, n: int = 300, seed: int = 2) -> dict:
    """Colour, shape and joint top-1 accuracy on the renders the CLIP's zero-shot figure uses."""
    from ...io import pil_to_tensor
    from ..evaluate import single_object_scene
    from ..world import render

    was = model.training
    model.eval()
    right = {"colour": 0, "shape": 0, "both": 0}
    for a in range(0, n, 50):
        imgs, labels = [], []
        for i in range(a, min(n, a + 50)):
            colour, shape = CLASS_PROMPTS[i % len(CLASS_PROMPTS)].split()[1:]
            img = render(single_object_scene(seed, i, colour, shape), 128)
            imgs.append(pil_to_tensor(img)[0] * 2 - 1)
            labels.append(i % len(CLASS_PROMPTS))
        pred = model(clip_pixels(torch.stack(imgs))).argmax(1)
        y = torch.tensor(labels)
        n_shapes = len(SHAPES)
        right["colour"] += int((pred // n_shapes == y // n_shapes).sum())
        right["shape"] += int((pred % n_shapes == y % n_shapes).sum())
        right["both"] += int((pred == y).sum())
    model.train(was)
    return {k: round(v / n, 4) for k, v in right.items()}


def train_vision(args) -> None:
    """Stage 1 of the CLIP: the vision tower as a 30-way classifier of one-object scenes, each
    batch turned by a random rotation / reflection (the labels do not change)."""
    out = Path(args.out)
    data = SceneData(args.data)
    torch.manual_seed(args.seed)
    model = VisionClassifier(args.patch)
    run = Run(out, model, args, ema=False)

    def loss_fn(step):
        rng = _rng(args, step)
        idx = rng.randint(len(data), size=args.batch_size)
        x = _dihedral(clip_pixels(image_batch(data, idx)), int(rng.randint(8)))
        return F.cross_entropy(model(x), _vision_labels(data, idx))

    if not run.train(loss_fn):
        return
    model.load_state_dict(run.final_state())
    model.save(out / "model")
    metrics = {f"{k} top-1 (300 renders)": v for k, v in vision_accuracy(model).items()}
    write_card(
        out,
        "Shapes World CLIP, stage 1: vision tower",
        args,
        run,
        sum(p.numel() for p in model.parameters()),
        metrics,
        f"The CLIP's vision tower (`transformers.CLIPVisionModel`, ViT 64 px / patch {args.patch}"
        ", 4 layers of 128 wide) with a linear head, trained as a 30-way 'a {colour} {shape}' "
        "classifier on one-object scenes (each batch under a random one of the 8 rotations / "
        "reflections). `train clip --init-from` this run's model/ starts the contrastive stage "
        "from it.",
    )
