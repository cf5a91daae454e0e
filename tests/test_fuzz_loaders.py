"""Property-based tests: ``load_image`` / ``load_mask`` on random and mutated bytes either
return a valid image or raise ``ValueError`` naming the argument; never anything else.

The suite runs a bounded number of examples (``FUZZ_EXAMPLES``, default 150 per test); a longer
run: ``FUZZ_EXAMPLES=2000 pytest tests/test_fuzz_loaders.py``.
"""

import io
import os
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from blendedit.io import load_image, load_mask

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples every run: the suite stays deterministic
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _seed_files() -> list[bytes]:
    """Small valid files of every kind a user might give: the mutation seeds."""
    rng = np.random.RandomState(0)
    rgb = Image.fromarray((rng.rand(12, 10, 3) * 255).astype(np.uint8), "RGB")
    out = []
    for fmt, img, kw in [
        ("PNG", rgb, {}),
        ("PNG", rgb.convert("RGBA"), {}),
        ("PNG", rgb.convert("P"), {"transparency": 0}),
        ("PNG", rgb.convert("L"), {}),
        ("PNG", Image.fromarray((rng.rand(8, 8) * 65535).astype(np.uint16)), {}),
        ("JPEG", rgb, {"quality": 80}),
        ("JPEG", rgb.convert("CMYK"), {}),
        ("GIF", rgb.convert("P"), {}),
        ("BMP", rgb, {}),
        ("TIFF", rgb, {}),
        ("WEBP", rgb, {}),
    ]:
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        out.append(buf.getvalue())
    frames = [rgb.convert("P"), rgb.rotate(90).convert("P")]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    out.append(buf.getvalue())
    return out


SEEDS = _seed_files()


@st.composite
def mutated(draw):
    """A seed file with bytes flipped, a run replaced, or cut short."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["flip", "splice", "truncate"]))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "splice":
            data[i : i + 8] = draw(st.binary(min_size=0, max_size=8))
        else:
            data = data[:i]
    return bytes(data)


ANY_BYTES = st.one_of(st.binary(min_size=0, max_size=600), mutated())


def _check(fn, path, name):
    t0 = time.perf_counter()
    try:
        out = fn(path)
    except ValueError as e:
        assert str(e).startswith(f"{name}:"), str(e)  # the message names the argument
    else:
        assert isinstance(out, Image.Image) and out.width > 0 and out.height > 0
        assert out.mode == ("RGB" if name == "image" else "L")
    assert time.perf_counter() - t0 < 5.0  # bounded time, whatever the bytes


@FUZZ
@given(data=ANY_BYTES)
def test_load_image_on_random_and_mutated_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "input.img"
    path.write_bytes(data)
    _check(load_image, path, "image")
    assert path.read_bytes() == data  # the input is never modified


@FUZZ
@given(data=ANY_BYTES, from_alpha=st.booleans(), invert=st.booleans())
def test_load_mask_on_random_and_mutated_bytes(tmp_path_factory, data, from_alpha, invert):
    path = tmp_path_factory.mktemp("fuzz") / "mask.img"
    path.write_bytes(data)
    _check(lambda p: load_mask(p, from_alpha=from_alpha, invert=invert), path, "mask")
    assert path.read_bytes() == data


@pytest.mark.parametrize("k", range(len(SEEDS)))
def test_every_seed_file_is_handled(tmp_path, k):
    """The unmutated seeds load (or, for the animation, are refused with the reason)."""
    path = tmp_path / "seed.img"
    path.write_bytes(SEEDS[k])
    if k == len(SEEDS) - 1:
        with pytest.raises(ValueError, match="animated"):
            load_image(path)
    else:
        assert load_image(path).mode == "RGB"


@pytest.mark.parametrize(
    "data",
    [
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\x00IHDR",  # PIL: ValueError 'Truncated IHDR chunk'
        SEEDS[7][:-40],  # a GIF cut inside its image data
    ],
)
def test_damaged_files_found_by_fuzzing_raise_value_error_naming_the_argument(tmp_path, data):
    path = tmp_path / "bad.png"
    path.write_bytes(data)
    for fn, name in ((load_image, "image"), (load_mask, "mask")):
        with pytest.raises(ValueError, match=f"^{name}: .* is damaged or truncated"):
            fn(path)
