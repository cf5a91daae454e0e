"""Probe (issue 42): the generator as the judge, with contrasts instead of the empty prompt.

For each saved sample (benchmarks/ranking.py --save-samples), at a few noise levels with noise
shared by the samples of a task and by the texts, the denoiser's error in the mask's latent
cells under the prompt and under each contrast (the prompt's shape word swapped for the other
shapes; optionally its colour word for the other hues). Scores (higher = better fit):
- gain: mean over contrasts of err(contrast) - err(prompt), over err(contrast)'s mean;
- logp: log-softmax of -err / temperature over [prompt, contrasts], the prompt's entry.
Reports best of 4 and of 8 for each score and level subset against CLIP's pick (the default),
paired at n = 4, and the cost per task.

    python benchmarks/rank_dc_probe.py runs/rank/bench/samples.npz [--tasks 40] [--hues]
        [--out benchmarks/results/ranking/study/contrast_dc.md]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from blendedit import BlendedLatentDiffusionPipeline
from blendedit.io import mask_to_tensor
from blendedit.options import LatentEditOptions
from blendedit.text_mask import HUES, _at_level, _predict
from blendedit.toy.tasks import task_suite
from blendedit.toy.world import SHAPES

sys.path.insert(0, str(Path(__file__).parent))
from rank_study import evaluate  # noqa: E402


def contrasts(prompt: str, hues: bool) -> list[str]:
    words = prompt.split()
    out = [" ".join(w if w != words[-1] else s for w in words) for s in SHAPES if s != words[-1]]
    if hues:
        hue = next(w for w in words if w in HUES)
        out += [" ".join(h if w == hue else w for w in words) for h in HUES if h != hue]
    return out


@torch.no_grad()
def errors(pipe, x, mask, texts, levels, draws, seed):
    """(levels, draws, texts, N) mean squared error in the mask's latent cells of the samples
    ``x`` (N, 3, H, W)."""
    fam = pipe.adapter
    n = len(x)
    z, cond = pipe._encode_region(x, torch.ones_like(x[:, :1]))
    hw = tuple(z.shape[-2:])
    m = F.adaptive_max_pool2d(mask, hw)[0, 0]
    wh = x.shape[-2:]
    geometry = (LatentEditOptions.micro_conditioning, wh, (0, 0, wh[1], wh[0]), wh)
    rows = []
    for t in texts:
        e, pooled, _ = pipe.encode_prompt(t, "", n * draws, False)
        rows.append((e, fam.added(pooled, geometry)))
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(len(levels), draws, len(texts), n)
    zz = z.repeat(draws, 1, 1, 1)
    for li, level in enumerate(levels):
        ts = _at_level(pipe, 50, level, hw)
        noise = torch.randn((draws, 1, *z.shape[1:]), generator=g).expand(-1, n, -1, -1, -1)
        noise = noise.reshape(draws * n, *z.shape[1:])
        z_t = pipe.noised(zz, noise, ts, 0)
        z_in = fam.model_input(pipe.scheduler, z_t, ts[0])
        target = fam.target(pipe.scheduler, zz, noise, ts[0]).float()
        preds = _predict(fam, pipe.unet, z_in, ts[0], rows, cond, 1.0)
        for ti, p in enumerate(preds):
            e = (((p - target) ** 2).mean(1) * m).sum((1, 2)) / m.sum()
            out[li, :, ti] = e.view(draws, n)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("samples")
    p.add_argument("--levels", default="0.1,0.2,0.3,0.4,0.5")
    p.add_argument("--draws", type=int, default=2)
    p.add_argument("--hues", action="store_true")
    p.add_argument("--tasks", type=int, default=0)
    p.add_argument("--save", default=None, help="also keep the raw errors (torch.save)")
    p.add_argument("--out", default=None, help="write the printed table to this file")
    a = p.parse_args(argv)
    d = np.load(a.samples)
    suite = json.loads(str(d["suite"]))
    tasks = task_suite(suite["n"], size=suite["size"], seed=suite["seed"])
    pipe = BlendedLatentDiffusionPipeline.from_pretrained("toy", torch_dtype=torch.float32)
    levels = [float(v) for v in a.levels.split(",")]
    ok = d["ok"]
    n_tasks = a.tasks or len(tasks)
    errs, clip, dc_s = [], [], 0.0
    for i, (task, imgs) in enumerate(zip(tasks[:n_tasks], d["images"])):
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
        m = mask_to_tensor(task.mask)
        clip.append(pipe.ranker.score(x, task.prompt, m, "crop", 0.25))
        texts = [task.prompt, *contrasts(task.prompt, a.hues)]
        t0 = time.perf_counter()
        errs.append(errors(pipe, x, m, texts, levels, a.draws, task.seed))
        dc_s += time.perf_counter() - t0
        if i % 20 == 0:
            print(i, f"{dc_s:.1f}s", flush=True)
    sec = dc_s / n_tasks
    E = torch.stack(errs)  # (T, L, D, texts, N)
    if a.save:
        torch.save(dict(E=E, levels=levels), a.save)
    ok = torch.from_numpy(ok[:n_tasks])
    clip_default = torch.stack(clip)
    lines = [
        f"{n_tasks} tasks x {E.shape[-1]} samples, {len(texts) - 1} contrasts, levels {levels}, "
        f"{a.draws} draws: {sec:.2f} s a task",
        "oracle "
        + " ".join(f"best{n} {float(ok[:, :n].any(1).float().mean()):.3f}" for n in (4, 8)),
    ]
    print("\n".join(lines))

    def show(name, s):  # rank_study's figures, paired at n = 4 against CLIP's pick
        r = evaluate(s, {"ok": ok}, clip_default)
        lines.append(
            f"{name:40s}  best4 {r['best_of_4']:.3f}  best8 {r['best_of_8']:.3f}  "
            f"pair {r['pair_accuracy'][0]:.3f}  {r['vs_default_4']}"
        )
        print(lines[-1], flush=True)

    show("CLIP (default)", clip_default)
    for sub in [list(range(len(levels)))] + [[i] for i in range(len(levels))]:
        e = E[:, sub].mean((1, 2))  # (T, texts, N)
        gain = (e[:, 1:].mean(1) - e[:, 0]) / e[:, 1:].mean(1)
        show(f"gain levels {[levels[i] for i in sub]}", gain)
        for temp in (0.01, 0.1):
            lp = torch.log_softmax(-e / (temp * e.mean(1, keepdim=True)), 1)[:, 0]
            show(f"logp T={temp} levels {[levels[i] for i in sub]}", lp)
    if a.out:
        with open(a.out, "w") as f:
            f.write("```text\n" + "\n".join(lines) + "\n```\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
