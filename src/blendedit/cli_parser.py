"""The command line's parser: every subcommand's flags, their defaults and help."""

from __future__ import annotations

import argparse

from . import __version__
from .demo import DEMO_PROMPT
from .io import DEFAULT_MAX_PIXELS
from .latent import BACKGROUND_OPTIONS, SCHEDULERS, options_fields
from .runner import DEFAULT_MODEL, DEFAULT_RANK_MODEL, option_from_text

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
    src.add_argument(
        "--mask-prompt",
        metavar="TEXT",
        help="find the region TEXT names with the model (no mask to paint); the found mask is "
        "written beside the results as STEM-mask.png",
    )
    e.add_argument("--prompt", required=True, help="what the masked region should show")
    _add_mask_finding(e)
    _add_common(e)

    k = sub.add_parser(
        "mask",
        help="find the region a text names and write it as a mask",
        description="Find the region of IMAGE that TEXT names with the model's own noise "
        "predictions and write it as a black-and-white mask (white = the region).",
    )
    k.add_argument("image", help="image to look in (never modified)")
    k.add_argument("--mask-prompt", metavar="TEXT", required=True, help="what to find")
    k.add_argument("--out", required=True, help="the mask file to write (PNG)")
    k.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="built-in name, diffusers folder, checkpoint file or hub id "
        f"(default: {DEFAULT_MODEL})",
    )
    _add_model_parts(k)
    _add_mask_finding(k)
    k.add_argument("--seed", type=int, default=0, help="seed of the noise draws (default: 0)")
    k.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"refuse larger images (default: {DEFAULT_MAX_PIXELS:,})",
    )
    _add_device_flags(k)
    k.add_argument("--quiet", action="store_true", help="print nothing but the written path")

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
    _add_mask_finding(b)
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
    q.add_argument(
        "--frame-scale",
        type=int,
        default=1,
        help="big frames: the tasks rendered N times larger, each result judged at the native "
        "size; runs ours, diffusers' inpainting with padding_mask_crop and ours on the native "
        "frames unless --methods says otherwise (default: 1)",
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


def _add_mask_finding(p: argparse.ArgumentParser) -> None:
    """How --mask-prompt finds its region (blendedit.text_mask)."""
    p.add_argument(
        "--mask-reference",
        action="append",
        default=None,
        metavar="TEXT",
        help="with --mask-prompt: what the region is not, contrasted with it (repeatable; "
        "default: the text with its colour word swapped for the other hues, else '')",
    )
    p.add_argument(
        "--mask-grow",
        type=int,
        default=None,
        metavar="PX",
        help="with --mask-prompt: margin added around the found region, in the image's pixels "
        "(default: 1/64 of the model's native size, at its scale)",
    )
    p.add_argument(
        "--mask-min-gain",
        type=float,
        default=None,
        metavar="G",
        help="with --mask-prompt: the least fraction of the references' prediction error the "
        "text must remove where it is found; below it the text matches nothing (default: 0.3)",
    )


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
