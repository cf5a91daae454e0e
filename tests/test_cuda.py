"""Edits on a GPU (issue 43): every family's tiny folder in float16 and bfloat16, both methods,
decoder fine-tuning, crop and zoom, and the batch runner with one GPU worker.

Marked ``cuda`` (``pytest -m cuda``, as ``benchmarks/gpu_run.py`` runs them) and skipped where
the device is not usable. ``BLENDEDIT_TEST_DEVICE`` names another device (``cpu`` checks the
tests themselves on a machine without a GPU; float16 there is slow but runs)."""

import os

import numpy as np
import pytest
import torch
from conftest import random_frame

from blendedit import BlendedDiffusionPipeline, BlendedLatentDiffusionPipeline

DEVICE = os.environ.get("BLENDEDIT_TEST_DEVICE", "cuda")


def _usable(name: str) -> bool:
    try:
        torch.empty(1, device=name)
        return True
    except (RuntimeError, AssertionError):
        return False


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not _usable(DEVICE), reason=f"{DEVICE} is not usable here"),
]

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
#: the tiny folders: each family, and the inpainting kinds of SD, SDXL and Flux
KINDS = ["sd", "sdxl", "sd3", "flux", "sd-inpaint", "sdxl-inpaint", "flux-fill"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from conftest import save_sd_folder

    from blendedit import tiny

    root = tmp_path_factory.mktemp("cuda")
    c = tiny.build_tiny_components("tiny", seed=0)
    save_sd_folder(root / "sd", **{k: v for k, v in c.items() if not k.startswith("ranker")})
    tiny.save_tiny_sdxl(root / "sdxl")
    tiny.save_tiny_sd3(root / "sd3")
    tiny.save_tiny_flux(root / "flux")
    for kind, family in (("sd-inpaint", "sd"), ("sdxl-inpaint", "sdxl"), ("flux-fill", "flux")):
        tiny.save_tiny_inpaint(root / kind, family)
    return {k: root / k for k in KINDS}


def edit_twice(pipe, image, mask, **kw):
    """Two edits with the same seeds: equal images, finite latents, the background exact."""

    def run():
        gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
        return pipe("a red circle", image, mask, num_images_per_prompt=2, generator=gens, **kw)

    a, b = run(), run()
    keep = ~np.asarray(mask, bool)
    src = np.asarray(image).astype(int)
    for x, y in zip(a.images, b.images):
        assert np.array_equal(np.asarray(x), np.asarray(y)), "the same seeds gave other images"
        assert np.abs(np.asarray(x).astype(int) - src)[keep].max() == 0, "background changed"
    if getattr(a, "latents", None) is not None:
        assert torch.isfinite(a.latents.float()).all(), "NaN or inf in the final latents"
    return a


def latent_pipe(folder, dtype):
    pipe = BlendedLatentDiffusionPipeline.from_pretrained(
        str(folder), torch_dtype=DTYPES[dtype], local_files_only=True
    )
    return pipe.to(DEVICE, DTYPES[dtype])


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("kind", KINDS)
def test_every_family_edits_on_the_device(folders, kind, dtype):
    pipe = latent_pipe(folders[kind], dtype)
    assert next(pipe.unet.parameters()).device.type == torch.device(DEVICE).type
    image, mask = random_frame()
    out = edit_twice(pipe, image, mask, num_inference_steps=3)
    assert len(out.images) == 2 and out.images[0].size == image.size
    inside = np.asarray(out.images[0]).astype(int)[np.asarray(mask)]
    assert inside.std() > 0, "the edited region is flat (a NaN decodes to one colour)"


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_pixel_method_edits_on_the_device(dtype):
    pipe = BlendedDiffusionPipeline.from_pretrained("tiny-random").to(DEVICE, DTYPES[dtype])
    image, mask = random_frame(32, 32, (8, 8, 24, 24))
    out = edit_twice(pipe, image, mask, num_inference_steps=6, skip_timesteps=2)
    assert len(out.images) == 2


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_decoder_fine_tuning_on_the_device(folders, dtype):
    pipe = latent_pipe(folders["sd"], dtype)
    image, mask = random_frame()
    g = torch.Generator().manual_seed(0)
    raw = pipe("a red circle", image, mask, num_inference_steps=3, generator=g, background="none")
    g = torch.Generator().manual_seed(0)
    tuned = pipe(
        "a red circle",
        image,
        mask,
        num_inference_steps=3,
        generator=g,
        background="decoder",
        decoder_steps=4,
    )
    src = np.asarray(image).astype(float)
    keep = ~np.asarray(mask)

    def err(im):
        return np.abs(np.asarray(im).astype(float) - src)[keep].mean()

    # the decoder is tuned to reproduce the background: it ends closer than the raw decode
    assert np.isfinite(err(tuned.images[0])) and err(tuned.images[0]) < err(raw.images[0])


@pytest.mark.parametrize("crop", ["crop", "auto"])
def test_crop_and_zoom_on_the_device(folders, crop):
    """A small mask on a big frame: the crop box edits at native scale (``auto`` zooms it)."""
    pipe = latent_pipe(folders["sd"], "float16")
    image, mask = random_frame(320, 256, (150, 100, 260, 210))
    out = edit_twice(pipe, image, mask, num_inference_steps=3, crop_to_mask=crop)
    assert out.images[0].size == (320, 256)


@pytest.mark.parametrize("use_ray", [False, True])
def test_batch_runner_with_one_device_worker(tmp_path, use_ray):
    from blendedit.batch import run_batch
    from blendedit.runner import EditRequest, ModelSpec
    from blendedit.toy.tasks import write_manifest

    if use_ray:
        ray = pytest.importorskip("ray")
        ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        manifest = write_manifest(tmp_path / "in", 3, size=64)
        spec = ModelSpec(model="tiny-random", device=DEVICE, dtype="float16")
        defaults = EditRequest(image="", prompt="", options={"num_inference_steps": 2})
        report = run_batch(
            manifest, tmp_path / "out", spec, defaults, workers=1, use_ray=use_ray, progress=False
        )
    finally:
        if use_ray:
            ray.shutdown()
    assert report.counts == {"ok": 3}
