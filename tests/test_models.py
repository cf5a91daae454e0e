import json

import numpy as np
import pytest
import torch
from conftest import gen, save_sd_folder

from blendedit import BlendedLatentDiffusionPipeline, ClipRanker, ModelNotFoundError


def save_folder(c: dict, folder) -> None:
    """The tiny components as a diffusers Stable Diffusion folder."""
    parts = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    save_sd_folder(folder, **{k: c[k] for k in parts})


def test_folder_round_trip_gives_the_same_edit(tiny_components, pipe, tmp_path, image, box_mask):
    c = tiny_components
    save_folder(c, tmp_path / "sd")
    c["ranker"].save_pretrained(tmp_path / "clip")
    c["ranker_tokenizer"].save_pretrained(tmp_path / "clip")
    loaded = BlendedLatentDiffusionPipeline.from_pretrained(
        str(tmp_path / "sd"), ranker=str(tmp_path / "clip")
    )
    direct = pipe  # the same components, handed over in memory
    kw = dict(num_inference_steps=4, num_images_per_prompt=2)
    a = loaded("a red star", image, box_mask, generator=[gen(0), gen(1)], **kw)
    b = direct("a red star", image, box_mask, generator=[gen(0), gen(1)], **kw)
    assert torch.allclose(a.latents, b.latents, atol=1e-5)
    assert a.scores == pytest.approx(b.scores, abs=1e-5)
    assert loaded.tokenizer("a red star").input_ids == c["tokenizer"]("a red star").input_ids


def test_a_folders_blendedit_json_sets_its_default_guidance(
    tiny_components, tmp_path, image, box_mask
):
    folder = tmp_path / "sd"
    save_folder(tiny_components, folder)
    defaults = folder / "blendedit.json"
    defaults.write_text(json.dumps({"guidance_scale": 3.0, "measured": "a test"}))
    pipe = BlendedLatentDiffusionPipeline.from_pretrained(str(folder))
    assert pipe.default_guidance_scale == 3.0

    def edit(**kw):
        out = pipe("a red star", image, box_mask, num_inference_steps=3, generator=gen(0), **kw)
        return out.latents

    unset = edit()
    assert torch.equal(unset, edit(guidance_scale=3.0))  # unset is the folder's 3
    assert not torch.allclose(unset, edit(guidance_scale=7.5))
    defaults.unlink()  # no file: Stable Diffusion's 7.5
    assert BlendedLatentDiffusionPipeline.from_pretrained(str(folder)).default_guidance_scale == 7.5
    for bad in ('{"guidance_scale": "high"}', '{"guidance": 5}', "not json"):
        defaults.write_text(bad)
        with pytest.raises(ModelNotFoundError, match="blendedit.json is not a blendedit defaults"):
            BlendedLatentDiffusionPipeline.from_pretrained(str(folder))


@pytest.mark.parametrize(
    "spec, match",
    [
        ("nobody/no-such-model", "hf download nobody/no-such-model"),
        ("./missing-folder", "no such file or folder"),
        ("weights.safetensors", "no such file or folder"),
    ],
)
def test_unavailable_models_raise_clear_errors(spec, match):
    with pytest.raises(ModelNotFoundError, match=match):
        BlendedLatentDiffusionPipeline.from_pretrained(spec)


def test_folder_without_model_index_and_non_checkpoint_files(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not a diffusers pipeline folder"):
        BlendedLatentDiffusionPipeline.from_pretrained(str(tmp_path))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelNotFoundError, match="not a checkpoint"):
        BlendedLatentDiffusionPipeline.from_pretrained(str(tmp_path / "notes.txt"))
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelNotFoundError, match="could not load checkpoint"):
        BlendedLatentDiffusionPipeline.from_pretrained(str(tmp_path / "junk.safetensors"))


def test_rank_model_unavailable_says_how_to_turn_ranking_off():
    with pytest.raises(ModelNotFoundError, match="--rank-model none"):
        ClipRanker.from_pretrained("nobody/no-such-clip")


def test_builtin_brings_its_ranker_and_schedulers_swap(image, box_mask):
    pipe = BlendedLatentDiffusionPipeline.from_pretrained("tiny-random", scheduler="euler")
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler" and pipe.ranker is not None
    assert pipe.native_size == 64
    with pytest.raises(ValueError, match="^scheduler: "):
        pipe.set_scheduler("plms")
    out = pipe("a blue star", image, box_mask, num_inference_steps=3, generator=gen(0))
    assert np.asarray(out.images[0]).shape == (64, 64, 3)
