"""The Shapes World inpainting UNet (issue 45): widened from the text-to-image UNet, trained on
edit-like masks in diffusers' layout, shipped as the tuned tensors beside the plain UNet, loaded
as ``toy-inpaint``."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from blendedit import BlendedLatentDiffusionPipeline
from blendedit.models import DELTA_FILE, TOY_DIR, load_toy_inpaint_unet, toy_shipped
from blendedit.toy.data import build_dataset, scene_for
from blendedit.toy.train import main
from blendedit.toy.train.inpaint import (
    MASK_KINDS,
    TRAIN_ONLY,
    inpaint_inputs,
    training_mask,
    widen_conv_in,
)

PIPELINE = TOY_DIR / "pipeline"
shipped = pytest.mark.skipif(not toy_shipped(), reason="no shipped Shapes World model")


@pytest.fixture(scope="module")
def unet():
    from diffusers import UNet2DConditionModel

    from blendedit.tiny import _unet_config

    torch.manual_seed(0)
    return UNet2DConditionModel(**_unet_config("tiny", 4, 8)).eval()


def test_the_widened_unet_predicts_what_the_text_to_image_one_does(unet):
    """Zero-initialised new inputs: step 0 of the fine-tuning is the text-to-image model,
    whatever the mask and masked-image channels hold."""
    wide = widen_conv_in(unet)
    assert wide.config.in_channels == 9 and unet.config.in_channels == 4
    z, c, t = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32), torch.tensor([10, 700])
    extra = torch.randn(2, 5, 8, 8)
    with torch.no_grad():
        a = unet(z, t, c).sample
        b = wide(torch.cat([z, extra], 1), t, c).sample
    assert torch.equal(a, b)


def test_training_masks_are_the_edit_kinds_in_their_shares():
    rng = np.random.RandomState(0)
    full = obj = 0
    n = 400
    for i in range(n):
        scene = scene_for(0, i)
        m, text = training_mask(scene, rng, 64)
        assert m.shape == (64, 64) and set(np.unique(m)) <= {0.0, 1.0} and m.any()
        full += bool(m.all())
        # a caption naming one object alone, with the object inside the mask: the object kind
        named = [o for o in scene.objects if text.endswith(f"{o.colour} {o.shape}")]
        if named and " and " not in text and " on " not in text and not m.all():
            o = named[0]
            obj += m[int(o.cy * 64), int(o.cx * 64)] == 1
    assert abs(full / n - MASK_KINDS["full"]) < 0.08
    assert obj / n > 0.25  # the object kind (0.4 of draws, fewer where a scene is empty)
    again = training_mask(scene_for(0, 5), np.random.RandomState(3), 64)
    same = training_mask(scene_for(0, 5), np.random.RandomState(3), 64)
    assert np.array_equal(again[0], same[0]) and again[1] == same[1]


def test_the_conditioning_is_diffusers_layout():
    """The mask resized by nearest neighbour, the masked image x * (mask < 0.5) encoded (the
    posterior mean, scaled), an all-masked row the encoding of zeros."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(PIPELINE / "vae").float().eval()
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    m = torch.zeros(3, 1, 64, 64)
    m[0, :, 10:40, 20:50] = 1
    m[2] = 1
    with torch.no_grad():
        small, masked = inpaint_inputs(vae, x, m, (8, 8))
        want = vae.encode(x * (m < 0.5)).latent_dist.mode() * vae.config.scaling_factor
    assert torch.equal(small, torch.nn.functional.interpolate(m, size=(8, 8)))
    torch.testing.assert_close(masked, want, atol=1e-5, rtol=1e-5)


def _args(data, out, steps, *extra):
    return ["inpaint", "--data", str(data), "--out", str(out), "--steps", str(steps)]


def test_a_run_trains_only_its_tensors_resumes_ships_and_loads(tmp_path):
    """Two steps, a resumed third; only --train-only's tensors move; `ship-inpaint` writes
    them (float16) and the loader puts the model back together from the plain UNet."""
    from diffusers import UNet2DConditionModel

    data = build_dataset(tmp_path / "data", n=6, size=128, seed=0, workers=1)
    run = tmp_path / "run"
    common = ["--batch-size", "2", "--warmup", "1", "--ckpt-every", "1", "--threads", "1"]
    assert main(_args(data, run, 3) + common + ["--stop-at", "2"]) == 0
    assert (run / "checkpoint.pt").exists() and not (run / "model").exists()
    assert json.loads((run / "train_only.json").read_text()) == list(TRAIN_ONLY)
    assert main(_args(data, run, 3) + common) == 0
    lines = (run / "loss.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in lines[1:]][-1] == "3"
    assert "from step 2" in (run / "commands.log").read_text()
    model = UNet2DConditionModel.from_pretrained(run / "model")
    base = UNet2DConditionModel.from_pretrained(PIPELINE / "unet").float()
    assert model.config.in_channels == 9
    mine, theirs = model.state_dict(), base.state_dict()
    moved = {k for k in mine if k == "conv_in.weight" or not torch.equal(mine[k], theirs[k])}
    assert moved and all(k.split(".")[0] in {p.split(".")[0] for p in TRAIN_ONLY} for k in moved)
    assert not any(k.startswith(("mid_block.", "up_blocks.0.")) for k in moved)

    dest = tmp_path / "toy" / "inpaint"
    assert main(["ship-inpaint", "--run", str(run), "--dest", str(dest)]) == 0
    delta = load_file(dest / "unet" / DELTA_FILE)
    assert all(v.dtype == torch.float16 for v in delta.values())
    assert "conv_in.weight" in delta and not any(k.startswith("mid_block.") for k in delta)
    loaded = load_toy_inpaint_unet(dest, base)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, model.state_dict()[k].half().float()), k


@shipped
def test_toy_inpaint_is_built_in_shares_the_parts_and_keeps_the_background():
    if not (TOY_DIR / "inpaint").is_dir():
        pytest.skip("toy-inpaint is not shipped")
    from blendedit.toy.tasks import make_task

    pipe = BlendedLatentDiffusionPipeline.from_pretrained("toy-inpaint")
    plain = BlendedLatentDiffusionPipeline.from_pretrained("toy")
    assert pipe.inpaint == "unet9" and pipe.ranker is not None
    assert len(list((TOY_DIR / "inpaint").rglob("*.safetensors"))) == 1  # the UNet's delta only
    for name in ("vae", "text_encoder"):
        a, b = getattr(pipe, name).state_dict(), getattr(plain, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    task = make_task(2, "add")
    out = pipe(task.prompt, task.image, task.mask, num_inference_steps=4)
    m = np.asarray(task.mask) > 0
    assert np.array_equal(np.asarray(out.images[0])[~m], np.asarray(task.image)[~m])


@shipped
def test_diffusers_inpainting_pipeline_runs_the_shipped_model():
    """An ordinary 9-channel UNet: diffusers' StableDiffusionInpaintPipeline takes it with the
    toy model's other components."""
    if not (TOY_DIR / "inpaint").is_dir():
        pytest.skip("toy-inpaint is not shipped")
    from blendedit.bench import diffusers_baselines
    from blendedit.toy.tasks import make_task

    p = BlendedLatentDiffusionPipeline.from_pretrained("toy-inpaint")
    d = diffusers_baselines(p)[0]
    assert type(d).__name__ == "StableDiffusionInpaintPipeline"
    d.set_progress_bar_config(disable=True)
    task = make_task(1, "replace")
    image = d(
        task.prompt,
        image=task.image,
        mask_image=task.mask,
        height=128,
        width=128,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (128, 128)


def test_ship_inpaint_refuses_a_run_whose_frozen_tensors_moved(tmp_path):
    """The shipped file holds only --train-only's tensors; a run that changed others (another
    base UNet) cannot be shipped as a delta of this one."""
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.from_pretrained(PIPELINE / "unet")
    wide = widen_conv_in(base.float())
    with torch.no_grad():
        wide.mid_block.resnets[0].conv1.weight.add_(1.0)
    run = tmp_path / "run"
    wide.save_pretrained(run / "model")
    (run / "train_only.json").write_text(json.dumps(list(TRAIN_ONLY)))
    (run / "card.md").write_text("# a run\n")
    with pytest.raises(SystemExit, match="tensors outside --train-only changed"):
        main(["ship-inpaint", "--run", str(run), "--dest", str(tmp_path / "x")])
    assert not Path(tmp_path / "x").exists()
