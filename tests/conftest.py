import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any Hugging Face import: never the network

import numpy as np
import pytest
import torch
from PIL import Image

from blendedit import BlendedLatentDiffusionPipeline, ClipRanker
from blendedit.tiny import build_tiny_components


@pytest.fixture(scope="session")
def tiny_components(tmp_path_factory):
    return build_tiny_components("tiny", seed=0, tokenizer_dir=tmp_path_factory.mktemp("tok"))


@pytest.fixture
def pipe(tiny_components):
    """A tiny random SD pipeline (64 px native, 8x8x4 latents) with a tiny CLIP ranker."""
    c = tiny_components
    return BlendedLatentDiffusionPipeline(
        c["unet"],
        c["vae"],
        c["text_encoder"],
        c["tokenizer"],
        c["scheduler"],
        ClipRanker(c["ranker"], c["ranker_tokenizer"]),
    )


@pytest.fixture
def image():
    rng = np.random.RandomState(0)
    return Image.fromarray((rng.rand(64, 64, 3) * 255).astype(np.uint8), "RGB")


@pytest.fixture
def box_mask():
    m = np.zeros((64, 64), np.float32)
    m[20:44, 16:40] = 1
    return m


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def save_sd_folder(folder, *, unet, vae, text_encoder, tokenizer, scheduler) -> None:
    """These components as a diffusers Stable Diffusion pipeline folder (no safety checker)."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(folder)
