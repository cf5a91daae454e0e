"""Speed of a Blended Latent Diffusion edit on inpainting checkpoints (issue 39), side by side
with diffusers' own inpainting pipeline of the same checkpoint: StableDiffusionInpaintPipeline
(SD, 9-channel UNet), StableDiffusionXLInpaintPipeline (SDXL, 9-channel UNet) and
FluxFillPipeline (Flux Fill, 384 input features).

Random models of the families' shapes (``blendedit.tiny``'s ``sd-shaped`` and ``sdxl-shaped``
presets, and the tiny Flux with a wider, deeper transformer as in ``speed_flow.py``), each
denoiser given an inpainting checkpoint's inputs (``blendedit.tiny.inpainting_denoiser``).
Ours and diffusers' share the model, steps, size, guidance and seed and alternate in one process
(the order rotates every round); the ratio is the median of same-round ratios (``speed.py``).
Ours blends after every step on top of the model's own conditioning; theirs does not.

    python benchmarks/speed_inpaint.py [--quick] [--out benchmarks/results/speed_inpaint]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from blendedit import BlendedLatentDiffusionPipeline
from blendedit.io import save_json
from blendedit.models import quiet_transformers
from blendedit.tiny import (
    build_tiny_components,
    build_tiny_flux_components,
    build_tiny_sdxl_components,
    inpainting_denoiser,
)

sys.path.insert(0, str(Path(__file__).parent))
from speed import alternate, paired_ratio, scene  # noqa: E402
from speed_flow import pair  # noqa: E402  (the two runs of one model, from the same seed)

with quiet_transformers():
    import diffusers

KINDS = {  # kind: (family, diffusers' inpainting pipeline, guidance)
    "sd-inpaint": ("sd", "StableDiffusionInpaintPipeline", 7.5),
    "sdxl-inpaint": ("sdxl", "StableDiffusionXLInpaintPipeline", 5.0),
    "flux-fill": ("flux", "FluxFillPipeline", 30.0),
}


def components(kind: str, size: int, layers: int, heads: int) -> dict:
    family = KINDS[kind][0]
    if family == "sd":
        c = build_tiny_components("sd-shaped", sample_size=size // 8)
        c = {k: v for k, v in c.items() if not k.startswith("ranker")}
        c.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    elif family == "sdxl":
        c = build_tiny_sdxl_components("sdxl-shaped", sample_size=size // 8)
    else:
        c = build_tiny_flux_components(guidance_embeds=True)
        torch.manual_seed(0)
        c["transformer"] = diffusers.FluxTransformer2DModel(
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
        )
    key = "transformer" if family == "flux" else "unet"
    torch.manual_seed(1)
    c[key] = inpainting_denoiser(c[key])
    return c


def pipelines(kind: str, size: int, layers: int, heads: int):
    family, cls, _ = KINDS[kind]
    c = components(kind, size, layers, heads)
    theirs = getattr(diffusers, cls)(**c)
    theirs.set_progress_bar_config(disable=True)
    names = ("text_encoder_2", "tokenizer_2")
    sched = c["scheduler"]
    ours = BlendedLatentDiffusionPipeline(
        c.get("unet") or c["transformer"],
        c["vae"],
        c["text_encoder"],
        c["tokenizer"],
        type(sched).from_config(sched.config),  # its own copy
        family=family,
        **{k: c[k] for k in names if k in c},
    )
    assert ours.inpaint is not None
    return ours, theirs, c.get("unet") or c["transformer"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="fewer rounds and steps")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--layers", type=int, default=6, help="Flux Fill's transformer blocks")
    p.add_argument("--heads", type=int, default=6, help="Flux Fill's attention heads (x 32)")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 9)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    p.add_argument("--out", default="benchmarks/results/speed_inpaint")
    args = p.parse_args(argv)
    steps, rounds = (6, 3) if args.quick else (args.steps, args.rounds or 9)
    t_all = time.time()
    image, mask = scene(args.size, args.size * 3 // 8)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    size = dict(height=args.size, width=args.size)
    res = dict(size=args.size, steps=steps, rounds=rounds, kinds={})
    for kind in args.kinds:
        ours, theirs, denoiser = pipelines(kind, args.size, args.layers, args.heads)
        common = dict(num_inference_steps=steps, guidance_scale=KINDS[kind][2])
        runs = pair(ours, theirs, image, mask, common, size)
        log(f"{kind}: {args.size}px, {steps} steps, {rounds} rounds")
        times, cpu = alternate(runs, rounds, log)
        res["kinds"][kind] = dict(
            denoiser_params=sum(q.numel() for q in denoiser.parameters()),
            times=times,
            median={k: statistics.median(v) for k, v in times.items()},
            ratio=paired_ratio(times, "ours", "diffusers_inpaint"),
            cpu_ratio=paired_ratio(cpu, "ours", "diffusers_inpaint"),
            faster_rounds=sum(a < b for a, b in zip(times["ours"], times["diffusers_inpaint"])),
        )
    res["machine"] = (
        f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    res["wall_seconds"] = round(time.time() - t_all, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_json(res, out / "results.json")
    cmd = " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Speed on inpainting checkpoints (issue 39)",
        "",
        f"`python benchmarks/speed_inpaint.py {cmd}`: {args.size} px, {steps} steps, one sample, "
        f"random models of each kind, {rounds} alternating rounds on {res['machine']}; "
        f"{res['wall_seconds']} s in all. Ours blends after every step on top of the model's "
        "own conditioning; diffusers' pipeline does not blend.",
        "",
        "| kind | denoiser | ours (s) | diffusers' (s) | ours / theirs | rounds ours faster |",
        "|---|---|---|---|---|---|",
    ]
    for kind, r in res["kinds"].items():
        lines.append(
            f"| {kind} | {r['denoiser_params'] / 1e6:.1f} M | {r['median']['ours']:.3f} | "
            f"{r['median']['diffusers_inpaint']:.3f} ({KINDS[kind][1]}) | **{r['ratio']:.3f}x** "
            f"(CPU {r['cpu_ratio']:.3f}x) | {r['faster_rounds']} of {rounds} |"
        )
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
