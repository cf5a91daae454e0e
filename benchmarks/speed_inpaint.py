"""Speed of a Blended Latent Diffusion edit on inpainting checkpoints (issue 39), side by side
with diffusers' own inpainting pipeline of the same checkpoint: StableDiffusionInpaintPipeline
(SD, 9-channel UNet), StableDiffusionXLInpaintPipeline (SDXL, 9-channel UNet) and
FluxFillPipeline (Flux Fill, 384 input features).

Random models of the families' shapes (``blendedit.tiny``'s ``sd-shaped`` and ``sdxl-shaped``
presets, and the tiny Flux with a wider, deeper transformer as in ``speed_flow.py``), each
denoiser given an inpainting checkpoint's inputs (``blendedit.tiny.inpainting_denoiser``).
Ours and diffusers' get the same weights (each pipeline its own copy, as each tool loads the
checkpoint: ours keeps a UNet's weights channels-last on the CPU, diffusers' as loaded), steps,
size, guidance and seed, and alternate in one process (the order rotates every round); the
ratio is the median of same-round ratios (``speed.py``). Ours blends after every step on top of
the model's own conditioning; theirs does not. ``--channels-last-theirs`` adds diffusers'
pipeline with its UNet put in channels-last layout by hand (what that layout alone is worth).

    python benchmarks/speed_inpaint.py [--quick] [--out benchmarks/results/speed_inpaint]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

from blendedit import BlendedLatentDiffusionPipeline
from blendedit.models import quiet_transformers
from blendedit.sharing import edit_cache, twin_rows
from blendedit.tiny import (
    build_tiny_components,
    build_tiny_flux_components,
    build_tiny_sdxl_components,
    inpainting_denoiser,
)

sys.path.insert(0, str(Path(__file__).parent))
from speed import alternate, machine, paired_ratio, scene, write_report  # noqa: E402
from speed_flow import pair  # noqa: E402  (the two runs of one model, from the same seed)

with quiet_transformers():
    import diffusers

CL = "diffusers_inpaint_channels_last"  # diffusers' pipeline, its UNet made channels-last
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


def pipelines(kind: str, size: int, layers: int, heads: int, channels_last: bool = False):
    """(ours, diffusers' pipeline, its denoiser, and with ``channels_last`` diffusers' pipeline
    over another copy whose UNet is channels-last, else None): each its own copy of one model."""
    family, cls, _ = KINDS[kind]
    c = components(kind, size, layers, heads)
    theirs_cl = None
    if channels_last and family != "flux":
        cl = copy.deepcopy(c)
        cl["unet"].to(memory_format=torch.channels_last)
        theirs_cl = getattr(diffusers, cls)(**cl)
        theirs_cl.set_progress_bar_config(disable=True)
    theirs = getattr(diffusers, cls)(**c)
    theirs.set_progress_bar_config(disable=True)
    c = copy.deepcopy(c)  # ours: its own copy of the weights
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
    return ours, theirs, c.get("unet") or c["transformer"], theirs_cl


def _denoiser(pipe):
    return getattr(pipe, "unet", None) or pipe.transformer


def decompose(runs: dict, pipes: dict, rounds: int, log) -> dict:
    """A noise-robust account of the same comparison, in two parts each alternated finely:
    the work outside the denoiser (every edit with its denoiser's forward a stub that returns
    zeros, ``5 x rounds`` alternating rounds of these short edits) and one denoiser call (each
    pipeline's own copy with the inputs it gave in a real edit, ``3 x rounds`` alternating
    pairs of calls, each as in a guided edit: blendedit.sharing's scopes set, which only ours'
    UNets heed). Ours' first call of an edit projects the text to its cross-attention keys
    and values, the later ones reuse them (blendedit.sharing): both are timed, the first in
    a fresh cache, the others in one kept across calls. Returns their medians, the calls per
    edit, and the edit's ratio they predict: (calls x call + outside) of ours over the same of
    theirs, ours' calls taken as theirs' x the median of same-pair ratios (steadier than two
    medians' ratio)."""
    seen: dict = {}
    hooks = []
    for name, pipe in pipes.items():

        def record(module, args, kwargs, name=name):
            seen.setdefault(name, []).append((args, kwargs))

        hooks.append(_denoiser(pipe).register_forward_pre_hook(record, with_kwargs=True))
    with torch.inference_mode():
        for name in pipes:
            runs[name]()
    for h in hooks:
        h.remove()
    calls = {name: len(v) for name, v in seen.items()}

    a, b = list(pipes)
    kept: dict = {}  # ours' keys and values, kept from call to call as within an edit

    def call(name, cache=None):
        args, kwargs = seen[name][len(seen[name]) // 2]

        def run():
            with edit_cache({} if cache is None else cache), twin_rows():
                return _denoiser(pipes[name])(*args, **kwargs)  # as in the guided edit

        return run

    first = f"{a} (first call)"
    with torch.inference_mode():
        call_times, _ = alternate(
            {a: call(a, kept), first: call(a), b: call(b)}, 3 * rounds, lambda m: None
        )
    for pipe in pipes.values():
        model = _denoiser(pipe)
        out_ch = model.config.out_channels or model.config.in_channels

        def stub(*args, out_ch=out_ch, **kwargs):
            x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
            shape = (*x.shape[:-1], out_ch) if x.ndim == 3 else (len(x), out_ch, *x.shape[2:])
            return (x.new_zeros(shape),)

        model.forward = stub  # an instance attribute: the class's forward is untouched
    try:
        outside, _ = alternate(runs, 5 * rounds, lambda m: None)
    finally:
        for pipe in pipes.values():
            del _denoiser(pipe).forward
    med = {
        k: {n: statistics.median(v) for n, v in d.items()}
        for k, d in (("call", call_times), ("outside", outside))
    }
    call_ratio = paired_ratio(call_times, a, b)  # ours' call over theirs', pair by pair
    first_ratio = paired_ratio(call_times, first, b)
    theirs = calls[b] * med["call"][b]
    ours = med["call"][b] * ((calls[a] - 1) * call_ratio + first_ratio)  # theirs' x the ratios
    log(f"  parts: calls {calls}, call {med['call']}, outside {med['outside']}")
    return dict(
        calls=calls,
        call_s=med["call"],
        call_ratio=call_ratio,
        first_call_ratio=first_ratio,
        outside_s=med["outside"],
        predicted_ratio=(ours + med["outside"][a]) / (theirs + med["outside"][b]),
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="fewer rounds and steps")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--layers", type=int, default=6, help="Flux Fill's transformer blocks")
    p.add_argument("--heads", type=int, default=6, help="Flux Fill's attention heads (x 32)")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 9)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    p.add_argument(
        "--channels-last-theirs",
        action="store_true",
        help="also time diffusers' pipeline with its UNet channels-last by hand (UNet kinds)",
    )
    p.add_argument(
        "--parts",
        action="store_true",
        help="also time the work outside the denoiser and one denoiser call, each alternated "
        "finely (robust where whole edits scatter)",
    )
    p.add_argument("--out", default="benchmarks/results/speed_inpaint")
    args = p.parse_args(argv)
    steps, rounds = (6, 3) if args.quick else (args.steps, args.rounds or 9)
    t_all = time.time()
    image, mask = scene(args.size, args.size * 3 // 8)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    size = dict(height=args.size, width=args.size)
    res = dict(size=args.size, steps=steps, rounds=rounds, kinds={})
    for kind in args.kinds:
        built = pipelines(kind, args.size, args.layers, args.heads, args.channels_last_theirs)
        ours, theirs, denoiser, theirs_cl = built
        common = dict(num_inference_steps=steps, guidance_scale=KINDS[kind][2])
        runs = pair(ours, theirs, image, mask, common, size)
        if theirs_cl is not None:
            runs[CL] = pair(ours, theirs_cl, image, mask, common, size)["diffusers_inpaint"]
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
        if CL in times:
            res["kinds"][kind]["ratio_cl"] = paired_ratio(times, "ours", CL)
        if args.parts:
            pipes = {"ours": ours, "diffusers_inpaint": theirs}
            both = {n: runs[n] for n in pipes}
            res["kinds"][kind]["parts"] = decompose(both, pipes, rounds, log)
    res["machine"] = machine()
    res["wall_seconds"] = round(time.time() - t_all, 1)
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
    cl = {k: r["ratio_cl"] for k, r in res["kinds"].items() if "ratio_cl" in r}
    if cl:
        lines += ["", "Against diffusers' pipeline with its UNet made channels-last by hand:", ""]
        lines += [
            f"- {k}: {res['kinds'][k]['median'][CL]:.3f} s; ours / it **{v:.3f}x**"
            for k, v in cl.items()
        ]
    parts = {k: r["parts"] for k, r in res["kinds"].items() if "parts" in r}
    if parts:
        lines += [
            "",
            "In parts, each alternated finely (`--parts`): the work outside the denoiser (its "
            f"forward a stub; {5 * rounds} rounds) and one denoiser call (each pipeline's own "
            f"copy and inputs; {3 * rounds} pairs; ours' first call of an edit, which projects "
            "the cross-attention keys and values the later calls reuse, timed apart), and the "
            "edit's ratio they predict:",
            "",
            "| kind | calls per edit | one later call, ours / theirs (ms) | call ratio, first / "
            "later | "
            "outside the denoiser, ours / theirs (s) | predicted ours / theirs |",
            "|---|---|---|---|---|---|",
        ]
        for k, q in parts.items():
            c, o = q["call_s"], q["outside_s"]
            lines.append(
                f"| {k} | {q['calls']['ours']} / {q['calls']['diffusers_inpaint']} | "
                f"{1000 * c['ours']:.1f} / {1000 * c['diffusers_inpaint']:.1f} | "
                f"{q['first_call_ratio']:.3f}x / {q['call_ratio']:.3f}x | "
                f"{o['ours']:.3f} / {o['diffusers_inpaint']:.3f} | "
                f"**{q['predicted_ratio']:.3f}x** |"
            )
    write_report(args.out, res, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
