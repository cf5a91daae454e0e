"""blendedit: text-driven local image editing (Blended Latent Diffusion, Blended Diffusion)."""

from .io import load_image, load_mask, save_image
from .latent import BlendedLatentDiffusionOutput, BlendedLatentDiffusionPipeline, LatentEditOptions
from .models import ModelNotFoundError
from .pixel import BlendedDiffusionOutput, BlendedDiffusionPipeline
from .ranking import ClipRanker

__all__ = [
    "BlendedDiffusionOutput",
    "BlendedDiffusionPipeline",
    "BlendedLatentDiffusionOutput",
    "BlendedLatentDiffusionPipeline",
    "ClipRanker",
    "LatentEditOptions",
    "ModelNotFoundError",
    "load_image",
    "load_mask",
    "save_image",
]
__version__ = "0.1.0"
