"""`blendedit serve`: a Gradio page over the library. Upload an image (or pick the shipped
example), paint the mask, type a prompt, press Edit; watch the denoising and get the ranked
results with their scores, each downloadable, and the whole set as a zip with its sidecar.

A thin layer: every handler calls :mod:`blendedit.runner` (the same path as `blendedit edit`),
and nothing else edits. One model instance serves every session; a lock and a queue of one
(``default_concurrency_limit=1``) keep two edits from racing on it. Errors become one readable
message in the page (``gr.Error``), never a traceback. Uploads are capped (``max_file_size``)
and images over the pixel limit refused. The server binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from .io import save_image
from .runner import EditRequest, LoadedModel, ModelSpec, int_or_auto, load_pipeline, run_edit

DEFAULT_HOST = "127.0.0.1"
DEFAULT_MAX_FILE_SIZE = "50mb"
#: Images over this many pixels are refused in the web UI (the CLI's limit is larger).
WEB_MAX_PIXELS = 25_000_000  # a 24-MP camera; the crop to the mask keeps edits fast
PREVIEW_EVERY = 1  # decode a preview at most every N steps (and about 10 in all)
EDITOR_CANVAS = (800, 800)
#: The page's "Edit area" choices: their crop_to_mask values.
EDIT_AREAS = {"auto": "auto", "whole image": False, "box around the mask": True, "zoom": "zoom"}
LATENT_LABEL = "latent (Blended Latent Diffusion)"
PIXEL_LABEL = (
    "pixel (Blended Diffusion)"  # the editor's blank canvas: painting with no image gives this
)


class EditError(ValueError):
    """A request the page cannot run (shown as a message)."""


@dataclass
class EditSession:
    """The shared model and where results go; one per server."""

    loaded: LoadedModel  # the latent method's pipeline
    out_root: Path
    lock: threading.Lock = field(default_factory=threading.Lock)  # held while a model runs
    pixel_spec: ModelSpec | None = None  # the pixel method's model, loaded on first use
    pixel: LoadedModel | None = None

    def model_for(self, method: str) -> LoadedModel:
        """The loaded model of ``method`` (call with the lock held)."""
        if method == "latent":
            return self.loaded
        if self.pixel is None:
            if self.pixel_spec is None:
                raise EditError(
                    "method: this server has no pixel model; start it with a built-in model "
                    "(toy) or --pixel-model"
                )
            self.pixel = load_pipeline(self.pixel_spec)
        return self.pixel

    def pixel_guidance_scale(self) -> float:
        """The pixel model's own CLIP guidance (its blendedit.json, else the paper's), read
        without loading it."""
        from .models import pixel_edit_defaults
        from .pixel import PAPER_CLIP_GUIDANCE_SCALE

        own = pixel_edit_defaults(self.pixel_spec.model) if self.pixel_spec else {}
        return own.get("clip_guidance_scale", PAPER_CLIP_GUIDANCE_SCALE)

    def next_folder(self) -> Path:
        """A fresh folder for one request's inputs and results."""
        return Path(tempfile.mkdtemp(prefix="edit-", dir=self.out_root))


#: A composite pixel further than this (8-bit levels) from the image's is painted.
PAINT_TOLERANCE = 24


def mask_from_editor(value) -> tuple[Image.Image, Image.Image]:
    """(image, mask) from a Gradio ImageEditor value: the background is the image, every painted
    pixel of every layer (alpha > 0), and every pixel where the composite the page shows is not
    the image, is the mask. ``EditError`` names what is missing."""
    if not value or value.get("background") is None:
        raise EditError("image: upload an image (or pick the example) first")
    bg = value["background"]
    bg = bg if isinstance(bg, Image.Image) else Image.open(bg)
    size = bg.size
    if size[0] * size[1] > WEB_MAX_PIXELS:
        raise EditError(
            f"image: {size[0]}x{size[1]} is over the pixel limit {WEB_MAX_PIXELS:,} of this "
            "page; downscale it first (the command line takes larger images)"
        )
    if size == EDITOR_CANVAS and bg.convert("RGB").getextrema() == (
        (255, 255),
        (255, 255),
        (255, 255),
    ):
        raise EditError("image: upload an image (or pick the example) first; the canvas is blank")
    painted = np.zeros((size[1], size[0]), bool)
    for layer in value.get("layers") or []:
        if layer is None:
            continue
        layer = layer if isinstance(layer, Image.Image) else Image.open(layer)
        if layer.size != size:
            layer = layer.resize(size, Image.NEAREST)
        a = np.asarray(layer.convert("RGBA"))[..., 3]
        painted |= a > 0
    comp = value.get("composite")
    if comp is not None:  # a found region is drawn on the canvas but not always in ``layers``
        comp = comp if isinstance(comp, Image.Image) else Image.open(comp)
        if comp.size == size:
            on = np.asarray(comp.convert("RGB"), np.int16) - np.asarray(bg.convert("RGB"))
            painted |= np.abs(on).max(-1) > PAINT_TOLERANCE
    return bg.convert("RGB"), Image.fromarray(painted.astype(np.uint8) * 255, "L")


def run_request(
    session: EditSession,
    editor_value,
    mask_file,
    prompt: str,
    options: dict,
    seed: int | None,
    on_step=None,
    method: str = "latent",
) -> tuple[list[tuple[Image.Image, str]], list[str]]:
    """One edit from the page's values; returns (gallery items best first, downloadable files).

    Writes the inputs and outputs into a fresh folder, then calls the runner: the same checks,
    sampling, ranking and sidecar as `blendedit edit`."""
    image, painted = mask_from_editor(editor_value)
    folder = session.next_folder()
    save_image(image, folder / "inputs" / "image.png")
    if mask_file is not None:  # an uploaded mask wins over painting
        mask_path = folder / "inputs" / ("mask" + Path(str(mask_file)).suffix.lower())
        shutil.copyfile(mask_file, mask_path)
    else:
        mask_path = save_image(painted, folder / "inputs" / "mask.png")
    req = EditRequest(
        image=str(folder / "inputs" / "image.png"),
        mask=str(mask_path),
        prompt=prompt or "",
        seed=None if seed is None or seed < 0 else int(seed),
        options=options,
        resize_mask=mask_file is not None,
        max_pixels=WEB_MAX_PIXELS,
    )
    with session.lock:  # one edit at a time on the shared model
        written, sidecar = run_edit(
            session.model_for(method),
            req,
            folder / "results",
            command="serve",
            warn=lambda w: None,
            callback=None if on_step is None else (lambda i, t, z: on_step(i, z)),
        )
    results = [p for p in written if p.suffix == ".png" and not p.name.endswith("-sheet.png")]
    scores = [r["score"] for r in sidecar["results"]]
    items = [
        (Image.open(p).copy(), f"#{i + 1}" + ("" if s is None else f"  CLIP {s:.3f}"))
        for i, (p, s) in enumerate(zip(results, scores))
    ]
    if items and sidecar.get("zoomed"):  # say how the region was generated
        x0, y0, x1, y1 = sidecar["crop_box"]
        note = f"  (the {x1 - x0}x{y1 - y0} px box around the mask, at the model's own scale)"
        items[0] = (items[0][0], items[0][1] + note)
    archive = folder / "results.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in written:
            z.write(p, p.name)
    return items, [str(p) for p in written] + [str(archive)]


def planned_steps(options: dict) -> int:
    """The denoising steps an edit with these page options runs (its progress bar's length)."""
    return max(1, int(options["num_inference_steps"] * options["strength"]))


def stream_request(
    session: EditSession, editor_value, mask_file, prompt, options, seed, method="latent"
):
    """Run :func:`run_request` in a thread and yield its events as they happen: ("step", (i,
    preview image or None)) during denoising, then ("done", (items, files)) or ("error", e)
    for bad input. Other exceptions (bugs) propagate."""
    import queue

    from .io import tensor_to_pil

    events: queue.Queue = queue.Queue()
    total = planned_steps(options)
    every = max(PREVIEW_EVERY, total // 10)

    def on_step(i, z):  # in the worker thread, inside the sampling loop
        img = None
        if i % every == 0 or i + 1 == total:
            if method == "latent":
                x = session.loaded.pipe.decode_latents(z[:1])
            else:  # the pixel method's x_t, in [-1, 1]
                x = (z[:1].float().clamp(-1, 1) + 1) / 2
            img = tensor_to_pil(x)[0]
        events.put(("step", (i, img)))

    def work():
        try:
            events.put(
                (
                    "done",
                    run_request(
                        session, editor_value, mask_file, prompt, options, seed, on_step, method
                    ),
                )
            )
        except ValueError as e:
            events.put(("error", e))
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            events.put(("bug", e))

    threading.Thread(target=work, daemon=True).start()
    while True:
        kind, payload = events.get()
        if kind == "bug":
            raise payload
        yield kind, payload
        if kind in ("done", "error"):
            return


#: The brush's colour (the editor's layer): a found mask is painted in it too.
BRUSH_RGB = (0xFF, 0x20, 0x60)


def find_region(session: EditSession, editor_value, text: str) -> dict:
    """The editor's value with the region ``text`` names painted in as its layer (the found
    mask, in the brush's colour, for the user to correct before pressing Edit)."""
    image, _ = mask_from_editor(editor_value)
    with session.lock:  # the shared model, one job at a time
        found = session.loaded.pipe.mask_from_text(image, text or "")
    layer = Image.new("RGBA", image.size, (*BRUSH_RGB, 0))
    layer.paste(Image.new("RGBA", image.size, (*BRUSH_RGB, 255)), mask=found.mask)
    composite = image.convert("RGBA")
    composite.alpha_composite(layer)
    return {"background": image.convert("RGBA"), "layers": [layer], "composite": composite}


def build_app(session: EditSession, examples: list[str] | None = None):
    """The Gradio Blocks app over ``session`` (not launched)."""
    import gradio as gr

    from .latent import LatentEditOptions

    d = LatentEditOptions()
    with gr.Blocks(title="blendedit") as app:
        gr.Markdown(
            "# blendedit\nUpload an image, **paint the region to edit** with the brush (or "
            "type what it shows and press **Find the region**, or upload a mask: white = edit), "
            "describe what should be there, press **Edit**. Everything outside the mask is "
            "kept, pixel for pixel."
        )
        with gr.Row():
            with gr.Column():
                editor = gr.ImageEditor(
                    label="Image and mask (paint the region to edit)",
                    type="pil",
                    image_mode="RGBA",
                    sources=["upload", "clipboard"],
                    format="png",
                    transforms=[],
                    layers=False,
                    canvas_size=EDITOR_CANVAS,
                    brush=gr.Brush(
                        colors=["#" + bytes(BRUSH_RGB).hex()], color_mode="fixed", default_size=12
                    ),
                    eraser=gr.Eraser(default_size=12),
                    elem_id="editor",
                )
                with gr.Row():
                    find_text = gr.Textbox(
                        label="Or find the region from words",
                        placeholder="the blue square",
                        elem_id="find-text",
                        max_lines=1,
                        scale=3,
                    )
                    find_button = gr.Button("Find the region", elem_id="find-button", scale=1)
                mask_file = gr.File(
                    label="Or upload a mask (white = edit)",
                    file_types=["image"],
                    type="filepath",
                    elem_id="mask-file",
                )
                prompt = gr.Textbox(
                    label="Prompt", placeholder="a red circle", elem_id="prompt", max_lines=2
                )
                method = gr.Radio(
                    [LATENT_LABEL] + ([PIXEL_LABEL] if session.pixel_spec else []),
                    value=LATENT_LABEL,
                    label="Method",
                    elem_id="method",
                )
                with gr.Accordion("Options", open=False):
                    steps = gr.Slider(1, 200, value=d.num_inference_steps, step=1, label="Steps")
                    n = gr.Slider(1, 16, value=4, step=1, label="Number of results")
                    seed = gr.Number(value=0, precision=0, label="Seed (-1: random)")
                    strength = gr.Slider(0.05, 1.0, value=d.strength, step=0.05, label="Strength")
                    guidance = gr.Slider(
                        0,
                        20,
                        value=session.loaded.pipe.default_guidance_scale,
                        step=0.5,
                        label="Guidance scale",
                    )
                    shrink = gr.Dropdown(
                        ["auto", *map(str, range(7))],
                        value=str(d.shrink_iterations),
                        label="Mask shrinking (k; auto: 3 at 512 px, 0 for the toy model)",
                    )
                    from .background import BACKGROUND_METHODS

                    background = gr.Dropdown(
                        list(BACKGROUND_METHODS), value=d.background, label="Background"
                    )
                    area = gr.Dropdown(
                        list(EDIT_AREAS),
                        value="auto",
                        label="Edit area (zoom: the box around the mask at the model's full "
                        "resolution, as 'inpaint only masked')",
                        elem_id="edit-area",
                    )
                    clip_scale = gr.Slider(
                        0,
                        5000,
                        value=session.pixel_guidance_scale(),
                        step=50,
                        label="CLIP guidance scale (pixel method)",
                    )
                button = gr.Button("Edit", variant="primary", elem_id="edit-button")
                if examples:
                    gr.Examples(examples=[[e] for e in examples], inputs=[editor], label="Examples")
            with gr.Column():
                preview = gr.Image(
                    label="Live preview (the edited region while it denoises, then the best)",
                    type="pil",
                    elem_id="preview",
                    height=256,
                )
                gallery = gr.Gallery(
                    label="Results, best first",
                    columns=2,
                    elem_id="gallery",
                    format="png",
                    object_fit="contain",
                )
                files = gr.File(label="Downloads", file_count="multiple", elem_id="downloads")

        def edit(  # the API's parameter names: the CLI's (gradio_client users see these)
            image,
            mask,
            prompt,
            method,
            num_inference_steps,
            num_images_per_prompt,
            seed,
            strength,
            guidance_scale,
            shrink_iterations,
            background,
            crop_to_mask,
            clip_guidance_scale,
            progress=gr.Progress(),
        ):
            how = "pixel" if method == PIXEL_LABEL else "latent"
            options = dict(
                num_inference_steps=int(num_inference_steps),
                num_images_per_prompt=int(num_images_per_prompt),
                strength=float(strength),
            )
            if how == "latent":
                options |= dict(
                    guidance_scale=float(guidance_scale),
                    shrink_iterations=int_or_auto("shrink_iterations", str(shrink_iterations)),
                    background=background,
                    crop_to_mask=EDIT_AREAS[crop_to_mask],
                )
            else:
                options |= dict(clip_guidance_scale=float(clip_guidance_scale))
            seed_value = None if seed is None else int(seed)
            total = planned_steps(options)
            events = stream_request(session, image, mask, prompt, options, seed_value, how)
            for kind, payload in events:
                if kind == "step":
                    i, img = payload
                    progress((i + 1, total), desc="denoising")
                    if img is not None:
                        yield img, gr.skip(), gr.skip()
                elif kind == "error":  # bad input: a message in the page, never a traceback
                    raise gr.Error(" ".join(str(payload).split()), duration=None)
                else:
                    items, paths = payload
                    yield items[0][0], items, paths

        def find(image, mask_prompt):
            try:
                return find_region(session, image, mask_prompt)
            except ValueError as e:  # EditError, an empty text, a text that matches nothing
                raise gr.Error(" ".join(str(e).split()), duration=None) from None

        find_button.click(
            find,
            inputs=[editor, find_text],
            outputs=[editor],
            concurrency_limit=1,
            api_name="find_region",
        )
        button.click(
            edit,
            inputs=[
                editor,
                mask_file,
                prompt,
                method,
                steps,
                n,
                seed,
                strength,
                guidance,
                shrink,
                background,
                area,
                clip_scale,
            ],
            outputs=[preview, gallery, files],
            concurrency_limit=1,
            api_name="edit",
        )
    return app


def serve(
    spec: ModelSpec,
    host: str = DEFAULT_HOST,
    port: int | None = None,
    *,
    out: str | None = None,
    max_file_size: str = DEFAULT_MAX_FILE_SIZE,
    block: bool = True,
    pixel_model: str | None = None,
):
    """Load the model once and launch the page; returns (app, url) when ``block`` is False.
    The built-in ``toy`` falls back to ``tiny-random`` (with a notice) until it ships. The
    pixel method is offered with a built-in model, or with ``pixel_model`` (loaded on first
    use; ``spec.rank_model`` is its CLIP)."""
    import sys

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from . import models
    from .demo import write_example

    if spec.model == "toy" and not models.toy_shipped():
        print(
            "blendedit serve: the shipped Shapes World model is not in this checkout yet; "
            "serving 'tiny-random' (untrained: edits are noise in the mask)",
            file=sys.stderr,
        )
        spec = replace(spec, model="tiny-random")
    loaded = load_pipeline(spec, num_images=4)
    root = Path(out) if out else Path(tempfile.mkdtemp(prefix="blendedit-serve-"))
    root.mkdir(parents=True, exist_ok=True)
    example, _ = write_example(root / "example")
    pixel_spec = None  # the pixel method: a built-in model has one, else --pixel-model
    if pixel_model or spec.model in models.BUILTIN_MODELS:
        pixel_spec = replace(spec, model=pixel_model or spec.model, method="pixel")
    session = EditSession(loaded, root, pixel_spec=pixel_spec)
    app = build_app(session, examples=[str(example)])
    app.queue(default_concurrency_limit=1)
    _, url, _ = app.launch(
        server_name=host,
        server_port=port,
        max_file_size=max_file_size,
        prevent_thread_lock=not block,
        allowed_paths=[str(root)],
        quiet=not block,
        footer_links=[],
    )
    return app, url
