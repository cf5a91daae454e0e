"""Diagnostic for the Shapes World CLIP: can its vision tower (ViT 64 px, patch P) learn SHAPE
as a plain 5-way classifier on clean single-object renders? Prints held-out accuracy (200
renders of another seed) every 100 steps. Measured (patch 8, bs 64, lr 1e-3, 2-core CPU): 22 %,
31 %, 33 %, 37 %, 36 %, 34 %, 40 % at steps 100-700 (chance 20 %): it learns, slowly.

    python benchmarks/clip_shape_probe.py [PATCH] [STEPS]
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
from transformers import CLIPVisionModel

from blendedit.io import pil_to_tensor
from blendedit.tokenizer import build_clip_tokenizer
from blendedit.toy import train as T
from blendedit.toy.evaluate import single_object_scene
from blendedit.toy.train import clip_pixels
from blendedit.toy.world import COLOURS, SHAPES, render


def batch(seed: int, start: int, n: int):
    """Renders start..start+n: shapes cycled, colours cycled every 5, the rest random."""
    shapes, colours = list(SHAPES), list(COLOURS)
    xs, ys = [], []
    for i in range(start, start + n):
        scene = single_object_scene(seed, i, colours[(i // 5) % len(colours)], shapes[i % 5])
        xs.append(pil_to_tensor(render(scene, 128))[0] * 2 - 1)
        ys.append(i % 5)
    return clip_pixels(torch.stack(xs)), torch.tensor(ys)


def main() -> None:
    patch = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 800
    torch.manual_seed(0)
    tok = build_clip_tokenizer(T.world_words(), None, max_length=T.TEXT_MAX_LENGTH)
    cfg = T.clip_config(tok, patch).vision_config  # exactly the shipped CLIP's vision tower
    model, head = CLIPVisionModel(cfg), torch.nn.Linear(cfg.hidden_size, 5)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    xv, yv = batch(99, 0, 200)
    t0 = time.time()
    for step in range(1, steps + 1):
        for g in opt.param_groups:
            g["lr"] = 1e-3 * min(1.0, step / 100)
        x, y = batch(1, step * 64, 64)
        loss = F.cross_entropy(head(model(pixel_values=x).pooler_output), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            with torch.no_grad():
                acc = (head(model(pixel_values=xv).pooler_output).argmax(1) == yv).float().mean()
            print(
                f"patch {patch} step {step}: loss {loss.item():.3f}, held-out shape accuracy "
                f"{acc.item():.2f} ({time.time() - t0:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
