import io as pyio

import numpy as np
import pytest
from PIL import Image

from blendedit import load_image, load_mask, save_image
from blendedit.io import save_json


def _save(img, path, **kw):
    img.save(path, **kw)
    return path


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "L", "P", "CMYK", "1"])
def test_load_image_every_mode_gives_rgb_of_same_size(tmp_path, mode):
    src = Image.new("RGB", (17, 9), (200, 40, 10)).convert(mode)
    ext = "jpg" if mode == "CMYK" else "png"
    out = load_image(_save(src, tmp_path / f"x.{ext}"))
    assert out.mode == "RGB" and out.size == (17, 9)


def test_load_image_16_bit_is_scaled_not_clipped(tmp_path):
    a = np.full((4, 4), 65535, np.uint16)
    a[0, 0] = 32896  # 128 * 257
    img = Image.fromarray(a)  # uint16 -> a 16-bit greyscale PNG
    out = np.asarray(load_image(_save(img, tmp_path / "x.png")))
    assert out[1, 1, 0] == 255 and out[0, 0, 0] == 128


def test_load_image_palette_with_transparency(tmp_path):
    img = Image.new("P", (8, 8), 0)
    img.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    img.info["transparency"] = 0
    out = load_image(_save(img, tmp_path / "p.png", transparency=0))
    assert out.getpixel((0, 0)) == (10, 20, 30)


def test_load_image_applies_exif_orientation(tmp_path):
    img = Image.new("RGB", (30, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (10, 30)


def test_load_image_accepts_arrays():
    a = np.zeros((5, 6, 3), np.float32)
    a[..., 1] = 1.0
    assert load_image(a).getpixel((0, 0)) == (0, 255, 0)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: p / "missing.png", "file not found"),
        (lambda p: (p / "empty.png").touch() or p / "empty.png", "empty file"),
        (
            lambda p: (p / "t.png").write_bytes(b"not an image at all") and p / "t.png",
            "not an image",
        ),
        (lambda p: p, "folder"),
    ],
)
def test_load_image_bad_files_raise_value_error_naming_image(tmp_path, make, match):
    with pytest.raises(ValueError, match=f"^image: .*{match}"):
        load_image(make(tmp_path))


def test_load_image_truncated_png(tmp_path):
    buf = pyio.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="PNG")
    (tmp_path / "t.png").write_bytes(buf.getvalue()[:60])
    with pytest.raises(ValueError, match="^image: "):
        load_image(tmp_path / "t.png")


def test_load_image_refuses_animation_and_pixel_bombs(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    with pytest.raises(ValueError, match="image: animated image with 2 frames"):
        load_image(tmp_path / "a.gif")
    Image.new("L", (100, 100)).save(tmp_path / "big.png")
    with pytest.raises(ValueError, match="image: .*limit"):
        load_image(tmp_path / "big.png", max_pixels=5000)
    assert load_image(tmp_path / "big.png", max_pixels=20000).size == (100, 100)


def test_load_mask_thresholds_soft_masks_at_half_unless_asked():
    a = np.array([[0.2, 0.49], [0.5, 0.9]], np.float32)
    assert (np.asarray(load_mask(a)) // 255).tolist() == [[0, 0], [1, 1]]
    soft = np.asarray(load_mask(a, threshold=None))
    assert soft.tolist() == [[51, 125], [128, 230]]
    assert (np.asarray(load_mask(a, threshold=0.8)) // 255).tolist() == [[0, 0], [0, 1]]


def test_load_mask_from_alpha_edits_transparent_pixels(tmp_path):
    img = Image.new("RGBA", (4, 4), (9, 9, 9, 255))
    img.putpixel((1, 2), (9, 9, 9, 0))
    m = np.asarray(load_mask(_save(img, tmp_path / "a.png"), from_alpha=True))
    assert m[2, 1] == 255 and m.sum() == 255
    with pytest.raises(ValueError, match="mask: from_alpha=True but the image has no alpha"):
        load_mask(Image.new("RGB", (4, 4)), from_alpha=True)


def test_load_mask_size_mismatch_is_an_error_unless_resize():
    image = Image.new("RGB", (8, 8))
    m = np.zeros((4, 4), np.float32)
    m[1:3, 1:3] = 1
    with pytest.raises(ValueError, match="mask: size 4x4 differs from the image's 8x8"):
        load_mask(m, image=image)
    r = np.asarray(load_mask(m, image=image, resize=True))
    assert r.shape == (8, 8) and r.sum() == 16 * 255


def test_load_mask_empty_and_inverted():
    with pytest.raises(ValueError, match="mask: the mask is empty"):
        load_mask(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="mask: the mask is empty"):
        load_mask(np.ones((4, 4), np.float32), invert=True)
    with pytest.raises(ValueError, match="threshold"):
        load_mask(np.ones((4, 4), np.float32), threshold=1.5)


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    img = Image.new("RGB", (4, 4), (1, 2, 3))
    p = save_image(img, tmp_path / "sub" / "o.png")
    save_json({"a": 1}, tmp_path / "sub" / "o.json")
    assert Image.open(p).getpixel((0, 0)) == (1, 2, 3)
    assert sorted(x.name for x in (tmp_path / "sub").iterdir()) == ["o.json", "o.png"]
    with pytest.raises(ValueError, match="extension"):
        save_image(img, tmp_path / "o.nope")
