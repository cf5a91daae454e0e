"""The shipped Shapes World models: present, small, loadable by name, and they edit."""

import numpy as np
import pytest
import torch

from blendedit import BlendedLatentDiffusionPipeline, models
from blendedit.demo import DEMO_PROMPT, example_scene
from blendedit.toy.judge import judge
from blendedit.toy.world import COLOURS, SHAPES

MAX_BYTES = 60 * 1000 * 1000
shipped = pytest.mark.skipif(
    not models.toy_shipped(), reason="the Shapes World models are not shipped yet (issue 3)"
)


@shipped
def test_shipped_weights_are_safetensors_and_at_most_60_mb():
    files = [f for f in models.TOY_DIR.rglob("*") if f.is_file()]
    weights = [f for f in files if f.suffix in (".safetensors", ".bin", ".ckpt", ".pt", ".pth")]
    assert weights and all(f.suffix == ".safetensors" for f in weights)
    assert sum(f.stat().st_size for f in weights) <= MAX_BYTES
    card = (models.TOY_DIR / "MODEL_CARD.md").read_text()
    for name in ("CLIP", "VAE", "text-to-image UNet", "pixel model", "guidance CLIP"):
        assert f"# Shapes World {name}" in card
    for part in card.split("# Shapes World ")[2:]:  # each model names its commands
        assert "- command: `python -m blendedit.toy.train" in part


@pytest.fixture(scope="module")
def toy():
    return BlendedLatentDiffusionPipeline.from_pretrained("toy")


@shipped
def test_toy_loads_by_name_in_float32_with_its_own_ranker(toy):
    assert toy.native_size == 128 and toy.dtype == torch.float32
    assert toy.text_encoder.dtype == torch.float32 and toy.vae.dtype == torch.float32
    assert toy.ranker is not None and toy.ranker.model.dtype == torch.float32
    assert torch.allclose(toy.ranker.mean, torch.full((1, 3, 1, 1), 0.5))
    prompts = [f"a {c} {s}" for c in COLOURS for s in SHAPES]
    ids = {tuple(toy.tokenizer(p).input_ids) for p in prompts}
    assert len(ids) == 30 and all(len(i) == 5 for i in ids)  # bos a colour shape eos


@shipped
def test_shipped_clip_and_pixel_model_load_by_folder_and_name():
    from diffusers import DDPMPipeline

    clip, tok, folder = models.load_clip("toy")
    assert folder == str(models.toy_folder("clip")) and clip.dtype == torch.float32
    pixel = DDPMPipeline.from_pretrained(models.toy_folder("pixel"))
    assert pixel.unet.config.sample_size == 64 and pixel.unet.config.in_channels == 3


@shipped
def test_the_pixel_model_guides_with_its_x0_clip_and_ranks_with_the_clean_one():
    """Issue 31: the shipped pixel model brings two CLIPs: the guidance one (vision tower tuned
    on its x̂0, text tower as shipped) and the ranking one; a CLIP passed in does both."""
    from blendedit import BlendedDiffusionPipeline

    pipe = BlendedDiffusionPipeline.from_pretrained("toy")
    # and the CLIP guidance measured best with them (its blendedit.json), not the paper's 1000
    assert pipe.default_clip_guidance_scale == 500.0 == pipe.guidance_or_default(None)
    clean, _, _ = models.load_clip("toy")
    guide, _, folder = models.load_clip("toy-guide")
    assert folder == str(models.toy_folder("guide-clip")) and pipe.clip is not pipe.ranker
    for ours, theirs in ((pipe.ranker.model, clean), (pipe.clip.model, guide)):
        assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in ours.state_dict().items())
    g, c = guide.state_dict(), clean.state_dict()
    assert all(torch.equal(g[k], c[k]) for k in c if k.startswith("text_model."))
    assert any(not torch.equal(g[k], c[k]) for k in c if k.startswith("vision_model."))
    one = BlendedDiffusionPipeline.from_pretrained("toy", clip="toy")
    assert one.clip is one.ranker


def test_missing_shipped_model_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "TOY_DIR", tmp_path / "nothing")
    with pytest.raises(models.ModelNotFoundError, match="train-toy"):
        models.load_sd_components("toy")


@shipped
def test_demo_edit_with_the_shipped_model_is_judged_right_and_keeps_the_background(toy):
    image, mask = example_scene()
    out = toy(
        DEMO_PROMPT,
        image,
        np.asarray(mask) > 0,
        num_inference_steps=20,
        num_images_per_prompt=4,
        generator=[torch.Generator().manual_seed(s) for s in range(4)],
    )
    verdicts = [judge(im, mask, DEMO_PROMPT, source=image) for im in out.images]
    assert all(v.max_err_outside == 0 for v in verdicts)
    assert verdicts[0].success, verdicts[0].reason  # the ranker's first choice is right
