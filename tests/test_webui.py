"""The web UI: its handlers on a tiny model, and the page end to end in headless Chromium.

The browser test runs when Debian's chromium (/usr/bin/chromium, or BLENDEDIT_CHROMIUM) and
playwright are installed (`.ci/run` installs chromium; playwright is a test dependency).
``BLENDEDIT_SCREENSHOT=path`` also saves the page after an edit, and ``BLENDEDIT_WEBUI_MODEL``
serves another model in the browser tests than the tiny random one: docs/webui.png is
``BLENDEDIT_WEBUI_MODEL=toy BLENDEDIT_SCREENSHOT=docs/webui.png pytest tests/test_webui.py -k
end_to_end``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

from blendedit.demo import example_scene
from blendedit.runner import LoadedModel, ModelSpec
from blendedit.webui import EditError, EditSession, mask_from_editor, run_request

pytest.importorskip("gradio")

CHROMIUM = os.environ.get("BLENDEDIT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
OPTIONS = dict(
    num_inference_steps=4,
    num_images_per_prompt=2,
    strength=1.0,
    guidance_scale=7.5,
    shrink_iterations=3,
    background="paste",
)


def editor_value(image: Image.Image, box=(10, 40, 60, 90)) -> dict:
    """What Gradio's ImageEditor hands a handler: the image as background, strokes as a layer."""
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    if box:
        ImageDraw.Draw(layer).rectangle(box, fill=(255, 32, 96, 255))
    return {"background": image.convert("RGBA"), "layers": [layer], "composite": None}


@pytest.fixture
def session(pipe, tmp_path):
    loaded = LoadedModel(pipe, ModelSpec(model="tiny-random"), "tiny ranker", "cpu", "float32")
    return EditSession(loaded, tmp_path / "serve")


def test_painted_layers_are_the_mask_and_the_background_the_image():
    image, _ = example_scene()
    img, mask = mask_from_editor(editor_value(image))
    assert np.array_equal(np.asarray(img), np.asarray(image))
    m = np.asarray(mask) > 0
    assert m[40:91, 10:61].all() and m.sum() == 51 * 51
    with pytest.raises(EditError, match="image: upload an image"):
        mask_from_editor({"background": None, "layers": []})
    blank = Image.new("RGBA", (800, 800), (255, 255, 255, 255))
    with pytest.raises(EditError, match="the canvas is blank"):
        mask_from_editor(editor_value(blank))


def test_run_request_writes_ranked_results_and_keeps_the_background(session):
    image, _ = example_scene()
    (session.out_root).mkdir(parents=True)
    steps = []
    items, files = run_request(
        session, editor_value(image), None, "a red circle", OPTIONS, 3, lambda i, z: steps.append(i)
    )
    assert steps == [0, 1, 2, 3] and len(items) == 2
    assert [label.split()[0] for _, label in items] == ["#1", "#2"]
    names = [Path(f).name for f in files]
    assert "image.json" in names and "results.zip" in names
    meta = json.loads(Path(files[names.index("image.json")]).read_text())
    assert meta["prompt"] == "a red circle" and meta["seed"] == 3 and meta["command"] == "serve"
    _, mask = mask_from_editor(editor_value(image))
    keep = np.asarray(mask) == 0
    for img, _ in items:
        assert np.array_equal(np.asarray(img)[keep], np.asarray(image)[keep])


def test_the_guidance_slider_starts_at_the_models_default(session):
    import gradio as gr

    from blendedit.webui import build_app

    session.loaded.pipe.default_guidance_scale = 3.0  # as a folder's blendedit.json would set it
    app = build_app(session)
    sliders = [b for b in app.blocks.values() if isinstance(b, gr.Slider)]
    assert [b.value for b in sliders if b.label == "Guidance scale"] == [3.0]
    app.close()


def test_the_api_names_its_inputs_as_the_command_line_does(session):
    """A gradio_client user calls /edit with the CLI's names (not the page's internal ones)."""
    from blendedit.options import options_fields
    from blendedit.pixel import PixelEditOptions
    from blendedit.webui import build_app

    app = build_app(session)
    params = app.get_api_info()["named_endpoints"]["/edit"]["parameters"]
    names = [p["parameter_name"] for p in params]
    app.close()
    assert names[:4] == ["image", "mask", "prompt", "method"]
    known = {n for cls in (None, PixelEditOptions) for n, *_ in options_fields(cls)}
    assert set(names[4:]) - {"seed"} <= known, set(names[4:]) - known


def test_bad_input_is_a_value_error_naming_it(session):
    image, _ = example_scene()
    session.out_root.mkdir(parents=True)
    with pytest.raises(ValueError, match="mask: the mask is empty"):
        run_request(session, editor_value(image, box=None), None, "a red circle", OPTIONS, 0)
    with pytest.raises(ValueError, match="prompt: is empty"):
        run_request(session, editor_value(image), None, "", OPTIONS, 0)


def test_two_requests_at_once_both_complete_as_they_would_alone(session):
    session.out_root.mkdir(parents=True)
    image, _ = example_scene()
    jobs = [("a red circle", 1), ("a blue square", 2)]
    alone = [run_request(session, editor_value(image), None, p, OPTIONS, s)[0] for p, s in jobs]
    together: dict[int, list] = {}
    errors: list[BaseException] = []

    def go(k: int) -> None:
        try:
            together[k] = run_request(
                session, editor_value(image), None, *jobs[k][:1], OPTIONS, jobs[k][1]
            )[0]
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=go, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for k in range(2):
        assert [np.asarray(i).tobytes() for i, _ in together[k]] == [
            np.asarray(i).tobytes() for i, _ in alone[k]
        ]


def test_the_pixel_method_from_the_page_handlers(session):
    session.out_root.mkdir(parents=True)
    image, _ = example_scene()
    opts = dict(num_inference_steps=8, num_images_per_prompt=2, strength=0.75)
    with pytest.raises(EditError, match="no pixel model"):
        run_request(session, editor_value(image), None, "a red circle", opts, 0, method="pixel")
    session.pixel_spec = ModelSpec(model="tiny-random", method="pixel")
    steps = []
    items, files = run_request(
        session,
        editor_value(image),
        None,
        "a red circle",
        opts | dict(clip_guidance_scale=500.0),
        0,
        lambda i, z: steps.append(i),
        method="pixel",
    )
    assert len(items) == 2 and steps == list(range(6))
    meta = json.loads(Path(next(f for f in files if f.endswith(".json"))).read_text())
    assert meta["method"] == "pixel" and meta["options"]["clip_guidance_scale"] == 500.0
    _, mask = mask_from_editor(editor_value(image))
    keep = np.asarray(mask) == 0
    for img, _ in items:
        assert np.array_equal(np.asarray(img)[keep], np.asarray(image)[keep])


# --- in a real browser -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not (Path(CHROMIUM).exists() and shutil.which(CHROMIUM)):
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)")
    pytest.importorskip("playwright")
    from blendedit.webui import serve

    out = tmp_path_factory.mktemp("serve")
    app, url = serve(
        ModelSpec(model=os.environ.get("BLENDEDIT_WEBUI_MODEL", "tiny-random")),
        "127.0.0.1",
        _free_port(),
        out=str(out),
        block=False,
        max_file_size="1mb",
    )
    yield url, out
    app.close()


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _open_with_scene(browser, url: str, scene: Path):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    page.wait_for_selector("#editor canvas")
    zoom = page.locator("#editor").inner_text()
    page.locator("#editor input[type=file]").first.set_input_files(str(scene))
    # the editor re-zooms once the image is on its canvas
    page.wait_for_function(
        "z => document.querySelector('#editor').innerText !== z", arg=zoom, timeout=30_000
    )
    return page


def _paint(page, left: int = -110, rows=range(-30, 31, 10), steps: int = 6) -> None:
    """Brush strokes 70 px long from ``left`` px of the canvas's centre (by default over the
    empty left part of the example scene), one at each of ``rows`` px from the centre, each
    drawn in ``steps`` mouse moves (on a 12-MP canvas each move repaints for about a second)."""
    page.get_by_role("button", name="Brush", exact=True).click()
    box = page.locator("#editor canvas").first.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    for dy in rows:
        page.mouse.move(cx + left, cy + dy)
        page.mouse.down()
        page.mouse.move(cx + left + 70, cy + dy, steps=steps)
        page.mouse.up()


def _edit(page, prompt: str) -> None:
    page.locator("#prompt textarea, #prompt input").first.fill(prompt)
    page.locator("#edit-button").click()


def _sidecars(out: Path) -> dict[str, dict]:
    metas = [json.loads(p.read_text()) for p in out.glob("edit-*/results/*.json")]
    return {m["prompt"]: m for m in metas}


def test_page_edit_end_to_end(server, browser):
    url, out = server
    scene = out / "example" / "scene.png"
    page = _open_with_scene(browser, url, scene)
    _paint(page)
    _edit(page, "a red circle")
    page.wait_for_function("document.querySelectorAll('#gallery img').length >= 4", timeout=180_000)
    page.wait_for_function(
        "document.querySelector('#downloads').innerText.includes('.zip')", timeout=30_000
    )
    listed = " ".join(page.locator("#downloads").inner_text().split())
    assert "results .zip" in listed and "image .json" in listed  # name and suffix in two spans
    assert page.locator("#preview img").count() == 1  # the live preview, then the best result
    assert page.locator("#method").get_by_text("pixel (Blended Diffusion)").count() == 1
    meta = _sidecars(out)["a red circle"]
    assert meta["command"] == "serve" and len(meta["results"]) == 4
    folder = next(out.glob("edit-*/results/image.json")).parent.parent
    src = np.asarray(Image.open(folder / "inputs" / "image.png"))
    mask = np.asarray(Image.open(folder / "inputs" / "mask.png"))
    assert np.array_equal(src, np.asarray(Image.open(scene).convert("RGB")))  # lossless upload
    assert 0.05 < (mask > 0).mean() < 0.5  # the strokes, not the whole canvas
    best = np.asarray(Image.open(folder / "results" / meta["results"][0]["file"]))
    assert np.array_equal(best[mask == 0], src[mask == 0])
    if os.environ.get("BLENDEDIT_SCREENSHOT"):
        page.screenshot(path=os.environ["BLENDEDIT_SCREENSHOT"], full_page=True)
    page.close()


def test_page_without_a_mask_shows_the_error(server, browser):
    url, out = server
    page = _open_with_scene(browser, url, out / "example" / "scene.png")
    _edit(page, "a blue star")
    msg = page.get_by_text("mask: the mask is empty", exact=False)
    msg.first.wait_for(timeout=60_000)
    assert "Traceback" not in page.content()
    page.close()


@pytest.mark.slow
def test_two_pages_edit_at_once(server, browser):
    url, out = server
    pages = [_open_with_scene(browser, url, out / "example" / "scene.png") for _ in range(2)]
    prompts = ["a green square", "a purple cross"]
    for page in pages:
        _paint(page)
    # the second page edits a zoomed box around its strokes (Options, Edit area)
    pages[1].get_by_text("Options").first.click()
    pages[1].locator("#edit-area input").click()
    pages[1].get_by_role("option", name="zoom", exact=True).click()
    for page, prompt in zip(pages, prompts):
        _edit(page, prompt)
    for page in pages:
        page.wait_for_function(
            "document.querySelectorAll('#gallery img').length >= 4", timeout=300_000
        )
    metas = _sidecars(out)
    for prompt in prompts:
        assert len(metas[prompt]["results"]) == 4
    assert [metas[p]["options"]["crop_to_mask"] for p in prompts] == ["auto", "zoom"]
    for page in pages:
        page.close()


def test_uploads_over_the_limit_are_refused(server):
    import httpx

    url, _ = server
    big = b"\0" * (2 * 1024 * 1024)  # the test server's limit is 1 MB
    r = httpx.post(url.rstrip("/") + "/gradio_api/upload", files={"files": ("big.png", big)})
    assert r.status_code == 413, r.text


@pytest.fixture(scope="module")
def big_server(tmp_path_factory, browser):
    from blendedit.webui import serve

    out = tmp_path_factory.mktemp("serve-big")
    app, url = serve(
        ModelSpec(model="tiny-random"), "127.0.0.1", _free_port(), out=str(out), block=False
    )
    yield url, out
    app.close()


@pytest.mark.slow
def test_a_12_mp_photo_edits_and_downloads_at_full_size(big_server, browser, tmp_path):
    """Issue 44: a 4000x3000 camera JPEG stored on its side (EXIF orientation 6) goes up, is
    painted and edited upright, and the result that comes down is the whole upright photo, every
    pixel outside the strokes the upload's."""
    import zipfile
    from urllib.parse import urljoin

    url, out = big_server
    yy, xx = np.mgrid[0:3000, 0:4000].astype(np.float32)
    rgb = np.stack([xx / 4000, yy / 3000, 0.5 + 0.3 * np.sin(xx / 300) * np.cos(yy / 250)], -1)
    photo = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to show
    Image.fromarray((rgb * 255).astype(np.uint8)).save(photo, quality=92, exif=exif)
    page = _open_with_scene(browser, url, photo)
    _paint(page, left=-35, rows=(-5, 5), steps=2)  # the middle of the upright photo
    _edit(page, "a red circle")
    page.wait_for_function(
        "document.querySelector('#downloads').innerText.includes('.zip')", timeout=300_000
    )
    links = page.locator("#downloads a")
    hrefs = [links.nth(i).get_attribute("href") for i in range(links.count())]
    zipped = [h for h in hrefs if h and ".zip" in h]
    assert zipped, hrefs
    got = page.request.get(urljoin(url, zipped[0]))  # through the browser's own session
    assert got.ok, got.status
    archive = tmp_path / "results.zip"
    archive.write_bytes(got.body())
    folder = next(out.glob("edit-*/results/image.json")).parent.parent
    src = np.asarray(Image.open(folder / "inputs" / "image.png"))
    mask = np.asarray(Image.open(folder / "inputs" / "mask.png")) > 0
    assert src.shape == (4000, 3000, 3) and 0 < mask.mean() < 0.5  # upright
    upright = np.asarray(ImageOps.exif_transpose(Image.open(photo)), np.float32)
    assert np.abs(src - upright).mean() < 2.0  # the same pixels (up to the JPEG decoder)
    meta = json.loads((folder / "results" / "image.json").read_text())
    with zipfile.ZipFile(archive) as z:
        best = np.asarray(Image.open(z.open(meta["results"][0]["file"])).convert("RGB"))
    assert best.shape == src.shape  # the full photo, not the edited box
    assert np.array_equal(best[~mask], src[~mask])
    assert not np.array_equal(best[mask], src[mask])
    page.close()


@pytest.fixture(scope="module")
def toy_server(tmp_path_factory, browser):
    from blendedit.webui import serve

    out = tmp_path_factory.mktemp("serve-toy")
    app, url = serve(ModelSpec(model="toy"), "127.0.0.1", _free_port(), out=str(out), block=False)
    yield url, out
    app.close()


@pytest.mark.slow
def test_find_the_region_paints_it_into_the_editor_and_edits_from_it(toy_server, browser):
    """Issue 40: words find the region with the shipped model; it appears in the editor as a
    painted layer (the user could correct it) and the edit runs with it as the mask."""
    from blendedit.demo import EXAMPLE
    from blendedit.toy.world import coverage

    url, out = toy_server
    page = _open_with_scene(browser, url, out / "example" / "scene.png")
    page.locator("#find-text textarea, #find-text input").first.fill("a yellow triangle")
    page.locator("#find-button").click()
    import io
    import time

    deadline = time.monotonic() + 60
    while True:  # the found layer on screen, in the brush's colour (not just its swatch)
        shot = np.asarray(Image.open(io.BytesIO(page.locator("#editor").screenshot())))
        r, g, b = (shot[..., c].astype(int) for c in range(3))
        if ((r > 200) & (g < 90) & (b > 50) & (b < 150)).sum() > 5000:
            break
        assert time.monotonic() < deadline, "the found region never appeared in the editor"
        page.wait_for_timeout(500)
    _edit(page, "a red circle")
    page.wait_for_function(
        "document.querySelector('#downloads').innerText.includes('.zip')", timeout=180_000
    )
    folder = next(out.glob("edit-*/results/image.json")).parent.parent
    mask = np.asarray(Image.open(folder / "inputs" / "mask.png")) > 0
    triangle, square = (coverage(o, mask.shape[0]) > 0.5 for o in EXAMPLE.objects[::-1])
    assert (mask & triangle).sum() >= 0.8 * triangle.sum()  # the found region is the mask
    assert not (mask & square).any() and mask.mean() < 0.2
    meta = json.loads((folder / "results" / "image.json").read_text())
    src = np.asarray(Image.open(folder / "inputs" / "image.png"))
    best = np.asarray(Image.open(folder / "results" / meta["results"][0]["file"]))
    assert np.array_equal(best[~mask], src[~mask])
    page.close()
