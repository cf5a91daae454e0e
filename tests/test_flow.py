"""Flow-matching models on the latent path (issue 30): tiny random Stable Diffusion 3 (no T5,
and with one) and Flux (guidance-distilled, and not) folders built offline; the blend at the
flow-matching sampler's exact sigma."""

import json

import numpy as np
import pytest
import torch
from conftest import check_bench_with_baselines, edit_twice_and_check_paste
from PIL import Image

from blendedit import BlendedLatentDiffusionPipeline
from blendedit.cli import main
from blendedit.tiny import save_tiny_flux, save_tiny_sd3


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    return save_tiny_sd3(tmp_path_factory.mktemp("sd3") / "pipe")


@pytest.fixture(scope="module")
def sd3(sd3_folder):
    return BlendedLatentDiffusionPipeline.from_pretrained(str(sd3_folder))


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    return save_tiny_flux(tmp_path_factory.mktemp("flux") / "pipe")


@pytest.fixture(scope="module")
def flux(flux_folder):
    return BlendedLatentDiffusionPipeline.from_pretrained(str(flux_folder))


@pytest.fixture(params=["sd3", "flux"])
def flow(request):
    return request.getfixturevalue(request.param)


def _inputs(size=64):
    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(size, size, 3) * 255).astype(np.uint8))
    mask = np.zeros((size, size), bool)
    mask[16:48, 16:40] = True
    return image, mask


def test_the_folder_is_detected_as_a_flow_model_with_a_shifted_16_channel_vae(sd3):
    assert sd3.family == "sd3" and sd3.is_flow and sd3.text_encoder_3 is None
    assert type(sd3.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert sd3.vae.config.latent_channels == 16 and sd3.vae.config.shift_factor
    x = torch.rand(1, 3, 64, 64)
    raw = sd3.vae.encode(2 * x - 1).latent_dist.mode()
    z = sd3.encode_image(x)  # z = (E(x) - shift) * scale
    cfg = sd3.vae.config
    assert torch.allclose(z, (raw - cfg.shift_factor) * cfg.scaling_factor, atol=1e-5)


def test_paste_keeps_every_pixel_and_latent_outside_and_seeds_reproduce(flow):
    image, mask = _inputs()
    a = edit_twice_and_check_paste(flow, image, mask, num_inference_steps=4, guidance_scale=5.0)
    keep = a.latent_mask[0, 0] == 0
    assert torch.equal(a.latents[:, :, keep], a.source_latents.expand(2, -1, -1, -1)[:, :, keep])
    assert not torch.equal(
        a.latents[:, :, ~keep], a.source_latents.expand(2, -1, -1, -1)[:, :, ~keep]
    )


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_the_background_sits_at_the_samplers_sigma_after_every_step(flow, strength):
    """After step i the sampler is at sigma_{i+1}; outside the mask the latents are exactly
    (1 - sigma) z_src + sigma noise at that sigma, and the clean source after the last step."""
    image, mask = _inputs()
    seen = []

    def callback(i, t, z):
        k = flow.scheduler.step_index  # the sampler's own position after this step
        seen.append((i, float(flow.scheduler.sigmas[k]), z.clone()))

    out = flow(
        "a red cat",
        image,
        mask,
        num_inference_steps=6,
        strength=strength,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(3),
        callback=callback,
    )
    z_src = out.source_latents
    noise = torch.randn(z_src.shape, generator=torch.Generator().manual_seed(3))
    keep = out.latent_mask[0, 0] == 0
    assert len(seen) == round(6 * strength)
    sigmas = []
    for i, sigma, z in seen:
        want = z_src if i == len(seen) - 1 else (1 - sigma) * z_src + sigma * noise
        assert torch.allclose(z[..., keep], want[..., keep], atol=1e-6), i
        sigmas.append(sigma)
    assert sigmas == sorted(sigmas, reverse=True) and sigmas[-1] == 0.0
    if strength == 0.5:  # the last half of the shifted schedule: it starts below sigma 1
        assert flow.scheduler.sigmas[flow.scheduler.begin_index] < 1


def test_a_resolution_dependent_shift_grows_with_the_latent_grid(sd3):
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = BlendedLatentDiffusionPipeline.__new__(BlendedLatentDiffusionPipeline)
    pipe.__dict__.update(sd3.__dict__)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    mids = []
    for side in (16, 64, 128):
        pipe.timesteps_for(10, 1.0, (side, side))
        mids.append(float(pipe.scheduler.sigmas[5]))
    assert mids[0] < mids[1] < mids[2]  # more patches: more of the schedule at high noise


def test_cli_edits_with_an_sd3_folder(sd3_folder, tmp_path):
    image, mask = _inputs()
    image.save(tmp_path / "in.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "m.png")
    args = ["edit", str(tmp_path / "in.png"), "--mask", str(tmp_path / "m.png"), "--prompt"]
    args += ["a red cat", "--model", str(sd3_folder), "--steps", "3", "--seed", "4", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    meta = json.loads((tmp_path / "a" / "in.json").read_text())
    assert meta["model"] == str(sd3_folder) and meta["scheduler"].startswith("flow-match")
    a = np.asarray(Image.open(tmp_path / "a" / "in-01-seed4.png"))
    b = np.asarray(Image.open(tmp_path / "b" / "in-01-seed4.png"))
    assert np.array_equal(a, b) and np.array_equal(a[~mask], np.asarray(image)[~mask])


def test_reconstruct_and_the_decoder_background_work_on_sd3(sd3_folder, sd3, tmp_path):
    image, mask = _inputs()
    image.save(tmp_path / "in.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "m.png")
    args = ["edit", str(tmp_path / "in.png"), "--mask", str(tmp_path / "m.png"), "--prompt"]
    args += ["a red cat", "--model", str(sd3_folder), "--steps", "2", "--seed", "4", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    again = ["reconstruct", str(tmp_path / "a" / "in.json"), "--background", "poisson", "--quiet"]
    assert main(again) == 0
    out = sd3(
        "a red cat",
        image,
        mask,
        num_inference_steps=2,
        background="decoder",
        decoder_steps=2,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.reconstruction is not None and out.images[0].size == image.size


def test_t5_conditions_sd3_when_the_folder_has_it_and_is_optional(tmp_path):
    from blendedit.tokenizer import build_t5_like_tokenizer

    tok = build_t5_like_tokenizer(["a", "red", "blue", "cat"])
    assert tok("a red cat").input_ids != tok("a blue cat").input_ids  # distinct ids, </s> last
    assert tok("a red cat").input_ids[-1] == tok.eos_token_id
    pipe = BlendedLatentDiffusionPipeline.from_pretrained(
        str(save_tiny_sd3(tmp_path / "p", t5=True))
    )
    assert type(pipe.text_encoder_3).__name__ == "T5EncoderModel"
    red, pooled, _ = pipe.encode_prompt("a red cat", "", 1, True)
    blue, _, _ = pipe.encode_prompt("a blue cat", "", 1, False)
    assert red.shape == (2, 77 + 256, 96) and pooled.shape == (2, 32 + 48)
    assert not torch.equal(red[1:, 77:], blue[:, 77:])  # T5's states follow the CLIPs'
    pipe.text_encoder_3 = None  # without T5 (as diffusers' text_encoder_3=None): zeros
    no_t5, _, _ = pipe.encode_prompt("a red cat", "", 1, False)
    assert no_t5.shape == (1, 77 + 77, 96) and not no_t5[:, 77:].any()
    assert torch.equal(no_t5[:, :77], red[1:, :77])
    image, mask = _inputs()
    out = pipe("a red cat", image, mask, num_inference_steps=2, generator=torch.Generator())
    assert np.array_equal(np.asarray(out.images[0])[~mask], np.asarray(image)[~mask])


def test_flux_is_detected_with_its_guidance_input_and_packs_as_diffusers_does(flux):
    from diffusers import FluxPipeline

    from blendedit.denoisers import image_ids, pack, unpack

    assert flux.family == "flux" and flux.is_flow and flux.distilled_guidance
    assert flux.default_guidance_scale == 3.5 and flux.pad_multiple == 16
    z = torch.randn(2, 16, 6, 8)
    assert torch.equal(pack(z), FluxPipeline._pack_latents(z, 2, 16, 6, 8))
    assert torch.equal(unpack(pack(z), 6, 8), z)
    ref = FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32)
    assert torch.equal(image_ids(6, 8, "cpu", torch.float32), ref)


def test_flux_takes_the_guidance_scale_as_input_not_as_two_passes(flux, monkeypatch):
    image, mask = _inputs(56)  # 56 px: padded to 64 (a multiple of 16 for 2x2 patches)
    calls, real = [], flux.unet.forward

    def forward(*a, **kw):
        calls.append((kw["hidden_states"].shape, kw["guidance"], kw["img_ids"].shape))
        return real(*a, **kw)

    monkeypatch.setattr(flux.unet, "forward", forward)
    out = flux("a red cat", image, mask[:56, :56], num_inference_steps=2, guidance_scale=4.0)
    assert len(calls) == 2  # one pass per step: no classifier-free guidance rows
    shape, guidance, ids = calls[0]
    assert shape == (1, 16, 64) and ids == (16, 3) and guidance.tolist() == [4.0]
    assert np.array_equal(
        np.asarray(out.images[0])[~mask[:56, :56]], np.asarray(image)[~mask[:56, :56]]
    )


def test_flux_without_guidance_embedding_uses_classifier_free_guidance(tmp_path):
    pipe = BlendedLatentDiffusionPipeline.from_pretrained(
        str(save_tiny_flux(tmp_path / "schnell", guidance_embeds=False))
    )
    assert not pipe.distilled_guidance
    embeds, pooled, _ = pipe.encode_prompt("a red cat", "", 1, True)
    assert embeds.shape == (2, 512, 96) and pooled.shape == (2, 32)
    image, mask = _inputs()
    a = pipe(
        "a red cat",
        image,
        mask,
        num_inference_steps=2,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
    )
    b = pipe(
        "a red cat",
        image,
        mask,
        num_inference_steps=2,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert not np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


def test_cli_edits_with_a_flux_folder(flux_folder, tmp_path):
    image, mask = _inputs()
    image.save(tmp_path / "in.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "m.png")
    args = ["edit", str(tmp_path / "in.png"), "--mask", str(tmp_path / "m.png"), "--prompt"]
    args += ["a red cat", "--model", str(flux_folder), "--steps", "2", "--seed", "4", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    meta = json.loads((tmp_path / "a" / "in.json").read_text())
    assert meta["options"]["guidance_scale"] == 3.5  # the model's own default
    a = np.asarray(Image.open(tmp_path / "a" / "in-01-seed4.png"))
    assert np.array_equal(a[~mask], np.asarray(image)[~mask])


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_single_original_format_file_edits_as_its_folder(family, request, tmp_path):
    """The transformer saved under its original names (SD3's ``model.diffusion_model.
    joint_blocks``, Flux's bare ``double_blocks``/``single_blocks``) loads with --config giving
    the rest: every weight back, the same images as the folder; diffusers' own readers of these
    files agree on the names (its Flux reader assumes FLUX.1's width, so it cannot load a tiny
    one: the names are checked by its model-type detection)."""
    from diffusers.loaders import single_file_utils as sfu
    from safetensors.torch import save_file

    from blendedit.ldm_format import transformer_to_original

    folder, pipe = request.getfixturevalue(f"{family}_folder"), request.getfixturevalue(family)
    state = pipe.unet.state_dict()
    original = transformer_to_original(family, state)
    if family == "sd3":
        assert all(k.startswith("model.diffusion_model.") for k in original)
        theirs = sfu.convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
        assert set(theirs) == set(state) and all(torch.equal(theirs[k], state[k]) for k in state)
    else:
        assert sfu.infer_diffusers_model_type(original) == "flux-dev"
    f = tmp_path / f"{family}.safetensors"
    save_file(original, str(f))
    single = BlendedLatentDiffusionPipeline.from_pretrained(str(f), config=str(folder))
    assert single.family == family
    assert all(torch.equal(v, state[k]) for k, v in single.unet.state_dict().items())

    image, mask = _inputs()
    image.save(tmp_path / "in.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "m.png")
    args = ["edit", str(tmp_path / "in.png"), "--mask", str(tmp_path / "m.png"), "--prompt"]
    args += ["a red cat", "--steps", "2", "--seed", "4", "--quiet"]
    assert main(args + ["--model", str(folder), "--out", str(tmp_path / "a")]) == 0
    assert (
        main(args + ["--model", str(f), "--config", str(folder), "--out", str(tmp_path / "b")]) == 0
    )
    a = np.asarray(Image.open(tmp_path / "a" / "in-01-seed4.png"))
    b = np.asarray(Image.open(tmp_path / "b" / "in-01-seed4.png"))
    assert np.array_equal(a, b)


@pytest.mark.parametrize("family", ["sd3", pytest.param("flux", marks=pytest.mark.slow)])
def test_bench_runs_with_diffusers_baselines_of_the_family(family, request, tmp_path):
    check_bench_with_baselines(request.getfixturevalue(f"{family}_folder"), tmp_path)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_batch_and_the_web_uis_handler_edit_with_the_family(family, request, tmp_path):
    """The batch runner and the web UI's request handler take these folders unchanged: every
    row done, every pixel outside each mask kept."""
    from blendedit.batch import run_batch
    from blendedit.runner import EditRequest, LoadedModel, ModelSpec
    from blendedit.toy.tasks import write_manifest
    from blendedit.webui import EditSession, run_request

    folder, pipe = request.getfixturevalue(f"{family}_folder"), request.getfixturevalue(family)
    spec = ModelSpec(model=str(folder))
    manifest = write_manifest(tmp_path / "in", 2, size=64)
    opts = EditRequest(image="", prompt="", options={"num_inference_steps": 2})
    report = run_batch(manifest, tmp_path / "out", spec, opts, progress=False)
    assert report.counts == {"ok": 2}
    rows = (tmp_path / "out" / "summary.jsonl").read_text().splitlines()
    for line, task in zip(rows, manifest.read_text().splitlines()):
        e, t = json.loads(line), json.loads(task)
        src = np.asarray(Image.open(manifest.parent / t["image"]))
        keep = np.asarray(Image.open(manifest.parent / t["mask"])) == 0
        assert e["status"] == "ok" and np.array_equal(
            np.asarray(Image.open(e["best"]))[keep], src[keep]
        )

    image, mask = _inputs()
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    layer.paste((255, 0, 0, 255), (16, 16, 40, 48))
    value = {"background": image.convert("RGBA"), "layers": [layer], "composite": None}
    session = EditSession(LoadedModel(pipe, spec, "none", "cpu", "float32"), tmp_path / "serve")
    session.out_root.mkdir(parents=True)
    options = dict(num_inference_steps=2, num_images_per_prompt=1, background="paste")
    items, _ = run_request(session, value, None, "a red cat", options, 3, lambda i, z: None)
    assert np.array_equal(np.asarray(items[0][0])[~mask], np.asarray(image)[~mask])
