"""What the work shared between an edit's denoiser calls is worth on the CPU
(blendedit.sharing).

The pipeline gives its UNets' plain cross-attention modules a processor that projects the text
to keys and values on an edit's first step and reuses them on the later ones, and (SD 1.x/2.x
UNets) runs the layers before the first cross-attention once for classifier-free guidance's two
identical halves of the batch; diffusers' pipelines do neither. This times one UNet call of an
edit's later steps (guidance's batch of 2 per sample, the keys and values already projected)
with each of the two, and both, against the same call without them, both copies channels-last as
the pipeline keeps them on the CPU, called alternately call by call, for the shipped Shapes
World UNets and the random SD- and SDXL-shaped ones of ``blendedit.tiny``. The ratio is the
median of same-pair ratios, with how many pairs the sharing call won, and the largest
difference between the outputs (0 for the keys and values, float rounding for the rows).

For a transformer (``flux-fill``: the Flux Fill transformer of ``speed_inpaint.py``, 256 px, one
sample), what is shared is the embedding of the per-edit inputs (the text's projection, the
pooled text's and the guidance scale's embeddings, the rotary embedding of the position ids),
computed on the first step and reused after: one call of a later step, its inputs made afresh
as ``blendedit.families.Flux.call`` makes them, against the same call without.

    python benchmarks/shared_work.py [--calls 20] [--out benchmarks/results/shared_work]
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from blendedit import sharing
from blendedit.models import BUILTIN_MODELS, toy_shipped

sys.path.insert(0, str(Path(__file__).parent))
from cpu_layout import build_unet, call_inputs, channels_last, compare, log  # noqa: E402
from speed import machine, write_report  # noqa: E402

#: (name, latent sides, samples), as in cpu_layout.py
CASES = (
    ("toy", (16,), 4),
    ("toy-inpaint", (16,), 4),
    ("sd-shaped", (32, 64), 1),
    ("sdxl-shaped", (32, 64), 1),
    ("flux-fill", (32,), 1),
)


def sharing_unet(unet):
    """``unet`` with blendedit's cross-attention processors and guidance-row hooks, or a
    transformer with its per-edit modules reusing their outputs."""
    assert sharing.install(unet) > 0 or sharing.per_edit_modules(unet)
    return unet


def flux_fill(side: int):
    """The Flux Fill transformer of ``speed_inpaint.py`` and a call of it on a ``side`` x
    ``side`` latent grid, one sample, its inputs made at every call as Flux.call makes them."""
    from speed_inpaint import components

    from blendedit.denoisers import _text_ids, image_ids

    model = components("flux-fill", 8 * side, 6, 6)["transformer"].float().eval()
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    tokens = torch.randn(1, side * side // 4, cfg.in_channels, generator=g)
    text = torch.randn(1, 512, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(1, cfg.pooled_projection_dim, generator=g)

    def call(m):
        return m(
            hidden_states=tokens,
            timestep=torch.full((1,), 0.5),
            guidance=torch.full((1,), 30.0),
            pooled_projections=pooled,
            encoder_hidden_states=text,
            txt_ids=_text_ids(text.shape[1], "cpu", torch.float32),
            img_ids=image_ids(side, side, "cpu", torch.float32),
            return_dict=False,
        )[0]

    return model, call


#: what is shared: the scopes a call of an edit's later steps runs in
WHAT = {
    "keys and values": ("cache",),
    "guidance rows": ("twins",),
    "both": ("cache", "twins"),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=20, help="alternating pairs of calls per case")
    p.add_argument("--models", nargs="+", default=[c[0] for c in CASES])
    p.add_argument("--out", default="benchmarks/results/shared_work")
    args = p.parse_args(argv)
    t_all = time.time()
    rows = []
    for name, sides, samples in (c for c in CASES if c[0] in args.models):
        if name in BUILTIN_MODELS and not toy_shipped():
            print(f"{name}: the shipped model is missing, skipped", file=sys.stderr)
            continue
        if name == "flux-fill":
            model, call = flux_fill(sides[0])
            kept: dict = {}  # the per-edit embeddings of the edit's first step, kept

            def scoped(m, call=call, kept=kept):
                with sharing.edit_cache(kept):
                    return call(m)

            r = compare(model, scoped, args.calls, change=sharing_unet)
            r.update(model=name, side=sides[0], samples=1, what="per-edit inputs")
            rows.append(log(r, f"{name} {sides[0]}x{sides[0]} per-edit inputs"))
            continue
        unet = channels_last(build_unet(name))
        for side in sides:
            kw = call_inputs(unet, side, samples)
            kw["sample"] = torch.cat([kw["sample"][:samples]] * 2)  # guidance's [z; z]
            calls = max(4, round(args.calls * min(1.0, 32 * 32 / side**2)))
            for what, scopes in WHAT.items():
                if "twins" in scopes and not sharing.twin_layers(unet):
                    continue  # an SDXL UNet: no rows to share
                kept: dict = {}  # the keys and values of the edit's first step, kept

                def call(m, kw=kw, kept=kept, scopes=scopes):
                    with ExitStack() as stack:
                        if "cache" in scopes:
                            stack.enter_context(sharing.edit_cache(kept))
                        if "twins" in scopes:
                            stack.enter_context(sharing.twin_rows())
                        return m(**kw)[0]

                r = compare(unet, call, calls, change=sharing_unet)
                r.update(model=name, side=side, samples=samples, what=what)
                rows.append(log(r, f"{name} {side}x{side} {what}"))
    res = dict(rows=rows, machine=machine(), wall_seconds=round(time.time() - t_all, 1))
    cmd = " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Work shared between an edit's denoiser calls, on the CPU",
        "",
        f"`python benchmarks/{Path(__file__).name} {cmd}` on {res['machine']}; "
        f"{res['wall_seconds']} s in all. One denoiser call of an edit's later steps (a UNet: "
        "guidance's [z; z], 2 rows per sample; the Flux Fill transformer: one row, its guidance "
        "an input), the same weights (a UNet's channels-last) without and with "
        "blendedit.sharing (keys and values projected on the first step; the guidance rows' "
        "layers before the text once; for a transformer, its per-edit inputs embedded on the "
        "first step), called alternately; the ratio is the median of same-pair "
        "ratios.",
        "",
        "| denoiser | latent grid | samples | shared | without (ms) | with (ms) | ratio | "
        "with faster | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['side']}x{r['side']} | {r['samples']} | {r['what']} | "
            f"{r['ms']['default']:.1f} | {r['ms']['sharing_unet']:.1f} | **{r['ratio']:.3f}x** | "
            f"{r['won']} of {r['calls']} | {r['max_abs_diff']:.1e} |"
        )
    write_report(args.out, res, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
