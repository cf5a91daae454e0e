"""Issue 42's experiment: a ranking CLIP tuned on the toy model's own samples (a PickScore-like
preference model). The shipped CLIP's last ``--layers`` vision blocks and projection learn, on
the training tasks' samples (``ranking.py --save-samples``) labelled by the judge, a binary loss
on the crop's score against the prompt (success) plus the shape the judge reads (cross-entropy
over the prompt with each shape in its place); the bench's samples measure the pick.

    python benchmarks/rank_clip_tune.py --train runs/rank/train/samples.npz \
        --bench runs/rank/bench/samples.npz [--layers 1] [--lr 1e-4] [--epochs 5]

A task range can follow a path (``PATH:0:60``). Prints best of 4 and 8 and the pair accuracy
before and after each epoch, and the tasks won and lost against the untuned CLIP.
"""

import argparse
import copy
import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as Fn

sys.path.insert(0, "benchmarks")
from ranking import best_of, pair_accuracy  # noqa: E402

from blendedit import masks as M  # noqa: E402
from blendedit.io import mask_to_tensor  # noqa: E402
from blendedit.ranking import _features, builtin_ranker  # noqa: E402
from blendedit.toy.judge import MIN_IOU, judge  # noqa: E402
from blendedit.toy.tasks import task_suite  # noqa: E402
from blendedit.toy.world import SHAPES  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--train", required=True)
ap.add_argument("--bench", required=True)
ap.add_argument("--layers", type=int, default=1)
ap.add_argument("--lr", type=float, default=1e-4)
ap.add_argument("--epochs", type=int, default=5)
args = ap.parse_args()
torch.set_num_threads(2)
rk = builtin_ranker("toy")


def crops(path):
    path, *rng = path.split(":")
    d = np.load(path)
    suite = json.loads(str(d["suite"]))
    tasks = task_suite(suite["n"], size=suite["size"], seed=suite["seed"])
    a, b = (int(rng[0]), int(rng[1])) if rng else (0, len(tasks))
    X, P, S, Y, T = [], [], [], [], []
    for k, (task, imgs) in enumerate(zip(tasks[a:b], d["images"][a:b])):
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
        m = mask_to_tensor(task.mask)
        x0, y0, x1, y1 = M.crop_box(M.mask_bbox(m), (x.shape[-1], x.shape[-2]), 1, 0.25)
        X.append(rk._preprocess(x[..., y0:y1, x0:x1]))
        for i in range(len(x)):
            v = judge(imgs[i], task.mask, task.prompt)
            S.append(SHAPES.index(v.shape) if v.shape and v.iou >= MIN_IOU else -1)
            Y.append(v.success)
            P.append(task.prompt)
            T.append(k)
    return torch.cat(X), P, torch.tensor(S), torch.tensor(Y), torch.tensor(T), d["ok"][a:b]


t0 = time.time()
Xtr, Ptr, Str, Ytr, Ttr, _ = crops(args.train)
Xbe, Pbe, Sbe, Ybe, Tbe, okbe = crops(args.bench)
print("crops", time.time() - t0, Xtr.shape, Ytr.float().mean(), (Str >= 0).float().mean())

model = copy.deepcopy(rk.model)
tok = rk.tokenizer
prompts = sorted(set(Ptr) | set(Pbe))


@torch.no_grad()
def text_embeds(texts: list[str]) -> torch.Tensor:
    ids = tok(
        texts,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
        max_length=model.config.text_config.max_position_embeddings,
    )
    return Fn.normalize(_features(model.get_text_features(input_ids=ids.input_ids)).float(), dim=-1)


temb = text_embeds(prompts)
pidx = {p: i for i, p in enumerate(prompts)}
# the prompt with each shape in place of its own
alt = {}
for p in prompts:
    w = p.split()
    alt[p] = [" ".join(w[:-1] + [s]) for s in SHAPES]
allp = sorted({a for p in prompts for a in alt[p]})
aemb = text_embeds(allp)
aidx = {p: i for i, p in enumerate(allp)}

train_layers = args.layers
for p in model.parameters():
    p.requires_grad_(False)
vm = model.vision_model
params = list(model.visual_projection.parameters()) + list(vm.post_layernorm.parameters())
for layer in vm.encoder.layers[-train_layers:]:
    params += list(layer.parameters())
for p in params:
    p.requires_grad_(True)
scale = torch.nn.Parameter(torch.tensor(20.0))
bias = torch.nn.Parameter(torch.tensor(-5.0))
opt = torch.optim.AdamW(params + [scale, bias], lr=args.lr, weight_decay=0.01)


def img_emb(x):
    return Fn.normalize(_features(model.get_image_features(pixel_values=x)).float(), dim=-1)


def evaluate(tag):
    model.eval()
    with torch.no_grad():
        e = torch.cat([img_emb(Xbe[i : i + 256]) for i in range(0, len(Xbe), 256)])
    s = (e * temb[[pidx[p] for p in Pbe]]).sum(1).view(-1, 8)
    sc = s.tolist()
    ok = okbe.tolist()
    print(
        tag,
        {n: round(float(np.mean(best_of(sc, ok, n))), 3) for n in (4, 8)},
        round(pair_accuracy(sc, ok)[0], 3),
        flush=True,
    )
    model.train()
    return s


base = evaluate("before")
n = len(Xtr)
g = torch.Generator().manual_seed(0)
epochs = args.epochs
for ep in range(epochs):
    perm = torch.randperm(n, generator=g)
    tl = 0
    for b in range(0, n, 64):
        i = perm[b : b + 64]
        e = img_emb(Xtr[i])
        t = temb[[pidx[Ptr[j]] for j in i]]
        logit = scale * (e * t).sum(1) + bias
        loss = Fn.binary_cross_entropy_with_logits(logit, Ytr[i].float())
        has = Str[i] >= 0
        if has.any():
            a = aemb[torch.tensor([[aidx[q] for q in alt[Ptr[j]]] for j in i[has]])]  # (k, 5, D)
            lg = 30 * (a @ e[has].unsqueeze(-1))[..., 0]
            loss = loss + Fn.cross_entropy(lg, Str[i][has])
        opt.zero_grad()
        loss.backward()
        opt.step()
        tl += float(loss.detach())
    print("epoch", ep, tl / (n / 64), time.time() - t0, flush=True)
    s = evaluate(f"after {ep}")
b4 = best_of(base.tolist(), okbe.tolist(), 4)
p4 = best_of(s.tolist(), okbe.tolist(), 4)
print(
    "w/l at 4", sum(a and not b for a, b in zip(p4, b4)), sum(b and not a for a, b in zip(p4, b4))
)
b8 = best_of(base.tolist(), okbe.tolist(), 8)
p8 = best_of(s.tolist(), okbe.tolist(), 8)
print(
    "w/l at 8", sum(a and not b for a, b in zip(p8, b8)), sum(b and not a for a, b in zip(p8, b8))
)
