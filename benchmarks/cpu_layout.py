"""What the channels-last UNet layout is worth on the CPU, one denoiser call at a time.

On the CPU the pipeline keeps a UNet's weights channels-last (``LatentModel._layout``), so its
convolutions and activations run in that layout. This times one UNet call (classifier-free
guidance's batch of 2 per sample) in that layout against the default one, the two copies of the
same weights called alternately call by call (so the machine's drift falls on both), for the
shipped Shapes World UNets and the random SD- and SDXL-shaped ones of ``blendedit.tiny``, at
several latent grids. The ratio is the median of same-pair ratios, with how many pairs the
channels-last call won.

    python benchmarks/cpu_layout.py [--calls 30] [--out benchmarks/results/cpu_layout]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

from blendedit.models import BUILTIN_MODELS, toy_shipped
from blendedit.tiny import build_tiny_components, build_tiny_sdxl_components

sys.path.insert(0, str(Path(__file__).parent))
from speed import machine, write_report  # noqa: E402

#: (name, latent sides, samples): the shipped toy UNet at its own 16x16 grid (4 samples, the
#: default) and zoomed/big grids; the random SD 1.x-shaped UNet (channels / 4) at 256-768 px.
CASES = (
    ("toy", (16, 32), 4),
    ("toy-inpaint", (16,), 4),
    ("sd-shaped", (32, 48, 64), 1),
    ("sdxl-shaped", (32,), 1),
)


def build_unet(name: str):
    """The UNet of ``name``: a shipped model or a random preset of :mod:`blendedit.tiny`."""
    if name in BUILTIN_MODELS:
        unet = BUILTIN_MODELS[name]()["unet"]
    elif name == "sdxl-shaped":
        unet = build_tiny_sdxl_components(name)["unet"]
    else:
        unet = build_tiny_components(name)["unet"]
    return unet.float().eval()


def call_inputs(unet, side: int, samples: int) -> dict:
    """The keyword inputs of one guided call of ``unet`` on a side x side latent grid."""
    g = torch.Generator().manual_seed(0)
    b = 2 * samples
    kw = dict(
        sample=torch.randn(b, unet.config.in_channels, side, side, generator=g),
        timestep=torch.tensor(500),
        encoder_hidden_states=torch.randn(b, 77, unet.config.cross_attention_dim, generator=g),
        return_dict=False,
    )
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text and size ids
        cfg = unet.config
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kw["added_cond_kwargs"] = dict(
            text_embeds=torch.randn(b, pooled, generator=g),
            time_ids=torch.tensor([[8.0 * side] * 2 + [0.0] * 2 + [8.0 * side] * 2] * b),
        )
    return kw


def compare(unet, kw: dict, calls: int) -> dict:
    """Alternate calls of the default and channels-last copies; their times and the ratio."""
    fast = copy.deepcopy(unet).to(memory_format=torch.channels_last)
    runs = {"default": unet, "channels_last": fast}
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.inference_mode():
        outs = {k: m(**kw)[0] for k, m in runs.items()}  # warm-up, and the two outputs
        for i in range(calls):
            for k in list(runs)[:: 1 if i % 2 == 0 else -1]:
                t = time.perf_counter()
                runs[k](**kw)
                times[k].append(time.perf_counter() - t)
    ratios = [a / b for a, b in zip(times["channels_last"], times["default"])]
    return dict(
        ms={k: 1000 * statistics.median(v) for k, v in times.items()},
        ratio=statistics.median(ratios),
        won=sum(r < 1 for r in ratios),
        calls=calls,
        max_abs_diff=float((outs["default"] - outs["channels_last"]).abs().max()),
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=30, help="alternating pairs of calls per case")
    p.add_argument("--models", nargs="+", default=[c[0] for c in CASES], help="of the UNets")
    p.add_argument("--out", default="benchmarks/results/cpu_layout")
    args = p.parse_args(argv)
    t_all = time.time()
    rows = []
    for name, sides, samples in (c for c in CASES if c[0] in args.models):
        if name in BUILTIN_MODELS and not toy_shipped():
            print(f"{name}: the shipped model is missing, skipped", file=sys.stderr)
            continue
        unet = build_unet(name)  # once: its weights do not depend on the grid
        for side in sides:
            kw = call_inputs(unet, side, samples)
            calls = max(4, round(args.calls * min(1.0, 32 * 32 / side**2)))  # fewer on big grids
            r = compare(unet, kw, calls)
            r.update(model=name, side=side, samples=samples)
            rows.append(r)
            print(
                f"{name} {side}x{side}: {r['ms']['default']:.1f} ms default, "
                f"{r['ms']['channels_last']:.1f} ms channels-last, {r['ratio']:.3f}x, "
                f"won {r['won']} of {calls}",
                file=sys.stderr,
                flush=True,
            )
    res = dict(rows=rows, machine=machine(), wall_seconds=round(time.time() - t_all, 1))
    cmd = " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# The channels-last UNet layout on the CPU",
        "",
        f"`python benchmarks/cpu_layout.py {cmd}` on {res['machine']}; "
        f"{res['wall_seconds']} s in all. "
        "One UNet call (guidance's 2 rows per sample), the same weights in the default and the "
        "channels-last layout, called alternately; the ratio is the median of same-pair ratios.",
        "",
        "| UNet | latent grid | samples | default (ms) | channels-last (ms) | ratio | "
        "channels-last faster | max abs diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['side']}x{r['side']} | {r['samples']} | "
            f"{r['ms']['default']:.1f} | {r['ms']['channels_last']:.1f} | **{r['ratio']:.3f}x** | "
            f"{r['won']} of {r['calls']} | {r['max_abs_diff']:.1e} |"
        )
    write_report(args.out, res, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
