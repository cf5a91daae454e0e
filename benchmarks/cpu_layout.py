"""What the channels-last layout is worth on the CPU, one UNet call or VAE pass at a time.

On the CPU the pipeline keeps its UNets' and its VAE's weights channels-last
(``LatentModel._layout``), so their convolutions and activations run in that layout. This times
one UNet call (classifier-free guidance's batch of 2 per sample), one VAE encode (the source)
and one VAE decode (the samples) in that layout against the default one (the VAE's input
channels-last in both, as the pipeline gave it before its weights were), the two copies of the
same weights called alternately call by call (so the machine's drift falls on both), for the
shipped Shapes World models and the random SD- and SDXL-shaped ones of ``blendedit.tiny`` (and
a VAE of SD's full width), at several sizes. The ratio is the median of same-pair ratios, with
how many pairs the channels-last call won. ``--models none`` or ``--vaes`` alone skip a part.

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
#: (name, pixel sides, samples decoded): the VAEs, encoding one source and decoding the samples
VAE_CASES = (
    ("toy", (128,), 4),
    ("sd-shaped", (256, 512), 1),
    ("sdxl-shaped", (256,), 1),
    ("sd-full-width", (256,), 1),
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


def build_vae(name: str):
    """The VAE of ``name``: a shipped model's, a random preset's, or SD's at its full width."""
    if name == "sd-full-width":
        from diffusers import AutoencoderKL

        torch.manual_seed(0)
        ch = (128, 256, 512, 512)
        vae = AutoencoderKL(
            block_out_channels=ch,
            layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            norm_num_groups=32,
        )
    elif name in BUILTIN_MODELS:
        vae = BUILTIN_MODELS[name]()["vae"]
    elif name == "sdxl-shaped":
        vae = build_tiny_sdxl_components(name)["vae"]
    else:
        vae = build_tiny_components(name)["vae"]
    return vae.float().eval()


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


def channels_last(model):
    return model.to(memory_format=torch.channels_last)


def compare(model, call, calls: int, change=channels_last) -> dict:
    """Alternate ``call(m)`` on ``model`` ("default") and a copy changed by ``change``
    ("channels_last" by default); their median times (ms), the median same-pair ratio, the
    pairs the changed copy won and the largest difference between the two outputs."""
    runs = {"default": model, change.__name__: change(copy.deepcopy(model))}
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.inference_mode():
        outs = {k: call(m) for k, m in runs.items()}  # warm-up, and the two outputs
        for i in range(calls):
            for k in list(runs)[:: 1 if i % 2 == 0 else -1]:
                t = time.perf_counter()
                call(runs[k])
                times[k].append(time.perf_counter() - t)
    ratios = [a / b for a, b in zip(times[change.__name__], times["default"])]
    return dict(
        ms={k: 1000 * statistics.median(v) for k, v in times.items()},
        ratio=statistics.median(ratios),
        won=sum(r < 1 for r in ratios),
        calls=calls,
        max_abs_diff=float((outs["default"] - outs[change.__name__]).abs().max()),
    )


def log(r: dict, what: str) -> dict:
    """Print one :func:`compare` result ``r`` (named ``what``) to stderr; returns it."""
    changed = next(k for k in r["ms"] if k != "default")
    print(
        f"{what}: {r['ms']['default']:.1f} ms default, {r['ms'][changed]:.1f} ms {changed}, "
        f"{r['ratio']:.3f}x, won {r['won']} of {r['calls']}, max diff {r['max_abs_diff']:.1e}",
        file=sys.stderr,
        flush=True,
    )
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=30, help="alternating pairs of calls per case")
    p.add_argument("--models", nargs="+", default=[c[0] for c in CASES], help="of the UNets")
    p.add_argument("--vaes", nargs="*", default=[c[0] for c in VAE_CASES], help="of the VAEs")
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
            r = compare(unet, lambda m, kw=kw: m(**kw)[0], calls)
            r.update(model=name, side=side, samples=samples)
            rows.append(log(r, f"{name} {side}x{side}"))
    vae_rows = []
    for name, sides, samples in (c for c in VAE_CASES if c[0] in args.vaes):
        if name in BUILTIN_MODELS and not toy_shipped():
            print(f"{name}: the shipped model is missing, skipped", file=sys.stderr)
            continue
        vae = build_vae(name)
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        for side in sides:
            g = torch.Generator().manual_seed(0)
            # the inputs channels-last in both, as the pipeline hands them to the VAE
            x = torch.randn(1, 3, side, side, generator=g).to(memory_format=torch.channels_last)
            z = torch.randn(samples, vae.config.latent_channels, side // f, side // f, generator=g)
            z = z.to(memory_format=torch.channels_last)
            work = side**2 * (1 + 2 * samples) * sum(vae.config.block_out_channels) ** 2
            calls = max(4, min(args.calls, round(args.calls * 1e11 / work)))  # fewer if big
            for what, call in (
                ("encode", lambda m, x=x: m.encode(x).latent_dist.mean),
                ("decode", lambda m, z=z: m.decode(z).sample),
            ):
                r = compare(vae, call, calls)
                r.update(model=name, side=side, samples=1 if what == "encode" else samples)
                r["what"] = what
                vae_rows.append(log(r, f"VAE {name} {what} {side}x{side}"))
    res = dict(
        rows=rows, vae_rows=vae_rows, machine=machine(), wall_seconds=round(time.time() - t_all, 1)
    )
    cmd = " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# The channels-last layout on the CPU",
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
    if vae_rows:
        lines += [
            "",
            "One VAE pass, encoding one source image or decoding the samples, in the same way "
            "(the input channels-last in both, as the pipeline gives it):",
            "",
            "| VAE | pass | pixels | images | default (ms) | channels-last (ms) | ratio | "
            "channels-last faster | max abs diff |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in vae_rows:
            lines.append(
                f"| {r['model']} | {r['what']} | {r['side']}x{r['side']} | {r['samples']} | "
                f"{r['ms']['default']:.1f} | {r['ms']['channels_last']:.1f} | "
                f"**{r['ratio']:.3f}x** | {r['won']} of {r['calls']} | {r['max_abs_diff']:.1e} |"
            )
    write_report(args.out, res, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
