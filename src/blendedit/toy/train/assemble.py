"""Building the shipped folder (assets/toy) from finished runs."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch

from ...models import quiet_transformers, write_edit_defaults
from ..common import MEASURED
from .arch import LATENT_SCHEDULER, SAMPLING_FILE, TEXT_ENCODER, vae_factor, write_preprocessor
from .snapshots import snapshot


def _model_folder(run: Path, unfinished: bool) -> Path:
    """A run's finished ``model/``, or with ``unfinished`` a fresh snapshot of its checkpoint
    (also when the run was extended after its ``model/`` was written)."""
    if not run.is_dir():
        raise SystemExit(f"{run}: no such run folder (check --work and the run names)")
    model, ckpt = run / "model", run / "checkpoint.pt"
    extended = model.exists() and ckpt.exists() and _newer(ckpt, model)
    if model.exists() and not (unfinished and extended):
        return model
    if not unfinished:
        raise SystemExit(
            f"{run} has no model/ (the run has not finished); finish it, or pass --unfinished "
            "to assemble from its latest checkpoint"
        )
    return snapshot(run)


def _card_chain(run: Path, _seen: frozenset = frozenset()) -> list[Path]:
    """``run``'s card.md after the cards of the runs it started from (``--init-from`` or
    ``--decoder-only`` a run or its ``model/``, as its commands.log records), earliest first, so
    that the shipped card gives every stage of a recipe. A run met twice on one path (runs
    that name each other) is not followed again."""
    chain: list[Path] = []
    seen = _seen | {run.resolve()}
    log = run / "commands.log"
    if log.exists():
        for line in log.read_text().splitlines():
            words = line.split(": ", 1)[-1].split()
            for flag, value in zip(words, words[1:]):
                base = Path(value).parent if Path(value).name == "model" else Path(value)
                if flag in ("--init-from", "--decoder-only") and (base / "card.md").is_file():
                    if base.resolve() not in seen:
                        chain += _card_chain(base, seen)
    return [*chain, run / "card.md"]


def _newer(a: Path, b: Path) -> bool:
    return a.stat().st_mtime > b.stat().st_mtime + 60


def _drop_load_flags(config: Path) -> None:
    """transformers saves how a tokenizer was loaded (``local_files_only``, true under
    HF_HUB_OFFLINE) into its config: not a property of the model, so not shipped."""
    data = json.loads(config.read_text())
    if data.pop("local_files_only", None) is not None:
        config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


#: Why the shipped pipeline's edits default to guidance 5 (`assemble --guidance-scale`).
GUIDANCE_MEASURED = (
    "blendedit bench --methods ours --guidance-scale G (120 tasks, 25 steps): 5 edits 28 %, "
    "2.5 and 7.5 20 % each (12 against 3 tasks, p = 0.035), 10 18 %; on 90 other tasks "
    "(--seed 1) 5 26 %, 7.5 23 % (9 against 7); benchmarks/results/guidance/"
)


#: Why the shipped pixel model's edits default to CLIP guidance 500 (`--clip-guidance-scale`).
PIXEL_GUIDANCE_MEASURED = (
    "benchmarks/pixel_quality.py, the x0-hat CLIP guiding: on 30 development tasks (seed 7, 2 "
    "samples) one sample succeeds 40 % at 500, 23 % at 1000, 8 % at 3000; on the benchmark's 90 "
    "tasks (4 samples) 500 38 % against 1000 31 % (10 tasks against 4, p = 0.18); "
    "benchmarks/results/clip_on_x0/"
)


SHIPPED_PARTS = ("vae", "unet", "clip", "pixel", "guide-clip")  # what `--only` can replace


SHIPPED_MB = 60  # the cap on the package's weights


def _check_latent_grid(vae: Path, unet: Path) -> None:
    """The UNet must take the VAE's latents: their channels, and a grid of the VAE's frame
    (128 px) over its downscale."""
    v = json.loads((vae / "config.json").read_text())
    u = json.loads((unet / "config.json").read_text())
    grid = v["sample_size"] // vae_factor(v)
    if u["in_channels"] != v["latent_channels"] or u["sample_size"] != grid:
        raise SystemExit(
            f"the UNet ({unet}) takes {u['in_channels']}x{u['sample_size']}x{u['sample_size']} "
            f"latents, the VAE ({vae}) makes {v['latent_channels']}x{grid}x{grid}: train the "
            "UNet on this VAE (unet --vae), or ship both (--only vae unet)"
        )


def _sampling(unet: Path) -> dict:
    """What a UNet's sampler needs beyond Stable Diffusion's schedule (`unet --zero-snr`)."""
    f = unet / SAMPLING_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def _card_head() -> list[str]:
    return [
        "# Shapes World models (blendedit's own)",
        "",
        "Trained from scratch by `blendedit.toy.train` on scenes rendered by `blendedit.toy` "
        "(SHAPES_WORLD.md); weights stored as float16 safetensors, loaded as float32. Data: "
        "`python -m blendedit.toy.train data --out runs/toy/data -n 30000 --seed 0` (training) "
        "and `... data --out runs/toy/heldout -n 1000 --seed 1` (held out), and for the CLIP's "
        "first stage and the UNet's second (one-object scenes) `... data --objects 1 --out "
        "runs/toy/data-single -n 40000 --seed 0`. Then "
        "each model's commands below, in this order (the CLIP's vision stage, then its "
        "contrastive stage; the UNet needs the CLIP and the VAE), and "
        "`python -m blendedit.toy.train assemble --guide-clip guide-clip` (the pixel model's "
        "guidance CLIP is tuned on that model's x̂0, so it comes last). Figures: "
        "`python -m blendedit.toy.evaluate`.",
        "",
    ]


def assemble(args) -> None:
    """Build the shipped folder from finished runs: ``pipeline/`` (StableDiffusionPipeline:
    toy VAE, CLIP text encoder and tokenizer, UNet, DDIM), ``clip/`` (CLIPModel, for ranking
    and guidance), ``pixel/`` (UNet2DModel + DDPM scheduler) and, with ``--guide-clip``,
    ``guide-clip/`` (the CLIP that guides the pixel model), weights in float16.

    With ``--only PART ...`` (``vae`` with ``unet``, ``unet``, ``clip``, ``pixel``) the existing
    ``--dest`` folder is
    the source of every other part: only those are replaced, and the named runs' cards are
    added to its MODEL_CARD.md (whose measured figures, now stale, are dropped)."""
    with quiet_transformers():
        from diffusers import (
            AutoencoderKL,
            DDIMScheduler,
            StableDiffusionPipeline,
            UNet2DConditionModel,
        )
    from transformers import AutoTokenizer, CLIPModel, CLIPTextModel

    work, dest = Path(args.work), Path(args.dest)
    only = set(args.only or ())
    if only - set(SHIPPED_PARTS):
        raise SystemExit(f"--only: parts are {', '.join(SHIPPED_PARTS)}; got {sorted(only)}")
    if "vae" in only and "unet" not in only:
        raise SystemExit(
            "--only vae: a UNet is trained on its VAE's latents; ship a new VAE with the UNet "
            "trained on it (--only vae unet)"
        )
    if only and not (dest / "pipeline" / "model_index.json").is_file():
        raise SystemExit(f"--only: {dest} is not an assembled folder (no pipeline/) to update")

    def folder(name):
        return _model_folder(work / name, args.unfinished)

    # every run is found before anything is written: a wrong name leaves no half-built folder
    if only:  # the parts not named come from the folder being updated
        vae = folder(args.vae) if "vae" in only else dest / "pipeline" / "vae"
        text_folder = dest / "pipeline" / "text_encoder"
        tok_folder = dest / "pipeline" / "tokenizer"
        unet = folder(args.unet) if "unet" in only else dest / "pipeline" / "unet"
        clip_folder = folder(args.clip) if "clip" in only else dest / "clip"
        if "pixel" in only:
            pixel = folder(args.pixel)
        else:
            pixel = dest / "pixel" if (dest / "pixel").is_dir() else None
        if "guide-clip" in only:
            guide = folder(args.guide_clip)
        else:
            guide = dest / "guide-clip" if (dest / "guide-clip").is_dir() else None
        if (unet / TEXT_ENCODER).is_dir():  # a UNet that brings its own text encoder
            text_folder = tok_folder = unet / TEXT_ENCODER
        runs = [getattr(args, part.replace("-", "_")) for part in SHIPPED_PARTS if part in only]
    else:
        vae, unet = folder(args.vae), folder(args.unet)
        clip_folder = folder(args.clip)
        # a UNet trained with its text encoder carries it; one trained on a frozen one names
        # that encoder's run
        text_folder = unet / TEXT_ENCODER
        if not text_folder.is_dir():
            text_folder = folder(args.text_encoder or "clip")
        elif args.text_encoder:
            raise SystemExit(
                f"--text-encoder {args.text_encoder}: the UNet {args.unet} was trained with its "
                f"own text encoder ({text_folder}), which the pipeline ships; leave "
                "--text-encoder out"
            )
        tok_folder = text_folder
        pixel = folder(args.pixel) if args.pixel else None  # '' ships no pixel model
        guide = folder(args.guide_clip) if args.guide_clip else None
        runs = [args.vision, args.clip, args.text_encoder, args.vae, args.unet, args.pixel]
        runs.append(args.guide_clip)
    _check_latent_grid(vae, unet)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    half = torch.float16
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(vae).to(half),
        text_encoder=CLIPTextModel.from_pretrained(text_folder).to(half),
        tokenizer=AutoTokenizer.from_pretrained(tok_folder),
        unet=UNet2DConditionModel.from_pretrained(unet).to(half),
        scheduler=DDIMScheduler(**LATENT_SCHEDULER, **_sampling(unet)),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp / "pipeline")
    write_edit_defaults(tmp / "pipeline", args.guidance_scale, GUIDANCE_MEASURED)
    clips = {"clip": clip_folder, "guide-clip": guide}  # the ranking one; the guidance one
    for name, source in clips.items():
        if source is not None:
            CLIPModel.from_pretrained(source).to(half).save_pretrained(tmp / name)
            AutoTokenizer.from_pretrained(source).save_pretrained(tmp / name)
            write_preprocessor(tmp / name)
    for cfg in (tmp / "pipeline" / "tokenizer", *(tmp / n for n, f in clips.items() if f)):
        _drop_load_flags(cfg / "tokenizer_config.json")
    if pixel is not None:
        from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

        DDPMPipeline(
            unet=UNet2DModel.from_pretrained(pixel / "unet").to(half),
            scheduler=DDPMScheduler.from_pretrained(pixel / "scheduler"),
        ).save_pretrained(tmp / "pixel")
    if only:  # the parts kept are copied as they are (their configs name the runs they came from)
        kept = [vae, unet, clip_folder, pixel, guide, text_folder, tok_folder]
        if "unet" not in only:  # and the sampler it was assembled with (`unet --zero-snr`'s)
            kept.append(dest / "pipeline" / "scheduler")
        for part in {p for p in kept if p is not None and p.is_relative_to(dest)}:
            shutil.rmtree(tmp / part.relative_to(dest))
            shutil.copytree(part, tmp / part.relative_to(dest))
    if (tmp / "pixel").is_dir():
        write_edit_defaults(
            tmp / "pixel", args.clip_guidance_scale, PIXEL_GUIDANCE_MEASURED, method="pixel"
        )
    cards = [c for n in runs if n for c in _card_chain(work / n)]
    cards = list(dict.fromkeys(cards))
    if only:  # the folder's card so far, without its measured figures (they were of the old one)
        old = (dest / "MODEL_CARD.md").read_text() if (dest / "MODEL_CARD.md").exists() else ""
        head, sep, figures = old.partition("\n" + MEASURED)
        text = [head.rstrip("\n") + "\n"]
        text += [c.read_text() for c in cards if c.exists() and c.read_text() not in old]
        if sep and only <= {"guide-clip"}:  # no figure there measures the guidance CLIP
            text.append(MEASURED + figures)
    else:
        text = _card_head() + [c.read_text() for c in cards if c.exists()]
    (tmp / "MODEL_CARD.md").write_text("\n".join(text))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    total = sum(f.stat().st_size for f in dest.rglob("*.safetensors"))
    print(f"assembled {dest}: {total / 1e6:.1f} MB of safetensors")
    if total > SHIPPED_MB * 1e6:
        print(
            f"warning: more than the {SHIPPED_MB} MB of weights the package may ship "
            "(tests/test_checkpoints.py fails on it); narrower models fit",
            file=sys.stderr,
        )
