"""Stable Diffusion XL on the latent path (issue 29): a tiny random SDXL folder built offline."""

import json

import numpy as np
import pytest
import torch
from conftest import check_bench_with_baselines, edit_twice_and_check_paste
from PIL import Image

from blendedit import BlendedLatentDiffusionPipeline
from blendedit.cli import main
from blendedit.tiny import save_tiny_sdxl, tiny_clip


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    return save_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "pipe")


@pytest.fixture(scope="module")
def sdxl(sdxl_folder):
    return BlendedLatentDiffusionPipeline.from_pretrained(str(sdxl_folder))


def _inputs(w=80, h=48):
    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8))
    mask = np.zeros((h, w), bool)
    mask[12:36, 30:58] = True
    return image, mask


def _spy(pipe, monkeypatch) -> list:
    """Record the added conditioning every UNet call receives."""
    seen, real = [], pipe.unet.forward

    def forward(*a, added_cond_kwargs=None, **kw):
        seen.append(added_cond_kwargs)
        return real(*a, added_cond_kwargs=added_cond_kwargs, **kw)

    monkeypatch.setattr(pipe.unet, "forward", forward)
    return seen


def test_the_folder_is_detected_as_sdxl_with_both_encoders(sdxl):
    assert (
        sdxl.family == "sdxl"
        and sdxl.text_encoder_2 is not None
        and sdxl.force_zeros_for_empty_prompt
    )
    assert sdxl.unet.config.addition_embed_type == "text_time"


def test_the_unet_gets_pooled_text_and_the_edits_geometry(sdxl, monkeypatch):
    image, mask = _inputs()  # 80x48: larger than the 64 px native size, so a box is edited
    seen = _spy(sdxl, monkeypatch)
    out = sdxl(
        "a red cat",
        image,
        mask,
        num_inference_steps=3,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
    )
    x0, y0, x1, y1 = out.crop_box
    assert len(seen) == 3 and all(s is not None for s in seen)
    ids, pooled = seen[0]["time_ids"], seen[0]["text_embeds"]
    assert ids.shape == (2, 6) and pooled.shape == (2, 48)  # [uncond; cond], guidance on
    # original size = the input image's (h, w); crop top-left and target size = the box's
    assert ids[1].tolist() == [48, 80, y0, x0, y1 - y0, x1 - x0]
    assert (x1 - x0, y1 - y0) == (64, 48) and torch.equal(ids[0], ids[1])
    seen.clear()
    sdxl(
        "a red cat",
        image,
        mask,
        num_inference_steps=2,
        micro_conditioning="centred",
        generator=torch.Generator().manual_seed(0),
    )
    assert seen[0]["time_ids"][0].tolist() == [48, 64, 0, 0, 48, 64]


def test_an_empty_negative_prompt_is_zeros_where_the_model_says_so(sdxl):
    embeds, pooled, _ = sdxl.encode_prompt("a red cat", "", 2, cfg=True)
    assert embeds.shape == (4, 77, 80) and pooled.shape == (4, 48)
    assert float(embeds[:2].abs().max()) == 0 and float(pooled[:2].abs().max()) == 0
    assert float(embeds[2:].abs().max()) > 0
    neg, pooled_neg, _ = sdxl.encode_prompt("a red cat", "a blue dog", 2, cfg=True)
    assert float(neg[:2].abs().max()) > 0 and float(pooled_neg[:2].abs().max()) > 0
    assert torch.equal(neg[2:], embeds[2:])  # the prompt's own rows do not depend on it


def test_paste_keeps_every_pixel_outside_and_seeds_reproduce(sdxl):
    image, mask = _inputs()
    a = edit_twice_and_check_paste(sdxl, image, mask, num_inference_steps=3)
    src = np.asarray(image)
    assert not np.array_equal(np.asarray(a.images[0])[mask], src[mask])  # it edited inside


def test_cli_edits_with_an_sdxl_folder_and_ranks(sdxl_folder, tmp_path):
    from blendedit.tiny import WORDS
    from blendedit.tokenizer import build_clip_tokenizer

    tok = build_clip_tokenizer(list(WORDS), tmp_path / "tok")
    tiny_clip(tok).save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    image, mask = _inputs()
    image.save(tmp_path / "in.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "m.png")
    args = [
        "edit",
        str(tmp_path / "in.png"),
        "--mask",
        str(tmp_path / "m.png"),
        "--prompt",
        "a red cat",
        "--model",
        str(sdxl_folder),
        "--steps",
        "3",
        "-n",
        "2",
        "--seed",
        "5",
        "--rank-model",
        str(tmp_path / "clip"),
        "--quiet",
    ]
    assert main(args + ["--out", str(tmp_path / "o")]) == 0
    meta = json.loads((tmp_path / "o" / "in.json").read_text())
    assert meta["ranked"] and len(meta["results"]) == 2
    scores = [r["score"] for r in meta["results"]]
    assert scores == sorted(scores, reverse=True)
    assert meta["options"]["micro_conditioning"] == "geometry"


def test_float16_keeps_the_vae_in_float32_where_its_config_says_float16_overflows(sdxl_folder):
    pipe = BlendedLatentDiffusionPipeline.from_pretrained(str(sdxl_folder)).to(dtype=torch.float16)
    assert pipe.vae.config.force_upcast and pipe.vae.dtype == torch.float32
    assert pipe.unet.dtype == torch.float16 and pipe.text_encoder_2.dtype == torch.float16
    image, mask = _inputs()
    out = pipe(
        "a red cat", image, mask, num_inference_steps=2, generator=torch.Generator().manual_seed(0)
    )
    assert np.array_equal(np.asarray(out.images[0])[~mask], np.asarray(image)[~mask])
    assert out.latents.dtype == torch.float16 and torch.isfinite(out.latents.float()).all()


def test_an_sdxl_hub_id_in_the_cache_loads_as_sdxl_offline(sdxl_folder, tmp_path):
    """A hub id is read from the Hugging Face cache (as `hf download` leaves it), offline."""
    import os
    import shutil
    import subprocess
    import sys

    repo = tmp_path / "cache" / "models--someone--tiny-sdxl"
    shutil.copytree(sdxl_folder, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    image, mask = _inputs()
    image.save(tmp_path / "in.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "m.png")
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    args = ["edit", str(tmp_path / "in.png"), "--mask", str(tmp_path / "m.png"), "--prompt"]
    args += ["a red cat", "--model", "someone/tiny-sdxl", "--steps", "2", "--quiet"]
    run = subprocess.run(
        [sys.executable, "-m", "blendedit", *args, "--out", str(tmp_path / "o")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    meta = json.loads((tmp_path / "o" / "in.json").read_text())
    assert meta["model"] == "someone/tiny-sdxl" and meta["options"]["micro_conditioning"]


def test_the_sdxl_shaped_preset_has_sdxls_layout_and_edits():
    from blendedit.tiny import build_tiny_sdxl_components

    c = build_tiny_sdxl_components("sdxl-shaped", width_div=32, sample_size=8)
    cfg = c["unet"].config
    assert list(cfg.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D"] + [
        "CrossAttnDownBlock2D"
    ]
    assert list(cfg.transformer_layers_per_block) == [1, 2, 10]
    assert cfg.cross_attention_dim == 768 // 32 + 1280 // 32  # both encoders side by side
    pipe = BlendedLatentDiffusionPipeline(
        c["unet"],
        c["vae"],
        c["text_encoder"],
        c["tokenizer"],
        c["scheduler"],
        text_encoder_2=c["text_encoder_2"],
        tokenizer_2=c["tokenizer_2"],
    )
    image, mask = _inputs(64, 64)
    out = pipe(
        "a red cat", image, mask, num_inference_steps=1, generator=torch.Generator().manual_seed(0)
    )
    assert np.array_equal(np.asarray(out.images[0])[~mask], np.asarray(image)[~mask])
    with pytest.raises(ValueError, match="preset"):
        build_tiny_sdxl_components("huge")


def _edit(pipe, steps=3, **kw):
    image, mask = _inputs()
    kw.setdefault("generator", torch.Generator().manual_seed(0))
    return pipe("a red cat", image, mask, num_inference_steps=steps, **kw)


def test_a_single_file_saved_from_the_folder_loads_with_config_and_edits_the_same(
    sdxl, sdxl_folder, tmp_path
):
    from blendedit.ldm_format import save_single_file
    from blendedit.models import ModelNotFoundError

    parts = {k: getattr(sdxl, k) for k in ("unet", "vae", "text_encoder", "text_encoder_2")}
    f = save_single_file(parts, tmp_path / "tiny-sdxl.safetensors")
    one = BlendedLatentDiffusionPipeline.from_pretrained(str(f), config=str(sdxl_folder))
    assert one.family == "sdxl"
    for name in parts:  # every weight came back where it was
        a, b = getattr(sdxl, name).state_dict(), getattr(one, name).state_dict()
        assert a.keys() <= b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a, b = _edit(sdxl), _edit(one)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    with pytest.raises(ModelNotFoundError, match="an SDXL checkpoint but --config"):
        BlendedLatentDiffusionPipeline.from_pretrained(str(f), config=str(_sd_folder(tmp_path)))


def _sd_folder(tmp_path):
    from conftest import save_sd_folder

    from blendedit.models import load_sd_components

    c = load_sd_components("tiny-random")
    keep = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    save_sd_folder(tmp_path / "sd", **{k: c[k] for k in keep})
    return tmp_path / "sd"


@pytest.fixture(scope="module")
def refiner_folder(tmp_path_factory):
    from blendedit.tiny import save_tiny_sdxl_refiner

    return save_tiny_sdxl_refiner(tmp_path_factory.mktemp("refiner") / "pipe")


def test_the_refiner_runs_the_last_steps_with_its_own_conditioning(sdxl_folder, refiner_folder):
    pipe = BlendedLatentDiffusionPipeline.from_pretrained(
        str(sdxl_folder), refiner=str(refiner_folder)
    )
    r = pipe.refiner
    assert r["aesthetic"] and r["text_encoder"] is None  # SDXL's refiner: its second encoder
    calls = []
    for name, unet in (("base", pipe.unet), ("refiner", r["unet"])):
        real = unet.forward

        def forward(*a, _name=name, _real=real, added_cond_kwargs=None, **kw):
            calls.append(
                (_name, a[2] if len(a) > 2 else kw["encoder_hidden_states"], added_cond_kwargs)
            )
            return _real(*a, added_cond_kwargs=added_cond_kwargs, **kw)

        unet.forward = forward
    image, mask = _inputs()
    out = _edit(pipe, steps=5, refiner_fraction=0.4, guidance_scale=5.0)
    assert [c[0] for c in calls] == ["base"] * 3 + ["refiner"] * 2
    _, states, added = calls[-1]
    assert states.shape[-1] == r["text_encoder_2"].config.hidden_size
    # original size and crop as the base's; the aesthetic score, negative on the uncond rows
    assert added["time_ids"][:, :4].tolist() == calls[0][2]["time_ids"][:, :4].tolist()
    assert added["time_ids"][:, 4].tolist() == [2.5, 6.0]
    assert np.array_equal(np.asarray(out.images[0])[~mask], np.asarray(image)[~mask])
    calls.clear()
    none = _edit(pipe, steps=5, refiner_fraction=0.0, guidance_scale=5.0)
    assert {c[0] for c in calls} == {"base"}
    assert not np.array_equal(np.asarray(none.images[0]), np.asarray(out.images[0]))


def test_the_refiner_and_vae_flags_reach_the_cli(sdxl_folder, refiner_folder, tmp_path):
    image, mask = _inputs()
    image.save(tmp_path / "in.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "m.png")
    args = ["edit", str(tmp_path / "in.png"), "--mask", str(tmp_path / "m.png"), "--prompt"]
    args += ["a red cat", "--model", str(sdxl_folder), "--steps", "3", "--seed", "1", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    more = ["--refiner", str(refiner_folder), "--refiner-fraction", "0.5"]
    more += ["--vae", str(refiner_folder)]  # the refiner's VAE: same latents, other weights
    assert main(args + more + ["--out", str(tmp_path / "b")]) == 0
    meta = json.loads((tmp_path / "b" / "in.json").read_text())
    assert meta["options"]["refiner_fraction"] == 0.5
    a = np.asarray(Image.open(tmp_path / "a" / "in-01-seed1.png"))
    b = np.asarray(Image.open(tmp_path / "b" / "in-01-seed1.png"))
    assert not np.array_equal(a[mask], b[mask]) and np.array_equal(a[~mask], b[~mask])


def test_another_vae_replaces_the_models(sdxl_folder, refiner_folder):
    pipe = BlendedLatentDiffusionPipeline.from_pretrained(
        str(sdxl_folder), vae=str(refiner_folder / "vae")
    )
    other = BlendedLatentDiffusionPipeline.from_pretrained(str(refiner_folder)).vae
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in pipe.vae.state_dict().items())


def test_sdxl_sizes_and_every_background(sdxl):
    from blendedit import masks as M
    from blendedit.tiny import build_tiny_sdxl_components

    c = build_tiny_sdxl_components("sdxl-shaped", width_div=32, sample_size=128)
    assert int(c["unet"].config.sample_size) * 8 == 1024  # SDXL's native size: crop and zoom
    assert M.auto_shrink_iterations(128, 128) == 3  # the paper's k on SDXL's 128x128 grid
    image, mask = _inputs()
    for background in ("poisson", "decoder"):
        out = _edit(sdxl, steps=2, background=background, decoder_steps=2)
        assert out.images[0].size == image.size
    zoom = _edit(sdxl, steps=2, crop_to_mask="zoom")
    assert zoom.zoomed and np.array_equal(
        np.asarray(zoom.images[0])[~mask], np.asarray(image)[~mask]
    )


def test_bench_runs_on_an_sdxl_folder_with_diffusers_sdxl_baselines(sdxl_folder, tmp_path):
    check_bench_with_baselines(sdxl_folder, tmp_path)


def test_serve_loads_the_refiner_and_vae_it_is_given(sdxl_folder, refiner_folder, monkeypatch):
    """``blendedit serve --refiner --vae``: the web UI's model carries both (it loads through
    the runner as the other commands do)."""
    from blendedit import webui
    from blendedit.runner import load_pipeline

    loaded = {}
    monkeypatch.setattr(webui, "serve", lambda spec, *a, **k: loaded.update(m=load_pipeline(spec)))
    args = ["serve", "--model", str(sdxl_folder), "--rank-model", "none"]
    assert main(args + ["--refiner", str(refiner_folder), "--vae", str(refiner_folder)]) == 0
    pipe = loaded["m"].pipe
    theirs = BlendedLatentDiffusionPipeline.from_pretrained(str(refiner_folder))
    assert pipe.refiner is not None and pipe.refiner["aesthetic"]
    assert all(torch.equal(v, theirs.vae.state_dict()[k]) for k, v in pipe.vae.state_dict().items())
