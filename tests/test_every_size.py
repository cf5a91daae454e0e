"""Every family and inpainting kind x image sizes x mask shapes x the main options (issue 39):
no traceback, the output has the input's size, and with paste every pixel outside the mask is
the input's. Tiny random models of the seven kinds; the cases are drawn by hypothesis,
derandomised (the same cases every run)."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from blendedit import BlendedLatentDiffusionPipeline

KINDS = ["sd", "sdxl", "sd3", "flux", "sd-inpaint", "sdxl-inpaint", "flux-fill"]
SIZES = [(1, 1), (5, 3), (8, 8), (17, 9), (96, 72), (300, 24), (24, 300), (130, 70), (257, 131)]
MASKS = ["one pixel", "top", "bottom", "left", "right", "whole image", "islands"]
OPTIONS = [
    {},
    {"crop_to_mask": "zoom"},
    {"crop_to_mask": True},
    {"shrink_iterations": 0},
    {"strength": 0.5},
    {"background": "decoder", "decoder_steps": 2},
    {"background_noise": "fresh"},
]


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    from blendedit.tiny import save_tiny_flux, save_tiny_inpaint, save_tiny_sd3, save_tiny_sdxl

    d = tmp_path_factory.mktemp("kinds")
    folders = {
        "sd": "tiny-random",
        "sdxl": save_tiny_sdxl(d / "sdxl"),
        "sd3": save_tiny_sd3(d / "sd3"),
        "flux": save_tiny_flux(d / "flux"),
        "sd-inpaint": save_tiny_inpaint(d / "sdi", "sd"),
        "sdxl-inpaint": save_tiny_inpaint(d / "sdxli", "sdxl"),
        "flux-fill": save_tiny_inpaint(d / "fill", "flux"),
    }
    return {k: BlendedLatentDiffusionPipeline.from_pretrained(str(f)) for k, f in folders.items()}


def make_mask(name: str, w: int, h: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    third_h, third_w = max(1, h // 3), max(1, w // 3)
    if name == "one pixel":
        m[h // 2, w // 2] = True
    elif name == "top":
        m[:third_h, w // 4 :] = True
    elif name == "bottom":
        m[-third_h:, : max(1, w // 2)] = True
    elif name == "left":
        m[:, :third_w] = True
    elif name == "right":
        m[h // 4 :, -third_w:] = True
    elif name == "whole image":
        m[:] = True
    else:  # islands: two corners and a bar
        m[0, 0] = m[-1, -1] = True
        m[h // 2, : max(1, w // 4)] = True
    return m


def edit(pipe, size, mask_name, options):
    w, h = size
    image = Image.fromarray((np.random.RandomState(w * h).rand(h, w, 3) * 255).astype(np.uint8))
    m = make_mask(mask_name, w, h)
    g = torch.Generator().manual_seed(0)
    out = pipe(
        "a red cat", image, m.astype(np.float32), num_inference_steps=2, generator=g, **options
    )
    got = np.asarray(out.images[0])
    assert got.shape == (h, w, 3)
    if options.get("background", "paste") == "paste":  # the default keeps them exactly
        assert np.array_equal(got[~m], np.asarray(image)[~m])
    return out


@pytest.mark.parametrize("kind", KINDS)
@settings(
    max_examples=10,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    size=st.sampled_from(SIZES),
    mask=st.sampled_from(MASKS),
    options=st.sampled_from(OPTIONS),
)
def test_any_size_mask_and_option_edits_and_keeps_the_background(pipes, kind, size, mask, options):
    edit(pipes[kind], size, mask, options)


@pytest.mark.parametrize("kind", KINDS)
def test_the_extremes_of_every_kind(pipes, kind):
    """The cases a draw may miss, on every kind: a one-pixel image, a very wide and a very tall
    one with a mask touching the border, islands on a large frame."""
    for size, mask in [((1, 1), "whole image"), ((300, 24), "right"), ((24, 300), "top")]:
        edit(pipes[kind], size, mask, {})
    edit(pipes[kind], (257, 131), "islands", {"crop_to_mask": "zoom"})


def test_sd3_takes_the_96x72_picture_that_broke_it(pipes):
    """Issue 39's report: a 96x72 picture with a centred mask failed inside the scheduler's step
    (an odd latent side; SD3's 2x2 patches need regions padded to 16 px)."""
    pipe = pipes["sd3"]
    assert pipe.pad_multiple == 16
    image = Image.fromarray((np.random.RandomState(1).rand(72, 96, 3) * 255).astype(np.uint8))
    m = np.zeros((72, 96), bool)
    m[24:48, 32:64] = True
    out = pipe("a red cat", image, m.astype(np.float32), num_inference_steps=2)
    assert np.array_equal(np.asarray(out.images[0])[~m], np.asarray(image)[~m])


def test_a_region_beyond_sd3s_position_table_is_generated_smaller_and_said(pipes):
    """SD3 embeds positions from a table of ``pos_embed_max_size`` patches a side: a wider
    region (here the whole frame, crop_to_mask=False) is generated at the native size and
    resized back, with a warning."""
    pipe = pipes["sd3"]
    largest = pipe.adapter.largest_side(pipe.vae_scale_factor)
    assert largest is not None
    out = edit(pipe, (largest + 44, 24), "whole image", {"crop_to_mask": False})
    assert out.zoomed and any("more than this model takes" in w for w in out.warnings)
