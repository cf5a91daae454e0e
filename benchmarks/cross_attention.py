"""What projecting the text to cross-attention keys and values once per edit is worth on the CPU.

The pipeline gives each plain cross-attention module of its UNets a processor that projects the
text embeddings to keys and values on an edit's first step and reuses them on the later ones
(``blendedit.attention``); diffusers' processor projects them at every step. This times one
UNet call of an edit's later steps (classifier-free guidance's batch of 2 per sample, the
keys and values already projected) against the same call with diffusers' processor, both
copies channels-last as the pipeline keeps them on the CPU, called alternately call by call,
for the shipped Shapes World UNets and the random SD- and SDXL-shaped ones of
``blendedit.tiny``. The ratio is the median of same-pair ratios, with how many pairs the cached
call won; the outputs must be identical.

    python benchmarks/cross_attention.py [--calls 30] [--out benchmarks/results/cross_attention]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from blendedit import attention
from blendedit.models import BUILTIN_MODELS, toy_shipped

sys.path.insert(0, str(Path(__file__).parent))
from cpu_layout import build_unet, call_inputs, channels_last, compare  # noqa: E402
from speed import machine, write_report  # noqa: E402

#: (name, latent sides, samples), as in cpu_layout.py
CASES = (
    ("toy", (16,), 4),
    ("toy-inpaint", (16,), 4),
    ("sd-shaped", (32, 64), 1),
    ("sdxl-shaped", (32, 64), 1),
)


def cached(unet):
    """``unet`` with blendedit's cross-attention processors."""
    assert attention.install(unet) > 0
    return unet


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=30, help="alternating pairs of calls per case")
    p.add_argument("--models", nargs="+", default=[c[0] for c in CASES])
    p.add_argument("--out", default="benchmarks/results/cross_attention")
    args = p.parse_args(argv)
    t_all = time.time()
    rows = []
    for name, sides, samples in (c for c in CASES if c[0] in args.models):
        if name in BUILTIN_MODELS and not toy_shipped():
            print(f"{name}: the shipped model is missing, skipped", file=sys.stderr)
            continue
        unet = channels_last(build_unet(name))
        for side in sides:
            kw = call_inputs(unet, side, samples)
            kept: dict = {}  # the keys and values of the edit's first step, kept

            def call(m, kw=kw, kept=kept):
                with attention.cross_attention_cache(kept):
                    return m(**kw)[0]

            calls = max(4, round(args.calls * min(1.0, 32 * 32 / side**2)))
            r = compare(unet, call, calls, change=cached)
            r.update(model=name, side=side, samples=samples)
            assert r["max_abs_diff"] == 0.0, r  # the same arithmetic
            rows.append(r)
            print(
                f"{name} {side}x{side}: {r['ms']['default']:.1f} ms diffusers' processor, "
                f"{r['ms']['cached']:.1f} ms cached, {r['ratio']:.3f}x, won {r['won']} of {calls}",
                file=sys.stderr,
                flush=True,
            )
    res = dict(rows=rows, machine=machine(), wall_seconds=round(time.time() - t_all, 1))
    cmd = " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Cross-attention keys and values once per edit, on the CPU",
        "",
        f"`python benchmarks/cross_attention.py {cmd}` on {res['machine']}; "
        f"{res['wall_seconds']} s in all. One UNet call of an edit's later steps (guidance's 2 "
        "rows per sample), the same channels-last weights with diffusers' attention processor "
        "and with blendedit's (keys and values projected on the first step), called "
        "alternately; the ratio is the median of same-pair ratios. The outputs are identical.",
        "",
        "| UNet | latent grid | samples | diffusers' processor (ms) | cached (ms) | ratio | "
        "cached faster |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['side']}x{r['side']} | {r['samples']} | "
            f"{r['ms']['default']:.1f} | {r['ms']['cached']:.1f} | **{r['ratio']:.3f}x** | "
            f"{r['won']} of {r['calls']} |"
        )
    write_report(args.out, res, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
