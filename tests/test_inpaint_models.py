"""Inpainting checkpoints (issue 39): SD / SDXL UNets with 9 input channels and Flux Fill
transformers, as tiny random folders laid out as the real ones. The model gets its own
conditioning in diffusers' layout, Blended Latent Diffusion's blend runs on top, and every path
(CLI, single files, bench) takes them."""

import json

import numpy as np
import pytest
import torch
from conftest import edit_twice_and_check_paste
from PIL import Image

from blendedit import BlendedLatentDiffusionPipeline
from blendedit.cli import main

KINDS = ["sd", "sdxl", "flux"]
LABELS = {
    "sd": "a Stable Diffusion 1.x/2.x inpainting UNet (9 input channels)",
    "sdxl": "an SDXL inpainting UNet (9 input channels)",
    "flux": "a Flux Fill transformer",
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from blendedit.tiny import save_tiny_inpaint

    root = tmp_path_factory.mktemp("inpaint")
    return {k: save_tiny_inpaint(root / k, k) for k in KINDS}


@pytest.fixture(scope="module")
def pipes(folders):
    return {k: BlendedLatentDiffusionPipeline.from_pretrained(str(f)) for k, f in folders.items()}


def _inputs(w=64, h=64):
    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8))
    mask = np.zeros((h, w), bool)
    mask[h // 4 : 3 * h // 4, w // 4 : w // 2 + 8] = True
    return image, mask


@pytest.mark.parametrize("kind", KINDS)
def test_the_folder_is_detected_as_its_inpainting_kind(kind, pipes):
    pipe = pipes[kind]
    assert pipe.family == kind
    assert pipe.inpaint == ("fill" if kind == "flux" else "unet9")
    assert pipe.adapter.label == LABELS[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_paste_keeps_the_background_and_seeds_reproduce(kind, pipes):
    image, mask = _inputs()
    out = edit_twice_and_check_paste(pipes[kind], image, mask, num_inference_steps=2)
    assert len(out.images) == 2 and out.images[0].size == image.size


@pytest.mark.parametrize("kind", KINDS)
def test_the_conditioning_changes_the_edit(kind, pipes, monkeypatch):
    """The mask and masked-image channels reach the denoiser: zeroing them changes the result."""
    pipe = pipes[kind]
    image, mask = _inputs()

    def run():
        g = torch.Generator().manual_seed(3)
        out = pipe("a red cat", image, mask, num_inference_steps=2, generator=g, background="none")
        return np.asarray(out.images[0]).astype(int)

    a = run()
    cls = type(pipe.adapter)
    real = cls.inpaint_condition
    monkeypatch.setattr(cls, "inpaint_condition", lambda self, *a: real(self, *a).zero_())
    assert np.abs(a - run()).max() > 0


def _record_first_input(model, monkeypatch) -> list:
    seen = []
    forward = model.forward

    def spy(*args, **kw):
        x = kw.get("hidden_states", args[0] if args else kw.get("sample"))
        seen.append(x.detach().clone())
        return forward(*args, **kw)

    monkeypatch.setattr(model, "forward", spy)
    return seen


@pytest.mark.parametrize("kind", KINDS)
def test_the_denoiser_gets_diffusers_layout(kind, pipes, monkeypatch):
    """The channels beside the latents are exactly what diffusers' inpainting pipeline of the
    family (StableDiffusion[XL]InpaintPipeline, FluxFillPipeline) gives the same denoiser for
    the same image and mask (the VAE's posterior mean in both, as blendedit encodes)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from blendedit.bench import diffusers_baselines

    pipe = pipes[kind]
    image, mask = _inputs()
    monkeypatch.setattr(
        DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode()
    )
    seen = _record_first_input(pipe.unet, monkeypatch)
    pipe(
        "a red cat", image, mask, num_inference_steps=1, generator=torch.Generator().manual_seed(0)
    )
    ours = seen[0]
    theirs_pipe = diffusers_baselines(pipe)[0]
    theirs_pipe.set_progress_bar_config(disable=True)
    seen.clear()
    m = Image.fromarray(mask.astype(np.uint8) * 255)
    theirs_pipe(
        "a red cat",
        image=image,
        mask_image=m,
        height=64,
        width=64,
        num_inference_steps=1,
        strength=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    )
    theirs = seen[0]
    if kind == "flux":  # tokens: 64 latent features, then 64 masked-latent and 256 mask ones
        assert ours.shape[-1] == theirs.shape[-1] == 384
        torch.testing.assert_close(ours[0, :, 64:], theirs[0, :, 64:], atol=1e-5, rtol=1e-4)
    else:  # channels: 4 latent, 1 mask, 4 masked-image latents
        assert ours.shape[1] == theirs.shape[1] == 9
        torch.testing.assert_close(ours[0, 4:], theirs[0, 4:], atol=1e-5, rtol=1e-4)
        assert set(ours[0, 4].unique().tolist()) == {0.0, 1.0}


def _save_file(kind, pipe, path):
    from safetensors.torch import save_file

    from blendedit.ldm_format import save_single_file, transformer_to_original

    if kind == "flux":
        save_file(transformer_to_original("flux", pipe.unet.state_dict()), str(path))
        return path
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    return save_single_file({k: getattr(pipe, k) for k in names if getattr(pipe, k)}, path)


@pytest.mark.parametrize("kind", KINDS)
def test_cli_edits_from_the_folder_and_a_single_file_alike(kind, folders, pipes, tmp_path):
    """`blendedit edit` writes ranked results and the sidecar (which names the kind); a single
    file saved from the folder, with the folder as --config, gives the same images."""
    image, mask = _inputs()
    image.save(tmp_path / "in.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "m.png")
    f = _save_file(kind, pipes[kind], tmp_path / f"{kind}.safetensors")
    args = ["edit", str(tmp_path / "in.png"), "--mask", str(tmp_path / "m.png"), "--prompt"]
    args += ["a red cat", "--steps", "2", "--seed", "4", "-n", "2", "--quiet"]
    folder = str(folders[kind])
    rank = ["--rank-model", str(_toy_clip())]
    assert main(args + rank + ["--model", folder, "--out", str(tmp_path / "a")]) == 0
    model = ["--model", str(f), "--config", folder]
    assert main(args + rank + model + ["--out", str(tmp_path / "b")]) == 0
    meta = json.loads((tmp_path / "a" / "in.json").read_text())
    assert meta["family"] == kind and meta["inpainting"] == pipes[kind].inpaint
    assert meta["ranked"] is True
    for k in ("01", "02"):
        a = np.asarray(Image.open(next((tmp_path / "a").glob(f"in-{k}-*.png"))))
        b = np.asarray(Image.open(next((tmp_path / "b").glob(f"in-{k}-*.png"))))
        assert np.array_equal(a, b)
        assert np.array_equal(a[~mask], np.asarray(image)[~mask])


def _toy_clip():
    from blendedit.models import TOY_DIR

    return TOY_DIR / "clip"


@pytest.mark.parametrize("kind", KINDS)
def test_a_file_of_the_other_kind_than_its_config_is_refused_by_name(kind, folders, tmp_path):
    """An inpainting file with a text-to-image config, and the other way round."""
    from blendedit.models import ModelNotFoundError
    from blendedit.tiny import save_tiny_flux, save_tiny_sdxl

    base = {
        "sd": lambda d: _sd_folder(d),
        "sdxl": lambda d: save_tiny_sdxl(d),
        "flux": lambda d: save_tiny_flux(d),
    }[kind](tmp_path / "base")
    inpaint = BlendedLatentDiffusionPipeline.from_pretrained(str(folders[kind]))
    f = _save_file(kind, inpaint, tmp_path / "inpaint.safetensors")
    word = "Flux Fill transformer" if kind == "flux" else "inpainting UNet"
    with pytest.raises(ModelNotFoundError, match=f"{word} checkpoint .* describes a text-to-image"):
        BlendedLatentDiffusionPipeline.from_pretrained(str(f), config=str(base))
    plain = BlendedLatentDiffusionPipeline.from_pretrained(str(base))
    g = _save_file(kind, plain, tmp_path / "plain.safetensors")
    with pytest.raises(ModelNotFoundError, match="text-to-image checkpoint .* an inpainting model"):
        BlendedLatentDiffusionPipeline.from_pretrained(str(g), config=str(folders[kind]))


def _sd_folder(folder):
    from conftest import save_sd_folder

    from blendedit.models import load_sd_components

    c = load_sd_components("tiny-random")
    save_sd_folder(
        folder, **{k: c[k] for k in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")}
    )
    return folder


def test_bench_runs_ours_against_diffusers_inpainting_pipeline(folders, tmp_path):
    """On an inpainting checkpoint `bench` compares ours with diffusers' inpainting pipeline
    (text-to-image and SDEdit cannot run its UNet: left out, and refused when named)."""
    folder = str(folders["sd"])
    args = ["bench", "--model", folder, "--rank-model", str(_toy_clip()), "--quiet"]
    args += ["--tasks", "1", "--steps", "2", "--samples", "1"]
    assert (
        main(args + ["--methods", "ours", "diffusers inpaint", "--out", str(tmp_path / "b")]) == 0
    )
    text = (tmp_path / "b" / "report.md").read_text()
    assert "| ours |" in text and "| diffusers inpaint |" in text
    bad = args + ["--methods", "ours", "text-to-image + paste", "--out", str(tmp_path / "c")]
    assert main(bad) == 2


def test_bench_asks_whether_blending_helps_an_inpainting_model(folders, tmp_path):
    """`--inpaint-model` runs our blend and diffusers' pipeline on it beside --model, on the
    same tasks; the report pairs the three and gives the background-in-mask figure."""
    from blendedit.bench_stats import INPAINT_OURS, INPAINT_THEIRS

    base = _sd_folder(tmp_path / "base")
    args = ["bench", "--model", str(base), "--inpaint-model", str(folders["sd"]), "--quiet"]
    args += ["--rank-model", str(_toy_clip()), "--tasks", "2", "--steps", "2", "--samples", "1"]
    args += ["--methods", "ours", INPAINT_OURS, INPAINT_THEIRS, "--out", str(tmp_path / "b")]
    assert main(args) == 0
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    assert [(d["a"], d["b"]) for d in results["inpainting"]] == [
        (INPAINT_OURS, "ours"),
        (INPAINT_OURS, INPAINT_THEIRS),
        ("ours", INPAINT_THEIRS),
    ]
    assert all("continuation_psnr" in row for row in results["per_task"][INPAINT_OURS])
    text = (tmp_path / "b" / "report.md").read_text()
    assert "does blending still help?" in text and f"| {INPAINT_THEIRS} |" in text
    bad = args[:2] + [str(base), "--inpaint-model", str(base)] + args[5:]
    assert main(bad[:-1] + [str(tmp_path / "c")]) == 2  # not an inpainting checkpoint


def test_an_sdxl_inpainting_model_takes_a_refiner(folders, tmp_path):
    """The refiner (a text-to-image UNet) runs the last steps without the inpainting input;
    the blend keeps the background all the same."""
    from blendedit.tiny import save_tiny_sdxl_refiner

    refiner = save_tiny_sdxl_refiner(tmp_path / "refiner")
    pipe = BlendedLatentDiffusionPipeline.from_pretrained(
        str(folders["sdxl"]), refiner=str(refiner)
    )
    calls = []
    real = pipe.refiner["unet"].forward
    pipe.refiner["unet"].forward = lambda x, *a, **kw: calls.append(x.shape[1]) or real(x, *a, **kw)
    image, mask = _inputs()
    edit_twice_and_check_paste(pipe, image, mask, num_inference_steps=4, refiner_fraction=0.5)
    assert calls and set(calls) == {4}  # latents only: no mask, no masked-image channels


@pytest.mark.parametrize("kind", KINDS)
def test_the_detail_pass_gives_each_sample_its_own_conditioning(kind, pipes, monkeypatch):
    """A detail pass (issue 44) encodes one region per sample: the inpainting channels come one
    row per sample, and the denoiser takes them with classifier-free guidance's two halves."""
    from conftest import random_frame

    pipe = pipes[kind]  # a 64-px native size for all (the tiny Flux's is 1024 px): zoomed
    monkeypatch.setattr(type(pipe), "native_size", property(lambda self: 64))
    image, mask = random_frame(600, 400, (200, 150, 350, 250))
    out = edit_twice_and_check_paste(pipe, image, mask, num_inference_steps=4, detail_strength=0.5)
    assert out.zoomed and out.detailed
