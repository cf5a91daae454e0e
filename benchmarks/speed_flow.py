"""Speed of a Blended Latent Diffusion edit on flow-matching models (issue 30), side by side with
diffusers' StableDiffusion3InpaintPipeline and FluxInpaintPipeline on the same random models.

Each family's model is the tiny one of ``blendedit.tiny`` (its text encoders, T5 included, and
VAE) with a wider, deeper transformer in place of the tiny one (``--layers`` blocks of
``--heads`` x 32), so that the transformer dominates as in the real models. Ours and diffusers'
share the model, steps, size, guidance and seed, and alternate in one process (the order
rotates every round); the ratio is the median of same-round ratios, as in ``speed.py``.

    python benchmarks/speed_flow.py [--quick] [--out benchmarks/results/speed_flow]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from blendedit import BlendedLatentDiffusionPipeline
from blendedit.models import quiet_transformers
from blendedit.tiny import build_tiny_flux_components, build_tiny_sd3_components

sys.path.insert(0, str(Path(__file__).parent))
from speed import PROMPT, alternate, machine, paired_ratio, scene, write_report  # noqa: E402

with quiet_transformers():
    from diffusers import (
        FluxInpaintPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3InpaintPipeline,
    )


def ours_for(c: dict, family: str) -> BlendedLatentDiffusionPipeline:
    """Our pipeline on diffusers' components ``c`` (its own copy of the scheduler)."""
    names = ("text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
    sched = c["scheduler"]
    return BlendedLatentDiffusionPipeline(
        c["transformer"],
        c["vae"],
        c["text_encoder"],
        c["tokenizer"],
        type(sched).from_config(sched.config),
        family=family,
        **{k: c[k] for k in names if k in c},
    )


def sd3_pipelines(layers: int, heads: int, size: int):
    c = build_tiny_sd3_components(t5=True)
    torch.manual_seed(0)
    c["transformer"] = SD3Transformer2DModel(
        sample_size=size // 8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=layers,
        attention_head_dim=32,
        num_attention_heads=heads,
        joint_attention_dim=96,
        caption_projection_dim=32 * heads,
        pooled_projection_dim=80,
        pos_embed_max_size=size // 8,
    ).eval()
    return ours_for(c, "sd3"), StableDiffusion3InpaintPipeline(**c), c["transformer"]


def flux_pipelines(layers: int, heads: int, size: int):
    c = build_tiny_flux_components(guidance_embeds=True)
    torch.manual_seed(0)
    c["transformer"] = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=max(1, layers // 3),
        num_single_layers=layers - max(1, layers // 3),
        attention_head_dim=32,
        num_attention_heads=heads,
        joint_attention_dim=96,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(8, 12, 12),
    ).eval()
    return ours_for(c, "flux"), FluxInpaintPipeline(**c), c["transformer"]


def pair(ours, theirs, image, mask, common: dict, size: dict) -> dict:
    """The two runs of one family, each from the same seed."""

    def g():
        return torch.Generator().manual_seed(0)

    return {
        "ours": lambda: ours(PROMPT, image, mask, crop_to_mask=False, generator=g(), **common),
        "diffusers_inpaint": lambda: theirs(
            PROMPT, image=image, mask_image=mask, strength=1.0, generator=g(), **size, **common
        ),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="fewer rounds and steps")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 9)")
    p.add_argument("--families", nargs="+", default=["sd3", "flux"], choices=["sd3", "flux"])
    p.add_argument("--out", default="benchmarks/results/speed_flow")
    args = p.parse_args(argv)
    steps, rounds = (8, 3) if args.quick else (20, args.rounds or 9)
    t_all = time.time()
    image, mask = scene(args.size, args.size * 3 // 8)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    size = dict(height=args.size, width=args.size)
    res = dict(size=args.size, steps=steps, rounds=rounds, layers=args.layers, heads=args.heads)
    for family, build, guidance in (("sd3", sd3_pipelines, 5.0), ("flux", flux_pipelines, 3.5)):
        if family not in args.families:
            continue
        ours, theirs, transformer = build(args.layers, args.heads, args.size)
        theirs.set_progress_bar_config(disable=True)
        runs = pair(
            ours,
            theirs,
            image,
            mask,
            dict(num_inference_steps=steps, guidance_scale=guidance),
            size,
        )
        log(f"{family}: {args.size}px, {steps} steps, {rounds} rounds")
        times, cpu = alternate(runs, rounds, log)
        res[family] = dict(
            transformer_params=sum(q.numel() for q in transformer.parameters()),
            times=times,
            median={k: statistics.median(v) for k, v in times.items()},
            ratio=paired_ratio(times, "ours", "diffusers_inpaint"),
            cpu_ratio=paired_ratio(cpu, "ours", "diffusers_inpaint"),
        )
    res["machine"] = machine()
    res["wall_seconds"] = round(time.time() - t_all, 1)
    names = {"sd3": "StableDiffusion3InpaintPipeline", "flux": "FluxInpaintPipeline"}
    lines = [
        "# Speed on flow-matching models (issue 30)",
        "",
        f"`python benchmarks/speed_flow.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
        f": {args.size} px, "
        f"{steps} steps, one sample, random models with a transformer of {args.layers} blocks of "
        f"{args.heads} x 32 wide (T5 included), {rounds} alternating rounds on {res['machine']}; "
        f"{res['wall_seconds']} s in all. SD3 at guidance 5 (classifier-free), Flux at 3.5 (the "
        "guidance input of a distilled model).",
        "",
        "| family | transformer | ours (s) | diffusers' inpainting (s) | ours / theirs |",
        "|---|---|---|---|---|",
    ]
    for family in args.families:
        r = res[family]
        lines.append(
            f"| {family} | {r['transformer_params'] / 1e6:.1f} M | {r['median']['ours']:.3f} | "
            f"{r['median']['diffusers_inpaint']:.3f} ({names[family]}) | **{r['ratio']:.3f}x** "
            f"(CPU {r['cpu_ratio']:.3f}x) |"
        )
    write_report(args.out, res, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
