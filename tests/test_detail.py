"""The detail pass (issue 44, ``detail_strength``): a zoomed edit's region goes up to at most
twice the native size (the box's own where smaller) and through a second, short blended pass
there before it is resized back; only the mask changes, the results are reproducible, and an edit
that was not zoomed is untouched."""

import json

import numpy as np
import pytest
from conftest import edit_twice_and_check_paste, gen, random_frame
from PIL import Image

from blendedit.cli import main
from blendedit.latent import DETAIL_SCALE

BIG_BOX = (200, 150, 350, 250)  # 150x100 px: zoomed on the 64 px tiny model


def _latent_sides(pipe) -> list:
    """Record the (h, w) of every latent batch the UNet gets."""
    sides = []
    pipe.unet.register_forward_pre_hook(lambda m, args: sides.append(tuple(args[0].shape[-2:])))
    return sides


def test_the_detail_pass_reworks_a_zoomed_region_at_twice_the_native_size(pipe):
    image, mask = random_frame(600, 400, BIG_BOX)
    plain = pipe("a red cat", image, mask, num_inference_steps=4, generator=gen(1))
    sides = _latent_sides(pipe)
    out = edit_twice_and_check_paste(pipe, image, mask, num_inference_steps=4, detail_strength=0.5)
    assert out.zoomed and out.detailed and not plain.detailed
    native_cells = pipe.native_size // pipe.vae_scale_factor  # 8 cells a side, the tiny model
    # the edit at the native size (the box with its context, 300 px wide, goes down to 64 px),
    # then the detail pass's 2 of the 4 steps at twice that
    assert max(max(s) for s in sides) == DETAIL_SCALE * native_cells
    assert sum(max(s) == DETAIL_SCALE * native_cells for s in sides) == 2 * 2  # 2 runs x 2 steps
    assert "detail" in out.timings
    same_seed = pipe(
        "a red cat", image, mask, num_inference_steps=4, generator=gen(1), detail_strength=0.5
    )
    a, b = np.asarray(plain.images[0]), np.asarray(same_seed.images[0])
    assert not np.array_equal(a[mask], b[mask])  # the mask was reworked ...
    assert np.array_equal(a[~mask], b[~mask])  # ... and nothing else


def test_an_edit_that_is_not_zoomed_gets_no_detail_pass(pipe):
    image, mask = random_frame(600, 400, (300, 200, 320, 216))  # a box at native scale
    plain = pipe("a red cat", image, mask, num_inference_steps=4, generator=gen(1))
    out = pipe(
        "a red cat", image, mask, num_inference_steps=4, generator=gen(1), detail_strength=0.5
    )
    assert not out.zoomed and not out.detailed
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(out.images[0]))


@pytest.mark.parametrize(
    "value, steps, words",
    [(1.5, 4, "detail_strength"), (-0.1, 4, "detail_strength"), (0.1, 4, "runs no step")],
)
def test_bad_detail_strengths_are_refused_by_name(pipe, value, steps, words):
    image, mask = random_frame(600, 400, BIG_BOX)
    with pytest.raises(ValueError, match=words):
        pipe("a red cat", image, mask, num_inference_steps=steps, detail_strength=value)


def test_reconstruct_refuses_an_edit_with_a_detail_pass(pipe, tmp_path):
    image, mask = random_frame(600, 400, BIG_BOX)
    out = pipe("a red cat", image, mask, num_inference_steps=4, detail_strength=0.5)
    with pytest.raises(ValueError, match="detail pass"):
        pipe.reconstruct_background(out, image, background="none")
    # and from the command line: the sidecar says so, `reconstruct` exits 2 naming it
    image.save(tmp_path / "in.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "m.png")
    args = ["edit", str(tmp_path / "in.png"), "--mask", str(tmp_path / "m.png"), "--prompt"]
    args += ["a red cat", "--model", "tiny-random", "--steps", "4", "--quiet"]
    assert main(args + ["--detail-strength", "0.5", "--out", str(tmp_path / "a")]) == 0
    meta = json.loads((tmp_path / "a" / "in.json").read_text())
    assert meta["detailed"] is True and meta["options"]["detail_strength"] == 0.5
    sidecar = str(tmp_path / "a" / "in.json")
    code = main(["reconstruct", sidecar, "--background", "none", "--out", str(tmp_path / "b")])
    assert code == 2
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").glob("*.png"))


def test_the_detail_pass_keeps_the_rng_of_the_edit(pipe):
    """The pass draws its noise from the edit's generators after the edit's own: sample i still
    depends on generator i alone (up to batched-conv rounding)."""
    pipe.ranker = None  # keep sample order
    image, mask = random_frame(600, 400, BIG_BOX)
    kw = dict(num_inference_steps=4, detail_strength=0.5)
    both = pipe("a red cat", image, mask, num_images_per_prompt=2, generator=[gen(1), gen(2)], **kw)
    one = pipe("a red cat", image, mask, generator=[gen(2)], **kw)
    alone, first, second = (np.asarray(x, np.float32)[mask] for x in [one.images[0], *both.images])
    assert np.abs(second - alone).max() <= 2  # 8-bit levels
    assert np.abs(first - alone).mean() > 10  # where another generator gives another edit
