"""Big frames (issue 44): `crop_to_mask="auto"` generates the masked region at the model's own
scale. A box around the mask that would hold more than 1.5x the native area at native scale is
resized to the native size and back (zoom); a smaller one is cropped at native scale."""

import json

import numpy as np
import torch
from conftest import random_frame
from PIL import Image

from blendedit.cli import main
from blendedit.latent import AUTO_ZOOM_AREA


def test_auto_zooms_a_large_mask_and_crops_a_small_one_at_native_scale(pipe):
    native = pipe.native_size  # 64 px, the tiny model
    image, big = random_frame(600, 400, (200, 150, 350, 250))  # box at native scale: 300 px a side
    out = pipe("a red cat", image, big, num_inference_steps=2, generator=torch.Generator())
    (x0, y0, x1, y1) = out.crop_box
    assert out.zoomed and (x1 - x0) * (y1 - y0) > AUTO_ZOOM_AREA * native**2
    assert np.array_equal(np.asarray(out.images[0])[~big], np.asarray(image)[~big])
    image, small = random_frame(600, 400, (300, 200, 320, 216))
    out = pipe("a red cat", image, small, num_inference_steps=2, generator=torch.Generator())
    (x0, y0, x1, y1) = out.crop_box
    assert not out.zoomed and (x1 - x0, y1 - y0) == (native, native)
    kept = pipe("a red cat", image, big, num_inference_steps=2, crop_to_mask=True)
    assert not kept.zoomed  # crop_to_mask=True keeps the crop at the box's own scale


def _big_frame_edit(folder) -> list[str]:
    """`blendedit edit` arguments (but --out) for a 600x400 frame with a 150x100 mask saved in
    ``folder``."""
    image, big = random_frame(600, 400, (200, 150, 350, 250))
    image.save(folder / "in.png")
    Image.fromarray(big.astype(np.uint8) * 255).save(folder / "m.png")
    args = ["edit", str(folder / "in.png"), "--mask", str(folder / "m.png"), "--prompt"]
    return args + ["a red cat", "--model", "tiny-random", "--steps", "2", "--quiet"]


def test_the_sidecar_says_whether_the_region_was_zoomed(tmp_path):
    args = _big_frame_edit(tmp_path)
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    meta = json.loads((tmp_path / "a" / "in.json").read_text())
    assert meta["zoomed"] is True and meta["options"]["crop_to_mask"] == "auto"
    assert main(args + ["--crop-to-mask", "crop", "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "in.json").read_text())["zoomed"] is False


def test_the_web_ui_says_when_the_region_was_zoomed(pipe, tmp_path):
    from blendedit.runner import LoadedModel, ModelSpec
    from blendedit.webui import EditSession, run_request

    loaded = LoadedModel(pipe, ModelSpec(model="tiny-random"), "tiny ranker", "cpu", "float32")
    session = EditSession(loaded, tmp_path / "serve")
    session.out_root.mkdir(parents=True)
    image, big = random_frame(600, 400, (200, 150, 350, 250))
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    layer.paste((255, 0, 0, 255), (200, 150, 350, 250))
    value = {"background": image.convert("RGBA"), "layers": [layer], "composite": None}
    options = dict(num_inference_steps=2, num_images_per_prompt=1, strength=1.0)
    items, _ = run_request(session, value, None, "a red cat", options, 0)
    assert "300x300 px box around the mask, at the model's own scale" in items[0][1]


def test_the_latents_file_keeps_the_boxs_part_of_the_mask_and_reconstructs(tmp_path):
    """A big frame's latents file holds the mask's crop box only (a 12-MP photo's whole mask
    would be 12 MB); `reconstruct` puts it back in the frame and redoes the same result."""
    from safetensors import safe_open

    args = _big_frame_edit(tmp_path)
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    meta = json.loads((tmp_path / "a" / "in.json").read_text())
    x0, y0, x1, y1 = meta["crop_box"]
    with safe_open(str(tmp_path / "a" / meta["latents"]), "pt") as f:
        assert tuple(f.get_slice("mask").get_shape()) == (y1 - y0, x1 - x0)
    sidecar = str(tmp_path / "a" / "in.json")
    assert main(["reconstruct", sidecar, "--background", "paste", "--quiet"]) == 0
    again = json.loads((tmp_path / "a" / "in-paste.json").read_text())
    first = (tmp_path / "a" / meta["results"][0]["file"]).read_bytes()
    assert (tmp_path / "a" / again["results"][0]["file"]).read_bytes() == first


def test_a_region_far_above_the_native_size_goes_through_the_vae_in_tiles(pipe):
    """crop_to_mask="crop" keeps a 300x200 px box at its own scale, 15x the tiny model's
    native area: the VAE encodes and decodes it in native-size tiles (its memory a tile's), the
    background stays exact, and the VAE's own settings come back after."""
    from conftest import edit_twice_and_check_paste

    from blendedit.latent_model import VAE_TILE_AREA

    seen = []  # the spatial size of every input the VAE's encoder and decoder get
    for part in (pipe.vae.encoder, pipe.vae.decoder):
        part.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    image, big = random_frame(600, 400, (200, 150, 350, 250))
    out = edit_twice_and_check_paste(pipe, image, big, num_inference_steps=2, crop_to_mask="crop")
    (x0, y0, x1, y1) = out.crop_box
    assert (x1 - x0) * (y1 - y0) > VAE_TILE_AREA * pipe.native_size**2 and not out.zoomed
    native, cells = pipe.native_size, pipe.native_size // pipe.vae_scale_factor
    assert seen and all(max(s) <= native for s in seen)  # tiles, never the whole box
    assert any(max(s) == cells for s in seen)  # the decoder's tiles: native-size latents
    assert not pipe.vae.use_tiling
    # a native-size edit is not tiled
    seen.clear()
    image, small = random_frame(64, 64)
    pipe("a red cat", image, small, num_inference_steps=2)
    assert seen == [(64, 64), (8, 8)]
