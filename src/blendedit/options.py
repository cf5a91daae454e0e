"""The options of a Blended Latent Diffusion edit (:class:`LatentEditOptions`): the one source
of the pipeline's keyword defaults, the CLI's flags and the web UI's controls."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from . import background as B
from . import masks as M
from .conditioning import MICRO_CONDITIONING
from .ranking import RANK_REGIONS

SCHEDULERS = ("ddim", "dpm++", "euler")
BACKGROUND_NOISE_MODES = ("fixed", "fresh")
CROP_MODES = ("auto", True, False, "zoom", "crop")  # "crop": True, by name
#: Classifier-free guidance when neither the call nor the model folder names one (SD's).
DEFAULT_GUIDANCE_SCALE = 7.5


def _opt(default, help: str, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class LatentEditOptions:
    """Options of a Blended Latent Diffusion edit; the one source of defaults for the pipeline's
    keyword arguments and the CLI's flags."""

    negative_prompt: str = _opt("", "text the edit should move away from (classifier-free)")
    num_inference_steps: int = _opt(50, "denoising steps of the full schedule")
    guidance_scale: float | None = _opt(
        None,
        "classifier-free guidance scale (<= 1 turns it off); unset: the model's own (the "
        "shipped toy model's 5, from its blendedit.json), else Stable Diffusion's 7.5",
    )
    strength: float = _opt(
        1.0, "fraction of the schedule that runs, in (0, 1]; 1 starts from (almost) pure noise"
    )
    num_images_per_prompt: int = _opt(1, "samples per request; all are returned, best first")
    mask_downsample: str = _opt(
        "max",
        "mask to latent cells: max (a cell is masked if any pixel is) or nearest",
        M.MASK_DOWNSAMPLE_MODES,
    )
    shrink_iterations: int | str = _opt(
        "auto",
        "progressive mask shrinking: k dilations (7x7, 5x5, 3x3 for k=3) then exact; 0 = off; "
        "auto = the paper's 3 on a 64x64 latent grid (512 px), fewer on smaller grids (3 x "
        "side / 64, rounded down: 0 for the 128 px toy model)",
    )
    background: str = _opt(
        "paste",
        "background reconstruction: paste (original pixels outside the mask), poisson "
        "(seamless cloning), decoder (fine-tune a copy of the VAE decoder on this image, the "
        "paper's) or none (the raw decode)",
        B.BACKGROUND_METHODS,
    )
    background_noise: str = _opt(
        "fixed",
        "noise of the blended background: fixed per sample or fresh every step",
        BACKGROUND_NOISE_MODES,
    )
    feather: int = _opt(3, "pixels of feathering just inside the mask edge when pasting")
    decoder_steps: int = _opt(75, "background=decoder: Adam steps of the fine-tuning")
    decoder_lr: float | None = _opt(
        None,
        "background=decoder: Adam learning rate (default: 1e-4 with decoder_layers=all, the "
        "paper's; 1e-3 last; 3e-3 head)",
    )
    decoder_lambda: float = _opt(
        10.0,
        "background=decoder: weight of the background loss (the paper's is 100; why 10 is the "
        "default: docs/benchmarks.md)",
    )
    decoder_mode: str = _opt(
        "weights",
        "background=decoder: optimize the decoder's weights or the latents",
        B.DECODER_MODES,
    )
    decoder_layers: str = _opt(
        "last",
        "background=decoder: which decoder weights are tuned: last (the last up block and the "
        "output head; the layers before run once), all (the paper's) or head (the output norm "
        "and conv)",
        B.DECODER_LAYERS,
    )
    decoder_crop_margin: int = _opt(
        1,
        "background=decoder: work on the mask's latent box grown by this many cells "
        "(-1: the whole frame; 1 decodes the mask exactly as the whole frame with the default "
        "layers)",
    )
    crop_to_mask: Any = _opt(
        "auto",
        "edit only a box around the mask: auto (when the image is larger than the "
        "model's native size: the box at native scale, or zoomed where that box would hold "
        "more than 1.5x the native area), crop (or true: the box at native scale however "
        "large), false; zoom: the box (the mask plus "
        "crop_context, any size) resized to the model's native size and back, as diffusers' "
        "padding_mask_crop and the web UIs' 'inpaint only masked' (outside the mask the "
        "source's pixels, but for background=none)",
    )
    crop_context: float = _opt(0.5, "context around the mask in the crop box, x the mask's side")
    detail_strength: float = _opt(
        0.0,
        "zoomed edits only: a second blended pass of this fraction of the schedule over the "
        "region at up to 2x the native size (the box's own where smaller) before it is resized "
        "back (the web UIs' 'hires fix'); 0 = off, the default: on the Shapes World big frames "
        "it made nothing sharper nor more successful (docs/benchmarks.md#big-frames-issue-44)",
    )
    rank_region: str = _opt(
        "crop", "what CLIP ranking scores: crop (mask box with context), masked, full", RANK_REGIONS
    )
    refiner_fraction: float = _opt(
        0.2,
        "with an SDXL refiner: the share of the steps, the last ones, that run on the "
        "refiner's UNet (blended the same way)",
    )
    micro_conditioning: str = _opt(
        "geometry",
        "SDXL only: the size and crop numbers the UNet is told; geometry: the edit's own "
        "(original size = the input image's, crop top-left and target size = the edited "
        "box's), centred: SDXL's text-to-image defaults (the edited region, uncropped)",
        MICRO_CONDITIONING,
    )


_D = LatentEditOptions()
#: The options of the background step alone: what ``reconstruct_background`` (and
#: `blendedit reconstruct`) take.
BACKGROUND_OPTIONS = ("background", "feather", "rank_region") + tuple(
    f.name for f in fields(LatentEditOptions) if f.name.startswith("decoder_")
)


def options_fields(cls=None):
    """(name, default, help, choices) of every option of ``cls`` (default
    :class:`LatentEditOptions`; also :class:`~blendedit.pixel.PixelEditOptions`), for the CLI
    and the web UI."""
    return [
        (f.name, f.default, f.metadata["help"], f.metadata["choices"])
        for f in fields(cls or LatentEditOptions)
    ]
