"""Speed on a GPU (issue 43): Blended Latent Diffusion against diffusers' inpainting pipeline of
each family, and against the family's text-to-image pipeline (the blend's overhead), on random
models of the real architectures at their native sizes, in float16.

- ``sd``: Stable Diffusion 1.5's UNet, VAE and CLIP ViT-L text encoder, 512 px;
- ``sdxl``: SDXL's UNet and VAE (no float32 upcast: an fp16-safe VAE, as most users run), its two
  text encoders at full width with 4 layers each, 1024 px;
- ``sd3``: SD3 Medium's transformer (24 layers) and 16-channel VAE, CLIP-L/G at full width with
  4 layers, no T5 (zeros in its place, as SD3 allows), 1024 px;
- ``flux``: FLUX.1-dev's transformer at full width (24 heads of 128) with 5 double and 10 single
  blocks of its 19 and 38 (time and memory), CLIP-L with 4 layers, a 2-layer T5 of 4096, 1024 px;
- ``sd-inpaint``, ``sdxl-inpaint``, ``flux-fill``: the same with the inpainting checkpoints'
  inputs (9-channel UNets, Fill's 384 features) against diffusers' pipelines for them (no
  text-to-image baseline: such a model does not run in one).

Ours and diffusers' share the model, steps, size, guidance and seed and alternate in one process
after a warm-up (the order rotates every round); ratios are medians of same-round ratios
(``speed.py``). Results go to ``--out`` after each family, so a deadline keeps what was done.

    python benchmarks/cuda_speed.py --out DIR [--deadline SECONDS] [--smoke]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).parent))

from speed import PROMPT, paired_ratio, scene  # noqa: E402

from blendedit import BlendedLatentDiffusionPipeline  # noqa: E402
from blendedit.models import quiet_transformers  # noqa: E402
from blendedit.tiny import (  # noqa: E402
    FLUX_SCHEDULER,
    SD_SCHEDULER,
    WORDS,
    _unet_config,
    _vae_config,
    build_tiny_components,
    build_tiny_flux_components,
    build_tiny_sd3_components,
    build_tiny_sdxl_components,
    inpainting_denoiser,
    special_ids,
    t5_encoder,
)
from blendedit.tokenizer import build_clip_tokenizer  # noqa: E402

with quiet_transformers():
    import diffusers

#: kind: (family, diffusers' inpainting pipeline, text-to-image pipeline or None, size, guidance)
KINDS = {
    "sd": ("sd", "StableDiffusionInpaintPipeline", "StableDiffusionPipeline", 512, 7.5),
    "sdxl": ("sdxl", "StableDiffusionXLInpaintPipeline", "StableDiffusionXLPipeline", 1024, 5.0),
    "sd3": ("sd3", "StableDiffusion3InpaintPipeline", "StableDiffusion3Pipeline", 1024, 5.0),
    "flux": ("flux", "FluxInpaintPipeline", "FluxPipeline", 1024, 3.5),
    "sd-inpaint": ("sd", "StableDiffusionInpaintPipeline", None, 512, 7.5),
    "sdxl-inpaint": ("sdxl", "StableDiffusionXLInpaintPipeline", None, 1024, 5.0),
    "flux-fill": ("flux", "FluxFillPipeline", None, 1024, 30.0),
}


def _clip_text(tokenizer, hidden: int, layers: int, heads: int, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        max_position_embeddings=77,
        projection_dim=hidden,
        **special_ids(tokenizer),
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def _vae16(scaling: float, shift: float):
    cfg = dict(_vae_config("sd-shaped", 1, 128), latent_channels=16)
    cfg.update(scaling_factor=scaling, shift_factor=shift)
    return diffusers.AutoencoderKL(**cfg, use_quant_conv=False, use_post_quant_conv=False)


def real_components(family: str) -> dict:
    """Random components of ``family``'s real architecture (see the module's doc)."""
    tok = build_clip_tokenizer(list(WORDS), None)
    if family == "sd":
        return dict(
            unet=diffusers.UNet2DConditionModel(**_unet_config("sd-shaped", 1, 64)),
            vae=diffusers.AutoencoderKL(**_vae_config("sd-shaped", 1, 64)),
            text_encoder=_clip_text(tok, 768, 12, 12),
            tokenizer=tok,
            scheduler=diffusers.DDIMScheduler(**SD_SCHEDULER),
        )
    if family == "sdxl":
        c = build_tiny_sdxl_components("sdxl-shaped", width_div=1, sample_size=128)
        c["vae"] = diffusers.AutoencoderKL.from_config(c["vae"].config, force_upcast=False)
        return c
    if family == "sd3":
        return dict(
            transformer=diffusers.SD3Transformer2DModel(
                sample_size=128,
                patch_size=2,
                in_channels=16,
                out_channels=16,
                num_layers=24,
                attention_head_dim=64,
                num_attention_heads=24,
                joint_attention_dim=4096,
                caption_projection_dim=1536,
                pooled_projection_dim=2048,
                pos_embed_max_size=192,
            ),
            vae=_vae16(1.5305, 0.0609),
            text_encoder=_clip_text(tok, 768, 4, 12, projection=True),
            tokenizer=tok,
            text_encoder_2=_clip_text(tok, 1280, 4, 20, projection=True),
            tokenizer_2=tok,
            text_encoder_3=None,
            tokenizer_3=None,
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        )
    from blendedit.tokenizer import build_t5_like_tokenizer

    t5_tok = build_t5_like_tokenizer(list(WORDS))
    return dict(
        transformer=diffusers.FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=5,
            num_single_layers=10,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        ),
        vae=_vae16(0.3611, 0.1159),
        text_encoder=_clip_text(tok, 768, 4, 12),
        tokenizer=tok,
        text_encoder_2=t5_encoder(t5_tok, width=4096, head_dim=128, ff=4096, heads=32),
        tokenizer_2=t5_tok,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
    )


def tiny_components(family: str) -> dict:
    """The tiny models of ``blendedit.tiny`` (``--smoke``: the script's own check on a CPU)."""
    if family == "sd":
        c = build_tiny_components("tiny")
        return {k: v for k, v in c.items() if not k.startswith("ranker")}
    if family == "sdxl":
        return build_tiny_sdxl_components()
    if family == "sd3":
        return build_tiny_sd3_components()
    return build_tiny_flux_components()


def pipelines(kind: str, device: str, dtype, smoke: bool) -> tuple[dict, int]:
    """{name: pipeline} for ``kind`` (ours, diffusers' inpainting, text-to-image), on ``device``
    in ``dtype``, and the denoiser's parameters."""
    family, inpaint_cls, t2i_cls, _, _ = KINDS[kind]
    torch.manual_seed(0)
    with torch.device(device):  # random weights drawn where they will run
        c = tiny_components(family) if smoke else real_components(family)
        key = "transformer" if "transformer" in c else "unet"
        if kind.endswith(("-inpaint", "-fill")):
            c[key] = inpainting_denoiser(c[key])
    for v in c.values():
        if isinstance(v, torch.nn.Module):
            v.to(device=device, dtype=dtype).eval()
    extra = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    extra = extra if family == "sd" else {}

    def theirs(cls_name):
        sched = c["scheduler"]
        fresh = type(sched).from_config(sched.config)
        parts = dict(c, scheduler=fresh, vae=copy.deepcopy(c["vae"]))
        p = getattr(diffusers, cls_name)(**parts, **extra)
        p.set_progress_bar_config(disable=True)
        return p

    names = ("text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
    sched = c["scheduler"]
    ours = BlendedLatentDiffusionPipeline(
        c[key],
        copy.deepcopy(c["vae"]),
        c["text_encoder"],
        c["tokenizer"],
        type(sched).from_config(sched.config),
        family=family,
        **{k: c[k] for k in names if c.get(k) is not None},
    )
    pipes = {"ours": ours, "diffusers_inpaint": theirs(inpaint_cls)}
    if t2i_cls:
        pipes["diffusers_t2i"] = theirs(t2i_cls)
    return pipes, sum(p.numel() for p in c[key].parameters())


def runs(pipes: dict, size: int, steps: int, guidance: float) -> dict:
    image, mask = scene(size, size * 3 // 8)
    common = dict(num_inference_steps=steps, guidance_scale=guidance)
    hw = dict(height=size, width=size)

    def g():
        return torch.Generator().manual_seed(0)

    out = {
        "ours": lambda: pipes["ours"](
            PROMPT, image, mask, crop_to_mask=False, generator=g(), **common
        ),
        "diffusers_inpaint": lambda: pipes["diffusers_inpaint"](
            PROMPT, image=image, mask_image=mask, strength=1.0, generator=g(), **hw, **common
        ),
    }
    if "diffusers_t2i" in pipes:
        out["diffusers_t2i"] = lambda: pipes["diffusers_t2i"](PROMPT, generator=g(), **hw, **common)
    return out


def timed(fn, device: str) -> float:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def measure(kind: str, device: str, dtype, steps: int, seconds: float, smoke: bool, log) -> dict:
    """One kind: build, warm up each run, then alternating rounds while ``seconds`` last
    (at least 2, at most 9)."""
    t0 = time.perf_counter()
    pipes, params = pipelines(kind, device, dtype, smoke)
    size = 64 if smoke else KINDS[kind][3]
    fns = runs(pipes, size, steps, KINDS[kind][4])
    build = time.perf_counter() - t0
    warm = {n: timed(f, device) for n, f in fns.items()}
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    per_round = sum(warm.values())
    rounds = 1 if smoke else 9
    for r in range(rounds):
        left = seconds - (time.perf_counter() - t0)
        if r >= (1 if smoke else 2) and left < 1.2 * per_round:
            break
        for n in names[r % len(names) :] + names[: r % len(names)]:
            times[n].append(timed(fns[n], device))
        per_round = sum(times[n][-1] for n in names)
        log(f"  {kind} round {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names))
    res = dict(
        size=size,
        steps=steps,
        denoiser_params=params,
        build_s=round(build, 1),
        warmup_s={n: round(v, 3) for n, v in warm.items()},
        times=times,
        median={n: statistics.median(v) for n, v in times.items()},
        rounds=len(times["ours"]),
        vs_inpaint=paired_ratio(times, "ours", "diffusers_inpaint"),
    )
    if "diffusers_t2i" in times:
        res["overhead_vs_t2i"] = paired_ratio(times, "ours", "diffusers_t2i") - 1
    if device.startswith("cuda"):
        res["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del pipes, fns
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return res


def report(res: dict) -> str:
    lines = [
        f"CUDA speed on {res['device']} ({res['dtype']}, {res['steps']} steps, one sample, "
        "random models of the real architectures; see benchmarks/cuda_speed.py)",
        "",
        "| kind | px | denoiser | ours (s) | diffusers' inpainting (s) | ours / theirs | "
        "text-to-image (s) | blend overhead | rounds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, r in res["kinds"].items():
        if "skipped" in r or "error" in r:
            lines.append(f"| {kind} | {r.get('skipped') or r.get('error')} |||||||| ")
            continue
        m = r["median"]
        t2i = f"{m['diffusers_t2i']:.3f}" if "diffusers_t2i" in m else "-"
        over = f"{100 * r['overhead_vs_t2i']:+.1f} %" if "overhead_vs_t2i" in r else "-"
        lines.append(
            f"| {kind} | {r['size']} | {r['denoiser_params'] / 1e9:.2f} B | {m['ours']:.3f} | "
            f"{m['diffusers_inpaint']:.3f} | **{r['vs_inpaint']:.3f}x** | {t2i} | {over} | "
            f"{r['rounds']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--deadline", type=float, default=240, help="seconds for every kind")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    p.add_argument("--smoke", action="store_true", help="tiny models, 2 steps, one round (CPU)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    steps = 2 if args.smoke else args.steps
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    res = dict(device=name, dtype=str(dtype).split(".")[-1], steps=steps, kinds={})
    res["versions"] = dict(torch=torch.__version__, diffusers=diffusers.__version__)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if device == "cpu" and not args.smoke:
        log("cuda_speed: no CUDA here; every kind skipped (--smoke checks the script on a CPU)")
    for i, kind in enumerate(args.kinds):
        left = args.deadline - (time.perf_counter() - start)
        share = left / (len(args.kinds) - i)
        if device == "cpu" and not args.smoke:
            res["kinds"][kind] = dict(skipped="no CUDA")
        elif left < 20 and not args.smoke:
            res["kinds"][kind] = dict(skipped=f"out of time ({left:.0f} s left)")
        else:
            log(f"{kind}: {share:.0f} s")
            try:
                res["kinds"][kind] = measure(kind, device, dtype, steps, share, args.smoke, log)
            except Exception as e:  # noqa: BLE001  (one kind's failure must not cost the rest)
                res["kinds"][kind] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
                log(f"{kind}: {res['kinds'][kind]['error']}")
                if device == "cuda":
                    torch.cuda.empty_cache()
        res["wall_s"] = round(time.perf_counter() - start, 1)
        (out / "speed.json").write_text(json.dumps(res, indent=1))
        (out / "speed.md").write_text(report(res))
    print(report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
