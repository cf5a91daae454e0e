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


def random_frame(w=64, h=64, box=(16, 16, 44, 40)):
    """A random RGB image of ``w`` x ``h`` and a boolean mask of ``box`` (x0, y0, x1, y1)."""
    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8), "RGB")
    mask = np.zeros((h, w), bool)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = True
    return image, mask


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


def tiny_folder(kind: str, root) -> str:
    """A tiny random model of ``kind`` ("sd", "sdxl", "sd3", "flux", or one of them with
    "-inpaint": SD / SDXL inpainting UNets, Flux Fill) saved under ``root``."""
    from blendedit import tiny

    if kind == "sd":
        return "tiny-random"
    if kind.endswith("-inpaint"):
        return str(tiny.save_tiny_inpaint(root / kind, kind.split("-")[0]))
    return str(getattr(tiny, f"save_tiny_{kind}")(root / kind))


def edit_twice_and_check_paste(pipe, image, mask, **kw):
    """Edit twice with the same per-sample generators (seeds 1 and 2): the images are equal
    run to run, and every pixel outside ``mask`` (a bool array) is the input's. Returns the
    first run's output."""
    import numpy as np
    import torch

    def run():
        gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
        return pipe("a red cat", image, mask, num_images_per_prompt=2, generator=gens, **kw)

    a, b = run(), run()
    src = np.asarray(image)
    for img_a, img_b in zip(a.images, b.images):
        assert np.array_equal(np.asarray(img_a), np.asarray(img_b))
        assert np.array_equal(np.asarray(img_a)[~mask], src[~mask])
    return a


BASELINES = ["diffusers inpaint", "text-to-image + paste", "SDEdit + paste"]


def check_bench_with_baselines(folder, tmp_path):
    """``blendedit bench`` on a model folder runs ours and diffusers' inpainting, text-to-image
    and SDEdit pipelines of the model's family (one task, two steps: SDEdit runs one), and
    reports each."""
    import json

    from blendedit.cli import main
    from blendedit.models import TOY_DIR

    args = ["bench", "--model", str(folder), "--rank-model", str(TOY_DIR / "clip"), "--quiet"]
    args += ["--tasks", "1", "--steps", "2", "--samples", "1", "--methods", "ours", *BASELINES]
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    rows = json.loads((tmp_path / "b" / "results.json").read_text())
    text = (tmp_path / "b" / "report.md").read_text()
    assert all(f"| {m} |" in text for m in ["ours", *BASELINES])
    assert str(folder) in json.dumps(rows)
