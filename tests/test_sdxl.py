"""Stable Diffusion XL on the latent path (issue 29): a tiny random SDXL folder built offline."""

import json

import numpy as np
import pytest
import torch
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
    assert sdxl.is_sdxl and sdxl.text_encoder_2 is not None and sdxl.force_zeros_for_empty_prompt
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
    assert ids.shape == (2, 6) and pooled.shape == (2, 32)  # [uncond; cond], guidance on
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
    assert embeds.shape == (4, 77, 64) and pooled.shape == (4, 32)
    assert float(embeds[:2].abs().max()) == 0 and float(pooled[:2].abs().max()) == 0
    assert float(embeds[2:].abs().max()) > 0
    neg, pooled_neg, _ = sdxl.encode_prompt("a red cat", "a blue dog", 2, cfg=True)
    assert float(neg[:2].abs().max()) > 0 and float(pooled_neg[:2].abs().max()) > 0
    assert torch.equal(neg[2:], embeds[2:])  # the prompt's own rows do not depend on it


def test_paste_keeps_every_pixel_outside_and_seeds_reproduce(sdxl):
    image, mask = _inputs()
    run = lambda: sdxl(
        "a red cat",
        image,
        mask,
        num_inference_steps=3,  # noqa: E731
        num_images_per_prompt=2,
        generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
    )
    a, b = run(), run()
    src = np.asarray(image)
    for img_a, img_b in zip(a.images, b.images):
        assert np.array_equal(np.asarray(img_a), np.asarray(img_b))
        assert np.array_equal(np.asarray(img_a)[~mask], src[~mask])
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
