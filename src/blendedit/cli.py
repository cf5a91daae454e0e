"""Command-line interface: parse, call the library, write outputs. No editing logic lives here."""

from __future__ import annotations

import sys
from dataclasses import asdict, fields
from pathlib import Path

from .cli_parser import EXIT_INPUT, EXIT_INTERRUPTED, EXIT_MODEL, EXIT_OUTPUT, build_parser
from .io import check_output_folder
from .latent import BACKGROUND_OPTIONS, LatentEditOptions
from .runner import EditRequest, ModelSpec


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

            serve(
                model_spec(args),
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
        if args.command == "mask":
            return _mask(args)
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


def _mask(args) -> int:
    import json

    from .io import OutputError, load_image, save_image
    from .runner import load_pipeline
    from .text_mask import TextMaskOptions

    opts = TextMaskOptions(**mask_finding(args), seed=args.seed)
    opts.check(args.mask_prompt)  # bad input fails before the model loads
    if args.refiner:
        raise ValueError("refiner: finding a mask uses the base model only; drop --refiner")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"out: the mask is written as PNG; give a .png path, got {str(out)!r}")
    if out.exists() and out.resolve() == Path(args.image).resolve():
        raise OutputError(f"out: {str(out)!r} is the input image; choose another path")
    check_output_folder(out.parent)
    image = load_image(args.image, max_pixels=args.max_pixels)
    pipe = load_pipeline(model_spec(args, rank_model="none")).pipe  # finding ranks nothing
    found = pipe.mask_from_text(image, args.mask_prompt, not args.quiet, **asdict(opts))
    print(save_image(found.mask, out))
    if not args.quiet:
        print(f"mask: {json.dumps(found.info)}", file=sys.stderr)
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
        frame_scale=args.frame_scale,
        methods=args.methods or (QUICK_METHODS if args.quick and args.frame_scale == 1 else None),
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


def model_spec(args, **over) -> ModelSpec:
    """The model flags a command has (see :func:`_add_model_flags`) as a :class:`ModelSpec`,
    the defaults for those it lacks; ``over`` replaces fields."""
    flags = {f.name: getattr(args, f.name) for f in fields(ModelSpec) if hasattr(args, f.name)}
    flags.update(loras=tuple(getattr(args, "lora", ())))
    flags.update(embeddings=tuple(getattr(args, "embedding", ())))
    return ModelSpec(**(flags | over))


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
        mask_prompt=getattr(args, "mask_prompt", None),
        mask_finding=mask_finding(args),
    )
    return EditRequest(**(fields | over))


def mask_finding(args) -> dict:
    """The --mask-reference, --mask-grow and --mask-min-gain flags as TextMaskOptions fields."""
    out = {}
    if getattr(args, "mask_reference", None) is not None:
        out["references"] = tuple(args.mask_reference)
    if getattr(args, "mask_grow", None) is not None:
        out["grow"] = args.mask_grow
    if getattr(args, "mask_min_gain", None) is not None:
        out["min_gain"] = args.mask_min_gain
    return out


def _run_edit(args) -> list[Path]:
    """Check the inputs, load the model, edit, write and list the written paths."""
    from .runner import check_mask_prompt, load_inputs, load_pipeline, run_edit

    req = edit_request(args)
    inputs = load_inputs(req)  # bad input fails before any model loads
    check_mask_prompt(req, args.method)
    check_output_folder(args.out)
    loaded = load_pipeline(model_spec(args), args.num_images_per_prompt or 1)
    written, _ = run_edit(loaded, req, args.out, progress=not args.quiet, inputs=inputs)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    sys.exit(main())
