"""Command-line interface: parse, call the library, write outputs. No editing logic lives here."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from . import __version__
from .demo import DEMO_PROMPT
from .io import DEFAULT_MAX_PIXELS, check_output_folder
from .latent import BACKGROUND_OPTIONS, SCHEDULERS, LatentEditOptions, options_fields
from .runner import (
    DEFAULT_MODEL,
    DEFAULT_RANK_MODEL,
    EditRequest,
    ModelSpec,
    option_from_text,
)

SHORT_FLAGS = {"num_inference_steps": ["--steps"], "num_images_per_prompt": ["-n"]}


#: Exit codes (docs/errors.md): argparse's usage errors are 2 as well.
EXIT_OK, EXIT_BUG, EXIT_INPUT, EXIT_MODEL, EXIT_OUTPUT, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130


def _flag_type(name: str, default):
    """The argparse type of an option's flag: :func:`option_from_text`, its error argparse's."""

    def parse(s: str):
        try:
            return option_from_text(name, s, default)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None

    return parse


def _shown(default) -> str:
    """An option's default in its flag's help: None (the help says what then) as "unset"."""
    return "unset" if default is None else str(default)


def _add_option_flags(p: argparse.ArgumentParser, only=None) -> None:
    """One flag per option of either method (:class:`LatentEditOptions`,
    :class:`PixelEditOptions`), with the default and help of each. Flags default to None: an
    option not given takes its method's default; one of the other method is an error.
    ``only``: just these options."""
    from .pixel import PixelEditOptions

    keep = (lambda n: n in only) if only is not None else (lambda n: True)
    latent = {n: (d, h, c) for n, d, h, c in options_fields() if keep(n)}
    pixel = {n: (d, h, c) for n, d, h, c in options_fields(PixelEditOptions) if keep(n)}
    groups = [
        ("edit options (--method latent; those marked 'both' also --method pixel)", latent),
        (
            "pixel method options (--method pixel)",
            {k: v for k, v in pixel.items() if k not in latent},
        ),
    ]
    for title, table in groups:
        g = p.add_argument_group(title)
        for name, (default, help, choices) in table.items():
            if name in latent and name in pixel:
                ld, pd = latent[name][0], pixel[name][0]
                shown = _shown(ld) if ld == pd else f"{_shown(ld)} latent, {_shown(pd)} pixel"
                help = f"both: {help}"
            else:
                shown = _shown(default)
            g.add_argument(
                *[f"--{name.replace('_', '-')}", *SHORT_FLAGS.get(name, [])],
                dest=name,
                type=_flag_type(name, default),
                default=None,
                choices=choices,
                help=f"{help} (default: {shown})",
            )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="blendedit", description="Text-driven local image editing (Blended Latent Diffusion)."
    )
    p.add_argument("--version", action="version", version=f"blendedit {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser(
        "edit",
        help="edit the masked region of an image to match a prompt",
        description="Edit IMAGE inside MASK to match TEXT; writes the ranked "
        "results, a JSON sidecar and a contact sheet to --out.",
    )
    e.add_argument("image", help="image to edit (any format PIL reads; never modified)")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--mask", help="mask image: white = edit, black = keep")
    src.add_argument(
        "--mask-from-alpha",
        action="store_true",
        help="edit where IMAGE is transparent (its alpha channel is the mask)",
    )
    e.add_argument("--prompt", required=True, help="what the masked region should show")
    _add_common(e)

    d = sub.add_parser(
        "demo",
        help="edit a built-in example scene (offline)",
        description="Render an example scene and mask, then edit it with the "
        "built-in model; writes the same outputs as `edit`.",
    )
    d.add_argument("--prompt", default=DEMO_PROMPT, help=f"prompt (default: {DEMO_PROMPT})")
    _add_common(
        d,
        default_model="toy",
        default_out="blendedit-out/demo",
        default_steps=20,
        default_n=4,
        default_seed=0,
    )
    r = sub.add_parser(
        "reconstruct",
        help="redo the background step of an earlier edit from its saved latents",
        description="Decode the latents an earlier `edit` saved (SIDECAR's latents file) and "
        "reconstruct the background again with other options (e.g. --background decoder), "
        "without sampling again; writes results named STEM-BACKGROUND-* like `edit` does.",
    )
    r.add_argument("sidecar", help="the JSON sidecar of the earlier edit")
    r.add_argument(
        "--image", default=None, help="the edit's source image (default: the sidecar's path)"
    )
    r.add_argument("--out", default=None, help="output folder (default: the sidecar's folder)")
    r.add_argument("--model", default=None, help="model (default: the one the sidecar records)")
    _add_device_flags(r)
    r.add_argument("--quiet", action="store_true", help="print nothing but the written paths")
    _add_option_flags(r, only=BACKGROUND_OPTIONS)
    b = sub.add_parser(
        "batch",
        help="edit every row of a manifest (JSONL or CSV), crash-safe, optionally on Ray",
        description="Edit every row of MANIFEST (JSONL or CSV: image, mask, prompt, optional "
        "seed and per-row options) into --out/rows/, skipping rows a previous run finished; "
        "writes --out/summary.jsonl and summary.csv. The flags below are the rows' defaults.",
    )
    b.add_argument("manifest", help="JSONL or CSV file, a row per edit (docs/usage.md, Batch)")
    b.add_argument(
        "--workers",
        type=int,
        default=1,
        help="parallel workers; more than 1 needs --ray (default: 1)",
    )
    b.add_argument(
        "--ray", action="store_true", help="run rows on Ray actors (pip install 'blendedit[ray]')"
    )
    b.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per worker (default: cores / workers on Ray, else torch's choice)",
    )
    b.add_argument(
        "--ray-address",
        default=None,
        help="address of a running Ray cluster (default: start a local one)",
    )
    _add_common(b, default_out="blendedit-batch")
    w = sub.add_parser(
        "serve",
        help="the web UI: paint a mask, type a prompt, get ranked edits",
        description="Launch the web UI (Gradio) on one shared model. Binds to 127.0.0.1 "
        "unless --host says otherwise.",
    )
    w.add_argument(
        "--model",
        default="toy",
        help="built-in name, diffusers folder, checkpoint file or hub id (default: toy)",
    )
    _add_model_parts(w)
    w.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    w.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    w.add_argument("--out", default=None, help="where edits are kept (default: a temporary folder)")
    w.add_argument(
        "--max-file-size", default="50mb", help="largest upload accepted (default: 50mb)"
    )
    w.add_argument("--device", default="auto", help="cpu, cuda, ... (default: auto)")
    w.add_argument(
        "--pixel-model",
        default=None,
        help="a pixel model (DDPMPipeline folder) for the pixel method, with --rank-model as "
        "its CLIP (default: the built-in model's own, if --model is built in)",
    )
    w.add_argument(
        "--rank-model", default="auto", help="CLIP for ranking and pixel guidance (default: auto)"
    )
    q = sub.add_parser(
        "bench",
        help="judge every method and baseline on seeded Shapes World edits; write a report",
        description="Run every method and baseline on the same seeded Shapes World edit tasks "
        "(the shipped model, the same steps, seeds and samples), score them with the pixel "
        "judge and write report.md, results.json and plots to --out.",
    )
    q.add_argument("--model", default="toy", help="built-in name or pipeline folder (default: toy)")
    q.add_argument("--pixel-model", default=None, help="pixel model for the pixel method")
    q.add_argument(
        "--inpaint-model",
        default=None,
        help="an inpainting checkpoint to run beside --model, with our blend and in diffusers' "
        "inpainting pipeline (default: toy-inpaint for the toy model, where it is shipped)",
    )
    q.add_argument(
        "--rank-model", default=None, help="CLIP folder (built-in models bring their own)"
    )
    _add_lora(q, embedding=False)
    q.add_argument("--quick", action="store_true", help="30 tasks, 20 steps, 5 methods")
    q.add_argument("--tasks", type=int, default=None, help="number of tasks (default: 120)")
    q.add_argument(
        "--kinds",
        nargs="+",
        default=None,
        help="task kinds: replace, add, small (default: all three in turn; e.g. `--kinds small` "
        "for the small-mask study)",
    )
    q.add_argument("--steps", type=int, default=None, help="denoising steps (default: 25)")
    q.add_argument("--samples", type=int, default=4, help="samples per edit (default: 4)")
    q.add_argument(
        "--guidance-scale",
        type=float,
        default=5.0,
        help="classifier-free guidance of every method (default: 5)",
    )
    q.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the task suite and the samples (default: 0); another seed is another, "
        "independent set of tasks",
    )
    q.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="methods to run (default: all but the 'ours k=N' that the default shrinking is)",
    )
    q.add_argument(
        "--out", default="blendedit-bench", help="report folder (default: blendedit-bench)"
    )
    q.add_argument("--label", default="", help="a line for the report (what model this is)")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    sub.add_parser(
        "train-toy",
        help="train the shipped Shapes World models (`blendedit train-toy --help`)",
        add_help=False,
    )
    return p


def _add_model_parts(p: argparse.ArgumentParser) -> None:
    """--config, --vae and --refiner: what completes or replaces parts of --model."""
    p.add_argument(
        "--config",
        help="for a single-file --model: diffusers folder or hub id giving its architecture "
        "(SD, SDXL: needed offline; SD3, Flux: always, for the VAE, text encoders, scheduler)",
    )
    p.add_argument(
        "--vae",
        help="latent method: another VAE (AutoencoderKL folder or hub id) in place of the "
        "model's, e.g. an fp16-safe SDXL VAE; its latents must be the model's",
    )
    p.add_argument(
        "--refiner",
        help="latent method, SDXL: a refiner (diffusers folder or hub id) whose UNet runs the "
        "last --refiner-fraction of the steps (the web UI: the default 0.2)",
    )
    _add_lora(p)


def _add_lora(p: argparse.ArgumentParser, embedding: bool = True) -> None:
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="latent method: a LoRA (diffusers' or the A1111 / kohya-ss layout; or a hub "
        "repository in the local cache) fused in at SCALE (default 1); repeat to stack",
    )
    if not embedding:  # bench: its prompts are Shapes World's
        return
    p.add_argument(
        "--embedding",
        action="append",
        default=[],
        metavar="FILE[:TOKEN]",
        help="SD and SDXL: a textual inversion (A1111 .pt / .safetensors or diffusers' "
        "learned_embeds) that TOKEN (default: its own, or the file's name) stands for in prompts",
    )


def _add_common(
    p,
    default_model=DEFAULT_MODEL,
    default_out="blendedit-out",
    default_steps=None,
    default_n=None,
    default_seed=None,
) -> None:
    p.add_argument(
        "--model",
        default=default_model,
        help="built-in name, diffusers folder, .safetensors/.ckpt file or hub id "
        f"(default: {default_model})",
    )
    p.add_argument(
        "--method",
        default="latent",
        choices=("latent", "pixel"),
        help="latent: Blended Latent Diffusion (a Stable Diffusion model); pixel: Blended "
        "Diffusion (a pixel-space UNet2DModel guided by CLIP, --rank-model) (default: latent)",
    )
    _add_model_parts(p)
    p.add_argument(
        "--scheduler",
        default="ddim",
        choices=SCHEDULERS,
        help="sampler of SD and SDXL models; SD3 and Flux keep their own (default: ddim)",
    )
    p.add_argument(
        "--rank-model",
        default="auto",
        help="CLIP folder or hub id that ranks the results; 'none' turns ranking off; "
        f"'auto': the model's own CLIP for built-ins, else {DEFAULT_RANK_MODEL} when "
        "-n > 1 (default: auto)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=default_seed,
        help="seed of sample 1; sample i uses seed + i - 1 "
        "(default: random, recorded in the sidecar)",
    )
    p.add_argument("--out", default=default_out, help=f"output folder (default: {default_out})")
    p.add_argument(
        "--resize-mask",
        action="store_true",
        help="resize a mask whose size differs from the image's (else an error)",
    )
    p.add_argument(
        "--mask-threshold",
        type=float,
        default=0.5,
        help="soft masks: pixels >= this are edited (default: 0.5)",
    )
    p.add_argument("--invert-mask", action="store_true", help="black = edit instead of white")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="refuse larger images and masks (decompression bombs) "
        f"(default: {DEFAULT_MAX_PIXELS:,})",
    )
    _add_device_flags(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_option_flags(p)
    if default_steps is not None:
        p.set_defaults(num_inference_steps=default_steps, num_images_per_prompt=default_n)


def _add_device_flags(p) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "float16", "bfloat16"),
        help="weights' precision (default: float16 on GPU, float32 on CPU)",
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train-toy"]:  # its own parser (blendedit.toy.train)
        from .toy.train import main as train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    from .io import OutputError
    from .models import ModelNotFoundError

    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "serve":
            from .webui import serve

            spec = ModelSpec(
                model=args.model,
                config=args.config,
                vae=args.vae,
                refiner=args.refiner,
                rank_model=args.rank_model,
                device=args.device,
                loras=tuple(args.lora),
                embeddings=tuple(args.embedding),
            )
            serve(
                spec,
                args.host,
                args.port,
                out=args.out,
                max_file_size=args.max_file_size,
                pixel_model=args.pixel_model,
            )
            return 0
        if args.command == "bench":
            return _bench(args)
        if args.command == "reconstruct":
            return _reconstruct(args)
        if args.command == "batch":
            from .batch import main_batch

            return main_batch(args, model_spec(args), edit_request(args))
        return _edit(args)
    except KeyboardInterrupt:
        print("blendedit: interrupted; nothing more was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError) as e:
        code = EXIT_INPUT
        if isinstance(e, ModelNotFoundError):
            code = EXIT_MODEL
        elif isinstance(e, OutputError):
            code = EXIT_OUTPUT
        msg = " ".join(str(e).split())
        print(f"blendedit: error: {msg}", file=sys.stderr)
        return code


def _demo(args) -> int:
    from . import models
    from .demo import write_example
    from .io import load_image, load_mask
    from .toy.judge import judge, parse_prompt

    out = Path(args.out)
    image_path, mask_path = write_example(out / "inputs")
    args.image, args.mask, args.mask_from_alpha = str(image_path), str(mask_path), False
    if args.model == "toy" and not models.toy_shipped():
        print(
            "blendedit demo: the shipped Shapes World model is not in this checkout yet (it is "
            "being trained: `blendedit train-toy`, see docs/models.md); running on 'tiny-random'.",
            file=sys.stderr,
        )
        args.model = "tiny-random"
    if args.model == "tiny-random":
        print(
            "blendedit demo: 'tiny-random' has untrained weights: the edit is noise inside the "
            "mask, the background is kept.",
            file=sys.stderr,
        )
    written = _run_edit(args)
    try:
        parse_prompt(args.prompt)
    except ValueError:
        return 0  # not a Shapes World prompt: nothing for the judge to read
    source = load_image(image_path)
    mask = load_mask(mask_path, image=source)
    best = written[0]
    v = judge(load_image(best), mask, args.prompt, source=source)
    found = "finds" if v.success else "does not find"
    print(
        f"judge: {found} {args.prompt!r} in the mask of {best.name} ({v.reason}); outside the "
        f"mask: PSNR {v.psnr_outside:.1f} dB, max error {v.max_err_outside:.0f}/255",
        file=sys.stderr,
    )
    return 0


def _reconstruct(args) -> int:
    import json

    from .runner import load_pipeline, read_edit, reconstruct_from_sidecar, recorded_spec

    edit = read_edit(args.sidecar, args.image)  # bad input fails before the model loads
    meta = edit[0]
    out = args.out or str(Path(args.sidecar).parent)
    check_output_folder(out)
    spec = recorded_spec(meta, args.model, device=args.device, dtype=args.dtype)
    loaded = load_pipeline(spec, len(meta["results"]))
    options = _given_options(args, BACKGROUND_OPTIONS)
    written, sidecar = reconstruct_from_sidecar(
        loaded, args.sidecar, out, options, image=args.image, edit=edit
    )
    for path in written:
        print(path)
    if not args.quiet:
        print(f"reconstruct: {json.dumps(sidecar['timings'])}", file=sys.stderr)
    return 0


def _bench(args) -> int:
    from .bench import QUICK_METHODS, BenchConfig, run_bench

    cfg = BenchConfig(
        model=args.model,
        clip=args.rank_model,
        pixel_model=args.pixel_model,
        inpaint_model=args.inpaint_model,
        loras=tuple(args.lora),
        tasks=args.tasks or (30 if args.quick else 120),
        kinds=tuple(args.kinds or BenchConfig.kinds),
        steps=args.steps or (20 if args.quick else 25),
        samples=args.samples,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        methods=args.methods or (QUICK_METHODS if args.quick else None),
        label=args.label,
    )
    if cfg.model == "toy":
        from . import models

        if not models.toy_shipped():
            raise ValueError(
                "model: the shipped Shapes World model is not in this checkout yet; pass "
                "--model <pipeline folder> (e.g. one `blendedit train-toy assemble` wrote)"
            )
    run_bench(cfg, args.out, progress=not args.quiet, log=lambda m: print(m, file=sys.stderr))
    print(Path(args.out) / "report.md")
    return 0


def _edit(args) -> int:
    _run_edit(args)
    return 0


def _option_names() -> list[str]:
    from .pixel import PixelEditOptions

    return list(dict.fromkeys([*asdict(LatentEditOptions()), *asdict(PixelEditOptions())]))


_OPTION_NAMES = _option_names()


def _given_options(args, names) -> dict:
    """The option flags among ``names`` that were given (flags default to None)."""
    return {f: v for f in names if (v := getattr(args, f, None)) is not None}


def model_spec(args) -> ModelSpec:
    """The model flags (see :func:`_add_model_flags`) as a :class:`ModelSpec`."""
    return ModelSpec(
        model=args.model,
        method=args.method,
        config=args.config,
        vae=args.vae,
        refiner=args.refiner,
        scheduler=args.scheduler,
        rank_model=args.rank_model,
        device=args.device,
        dtype=args.dtype,
        loras=tuple(args.lora),
        embeddings=tuple(args.embedding),
    )


def edit_request(args, **over) -> EditRequest:
    """The input and option flags as an :class:`EditRequest` (``over`` replaces fields)."""
    fields = dict(
        image=getattr(args, "image", ""),
        prompt=getattr(args, "prompt", ""),
        mask=None if getattr(args, "mask_from_alpha", False) else getattr(args, "mask", None),
        seed=args.seed,
        options=_given_options(args, _OPTION_NAMES),
        mask_threshold=args.mask_threshold,
        invert_mask=args.invert_mask,
        resize_mask=args.resize_mask,
        max_pixels=args.max_pixels,
    )
    return EditRequest(**(fields | over))


def _run_edit(args) -> list[Path]:
    """Check the inputs, load the model, edit, write and list the written paths."""
    from .runner import load_inputs, load_pipeline, run_edit

    req = edit_request(args)
    inputs = load_inputs(req)  # bad input fails before any model loads
    check_output_folder(args.out)
    loaded = load_pipeline(model_spec(args), args.num_images_per_prompt or 1)
    written, _ = run_edit(loaded, req, args.out, progress=not args.quiet, inputs=inputs)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    sys.exit(main())
