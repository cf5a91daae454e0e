"""Issue 42's study: which ranking picks the edit the judge accepts, on samples saved by
``benchmarks/ranking.py --save-samples``.

    python benchmarks/ranking.py --tasks 120 --samples 8 --save-samples runs/rank/bench/samples.npz
    python benchmarks/ranking.py --seed 7 --tasks 300 --samples 8 \\
        --save-samples runs/rank/train/samples.npz        # tasks kept apart from the bench's
    python benchmarks/rank_study.py --train runs/rank/train/samples.npz \\
        --bench runs/rank/bench/samples.npz --out benchmarks/results/ranking/study

Every candidate scores the same samples (:func:`blendedit.preference.region_features` for each,
computed once): CLIP at each crop and their mean, CLIP's directional score (the crop's change from
the source against the prompt), CLIP less a penalty for change at the mask's edge or for the
seam (the weight chosen on the training tasks), and preference heads trained on the training
tasks' samples labelled by the judge. On the bench's tasks: best of 4 and of 8 against the oracle
(any sample a success), pair accuracy, the paired sign test against today's pick (CLIP, crop
0.25) and the cost against the sampling time ``ranking.py`` measured.
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

sys.path.insert(0, str(Path(__file__).parent))
from ranking import best_of, pair_accuracy  # noqa: E402

from blendedit import BlendedLatentDiffusionPipeline  # noqa: E402
from blendedit import masks as M  # noqa: E402
from blendedit.bench_stats import paired, wilson  # noqa: E402
from blendedit.io import mask_to_tensor, pil_to_tensor  # noqa: E402
from blendedit.ranking import builtin_ranker  # noqa: E402
from blendedit.toy.tasks import task_suite  # noqa: E402

DEFAULT = "CLIP, crop 0.25 (today's default)"
DC = "diffusion classifier (the UNet's gain from the prompt)"
HEADS = {"preference head, logistic": 0, "preference head, 32 hidden": 32}
#: (rank_region, context) of the CLIP scores in the features; the first is the default ranking's
CROPS = (("crop", 0.25), ("crop", 0.0), ("crop", 0.5), ("crop", 1.0), ("masked", 0.0), ("full", 0))
CHANGED = 0.1  # a pixel changed: any channel moved by more than this (0-1 levels)
EDGE_BAND = 2  # px: the inner band of the mask that an object cut by its edge crosses


def pixel_features(images: torch.Tensor, source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, 3) for (B, 3, H, W) edits of ``source`` (1, 3, H, W) inside ``mask`` (1, 1, H, W),
    all in [0, 1]: the share of the mask's inner edge band that changed (an object cut by the
    mask's edge), the share of the mask that changed, and the mean seam step (the step across
    the mask's border less the source's, 0-1 levels)."""
    m = (mask > 0.5).float().to(images)
    src = source.to(images)
    changed = ((images - src).abs().amax(1, keepdim=True) > CHANGED).float() * m
    band = m + F.max_pool2d(-m, 2 * EDGE_BAND + 1, 1, EDGE_BAND)  # m minus its erosion
    edge = (changed * band).flatten(1).sum(1) / band.sum().clamp(min=1)
    frac = changed.flatten(1).sum(1) / m.sum().clamp(min=1)
    steps = []
    for dim in (2, 3):  # pairs of neighbours across the border: one inside, one outside
        a, b = [slice(None)] * 4, [slice(None)] * 4
        a[dim], b[dim] = slice(1, None), slice(None, -1)
        a, b = tuple(a), tuple(b)
        cross = (m[a] != m[b]).expand(images.shape[0], 3, -1, -1)
        step = (images[a] - images[b]) - (src[a] - src[b])
        steps.append((step.abs() * cross).flatten(1).sum(1) / cross.flatten(1).sum(1).clamp(1))
    return torch.stack([edge, frac, sum(steps) / 2], 1)


@torch.no_grad()
def region_features(ranker, images, prompt: str, mask, source) -> torch.Tensor:
    """(B, F): CLIP's score at each of :data:`CROPS`, the default crop's normalised image
    embedding times the prompt's (D values) and :func:`pixel_features`."""
    txt = F.normalize(ranker.embed_text(prompt).float(), dim=-1)
    scores, first = [], None
    for region, context in CROPS:
        x = images * (mask > 0).to(images) if region == "masked" else images
        if region == "crop":
            box = M.crop_box(M.mask_bbox(mask), (images.shape[-1], images.shape[-2]), 1, context)
            x = images[..., box[1] : box[3], box[0] : box[2]]
        emb = F.normalize(ranker.embed_images(x).float(), dim=-1)
        scores.append((emb @ txt.T)[:, 0])
        first = emb if first is None else first
    pix = pixel_features(images, source, mask).to(txt.device)
    return torch.cat([torch.stack(scores, 1), first * txt, pix], 1).cpu()


class PreferenceHead(torch.nn.Module):
    """Standardised features -> a logit (``hidden`` 0: logistic regression), fitted by
    full-batch AdamW on the judge's labels; deterministic for a seed."""

    def __init__(self, n_features: int, hidden: int = 0):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        lin = torch.nn.Linear
        self.net = (
            torch.nn.Sequential(lin(n_features, hidden), torch.nn.GELU(), lin(hidden, 1))
            if hidden
            else lin(n_features, 1)
        )

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net((feats - self.mean) / self.std)[:, 0]

    def fit(self, feats, labels, *, steps=400, lr=0.05, weight_decay=1e-3, seed=0):
        torch.manual_seed(seed)
        for p in self.net.parameters():
            if p.dim() > 1:
                torch.nn.init.normal_(p, std=0.01)
            else:
                torch.nn.init.zeros_(p)
        self.mean.copy_(feats.mean(0))
        self.std.copy_(feats.std(0).clamp(min=1e-6))
        opt = torch.optim.AdamW(self.net.parameters(), lr=lr, weight_decay=weight_decay)
        for _ in range(steps):
            loss = F.binary_cross_entropy_with_logits(self(feats), labels.float())
            opt.zero_grad()
            loss.backward()
            opt.step()
        return self.eval()


def load(path: str, ranker, pipe=None) -> dict:
    """The saved samples with their tasks rebuilt, every sample's features, the directional
    and shape-contrast scores and (with ``pipe``) the diffusion classifier's; the seconds the
    features took per task."""
    d = np.load(path)
    suite = json.loads(str(d["suite"]))
    tasks = task_suite(suite["n"], size=suite["size"], seed=suite["seed"])
    if [t.seed for t in tasks] != d["task_seeds"].tolist():
        raise SystemExit(f"{path}: its tasks are not task_suite({suite})'s")
    feats, direc, contrast, dc, t0 = [], [], [], [], time.perf_counter()
    for task, imgs in zip(tasks, d["images"], strict=True):
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
        src, m = pil_to_tensor(task.image), mask_to_tensor(task.mask)
        feats.append(region_features(ranker, x, task.prompt, m, src))
        direc.append(directional(ranker, x, src, m, task.prompt))
        contrast.append(shape_contrast(ranker, x, m, task.prompt))
    seconds = (time.perf_counter() - t0) / len(tasks)
    t1 = time.perf_counter()
    if pipe is not None:
        dc = [diffusion_classifier(pipe, task, imgs) for task, imgs in zip(tasks, d["images"])]
    dc_seconds = (time.perf_counter() - t1) / len(tasks)
    return dict(
        feats=torch.stack(feats),  # (T, N, F)
        directional=torch.stack(direc),
        contrast=torch.stack(contrast),
        dc=torch.stack(dc) if dc else None,
        ok=torch.from_numpy(d["ok"]),
        kinds=[t.kind for t in tasks],
        seconds=seconds,
        dc_seconds=dc_seconds,
    )


@torch.no_grad()
def directional(ranker, x, src, m, prompt) -> torch.Tensor:
    """cos(E(edit crop) - E(source crop), E(prompt) - E(empty prompt))."""
    x0, y0, x1, y1 = M.crop_box(M.mask_bbox(m), (x.shape[-1], x.shape[-2]), 1, 0.25)
    e = ranker.embed_images(torch.cat([src, x])[..., y0:y1, x0:x1]).float()
    e = F.normalize(e, dim=-1)
    t = F.normalize(ranker.embed_text(prompt).float(), -1) - F.normalize(
        ranker.embed_text("").float(), -1
    )
    return (F.normalize(e[1:] - e[:1], dim=-1) @ F.normalize(t, dim=-1).T)[:, 0]


@torch.no_grad()
def shape_contrast(ranker, x, m, prompt) -> torch.Tensor:
    """log p(the prompt's shape | the crop) among the prompt with each Shapes World shape in its
    place, by CLIP (zero-shot classification against the alternatives, not the bare score)."""
    from blendedit.toy.world import SHAPES

    x0, y0, x1, y1 = M.crop_box(M.mask_bbox(m), (x.shape[-1], x.shape[-2]), 1, 0.25)
    e = F.normalize(ranker.embed_images(x[..., y0:y1, x0:x1]).float(), dim=-1)
    words = prompt.split()
    alts = [" ".join(words[:-1] + [s]) for s in SHAPES]
    t = torch.cat([F.normalize(ranker.embed_text(a).float(), dim=-1) for a in alts])
    return F.log_softmax(100 * e @ t.T, 1)[:, SHAPES.index(words[-1])]


@torch.no_grad()
def diffusion_classifier(pipe, task, imgs, steps=(100, 300, 500, 700)) -> torch.Tensor:
    """The generator as the judge of fit: over a few noise levels (one noise draw per task,
    shared by its samples), how much the prompt lowers the UNet's denoising error in the
    mask's latent cells."""
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
    z = pipe.encode_image(x)
    m = F.adaptive_max_pool2d(mask_to_tensor(task.mask), z.shape[-2:])
    emb, _, _ = pipe.encode_prompt(task.prompt, "", len(x), True)
    g = torch.Generator().manual_seed(task.seed)
    gain = torch.zeros(len(x))
    for t in steps:
        noise = torch.randn((1, *z.shape[1:]), generator=g).expand(len(x), -1, -1, -1)
        zt = pipe.scheduler.add_noise(z, noise, torch.tensor([t]))
        eps = pipe.unet(torch.cat([zt, zt]), t, encoder_hidden_states=emb).sample
        err = ((eps - noise.repeat(2, 1, 1, 1)) ** 2 * m).flatten(1).sum(1)
        gain += err[: len(x)] - err[len(x) :]  # [unconditional; prompted]
    return gain


def scorers(train: dict) -> dict:
    """name -> function(data) -> (T, N) scores; the weights and heads fitted on ``train``."""
    edge, seam = -3, -1  # pixel_features' columns close every feature row
    out = {DEFAULT: lambda D: D["feats"][..., 0]}
    for i, (region, ctx) in enumerate(CROPS[1:], 1):
        name = f"CLIP, {region}" + (f" {ctx}" if region == "crop" else "")
        out[name] = lambda D, i=i: D["feats"][..., i]
    out["CLIP, mean of the four crops"] = lambda D: D["feats"][..., :4].mean(-1)
    out["CLIP, directional"] = lambda D: D["directional"]
    out["CLIP, the prompt's shape against the others (zero-shot)"] = lambda D: D["contrast"]
    out[DC] = lambda D: D["dc"]

    def penalised(col):  # CLIP - w * feature, w chosen by best of 4 on the training tasks
        best = max(
            (float(np.mean(best_of(s.tolist(), train["ok"].tolist(), 4))), w)
            for w in (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
            for s in [train["feats"][..., 0] - w * train["feats"][..., col]]
        )
        return best[1]

    for label, col in (("edge change", edge), ("seam", seam)):
        w = penalised(col)
        out[f"CLIP - {w:g} x {label}"] = lambda D, w=w, col=col: (
            D["feats"][..., 0] - w * D["feats"][..., col]
        )
    flat, y = train["feats"].flatten(0, 1), train["ok"].flatten()
    for name, hidden in HEADS.items():
        head = PreferenceHead(flat.shape[1], hidden).fit(flat, y)
        out[name] = lambda D, head=head: head(D["feats"].flatten(0, 1)).view(D["ok"].shape)
    return out


def evaluate(scores: torch.Tensor, data: dict, default: torch.Tensor) -> dict:
    s, ok = scores.detach().tolist(), data["ok"].tolist()
    row = dict(pair_accuracy=pair_accuracy(s, ok))
    for n in (4, 8):
        picks, base = best_of(s, ok, n), best_of(default.tolist(), ok, n)
        row[f"best_of_{n}"] = float(np.mean(picks))
        row[f"ci_{n}"] = wilson(sum(picks), len(picks))
        row[f"vs_default_{n}"] = paired(
            [dict(success=v) for v in picks], [dict(success=v) for v in base]
        )
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", required=True)
    p.add_argument("--bench", required=True)
    p.add_argument("--clip", default="toy", help="the CLIP the features read (default: toy)")
    p.add_argument(
        "--model", default="toy", help="the generator of the diffusion classifier ('' for none)"
    )
    p.add_argument("--sample-seconds", type=float, default=None, help="sampling s per task")
    p.add_argument("--out", default="benchmarks/results/ranking/study")
    args = p.parse_args(argv)
    ranker = builtin_ranker(args.clip)
    pipe = BlendedLatentDiffusionPipeline.from_pretrained(args.model) if args.model else None
    t0 = time.perf_counter()
    train, bench = load(args.train, ranker), load(args.bench, ranker, pipe)
    fns = scorers(train)
    if bench["dc"] is None:
        del fns[DC]
    default = fns[DEFAULT](bench)
    rows = {name: evaluate(fn(bench), bench, default) for name, fn in fns.items()}
    ok = bench["ok"]
    oracle = {n: float(ok[:, :n].any(1).float().mean()) for n in (4, 8)}
    sample_s = args.sample_seconds
    if sample_s is None:  # what ranking.py measured beside the samples
        rj = Path(args.bench).with_name("ranking.json")
        sample_s = json.loads(rj.read_text())["summary"]["cost"]["sample_s"] if rj.exists() else 0
    res = dict(
        train=dict(
            path=args.train, tasks=len(train["ok"]), success=float(train["ok"].float().mean())
        ),
        bench=dict(path=args.bench, tasks=len(ok), success=float(ok.float().mean())),
        oracle=oracle,
        rankings=rows,
        cost=dict(
            features_s_per_task=bench["seconds"],
            diffusion_classifier_s_per_task=bench["dc_seconds"],
            sample_s_per_task=sample_s,
        ),
        wall_s=round(time.perf_counter() - t0, 1),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(res, indent=1))
    (out / "study.md").write_text(report(res))
    print(report(res))
    return 0


def report(res: dict) -> str:
    o, cost = res["oracle"], res["cost"]
    lines = [
        "# Ranking study (issue 42)",
        "",
        f"Bench tasks: {res['bench']['tasks']} x 8 samples ({res['bench']['success']:.1%} of "
        f"samples judged successes); heads and penalty weights fitted on "
        f"{res['train']['tasks']} other tasks x 8 ({res['train']['success']:.1%}). Paired: "
        "the tasks only this ranking's pick edits against those only today's pick edits, and the "
        "exact sign test's p.",
        "",
        "| ranking | best of 4 | share of oracle | paired at 4 | best of 8 | share of oracle | "
        "paired at 8 | pair accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    o4, o8 = o[4], o[8]
    lines.append(f"| **oracle** | {o4:.1%} | - | - | {o8:.1%} | - | - | - |")
    for name, r in res["rankings"].items():
        v4, v8 = r["vs_default_4"], r["vs_default_8"]
        lines.append(
            f"| {name} | {r['best_of_4']:.1%} | {r['best_of_4'] / o4:.0%} | "
            f"{v4['only_a']} vs {v4['only_b']}, p = {v4['p']:.3g} | {r['best_of_8']:.1%} | "
            f"{r['best_of_8'] / o8:.0%} | {v8['only_a']} vs {v8['only_b']}, p = {v8['p']:.3g} | "
            f"{r['pair_accuracy'][0]:.3f} |"
        )
    ratio = (
        cost["features_s_per_task"] / cost["sample_s_per_task"] if cost["sample_s_per_task"] else 0
    )
    lines += [
        "",
        f"Cost: the features of 8 samples take {cost['features_s_per_task']:.3f} s a task, "
        f"{ratio:.1%} of sampling them ({cost['sample_s_per_task']:.2f} s); the diffusion "
        f"classifier's {cost['diffusion_classifier_s_per_task']:.3f} s.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
