"""Masks from words (issue 40): the region a text names, found with the model's own predictions,
on the shipped model (where the truth is known) and on tiny SD, SDXL, SD3 and Flux folders
through `blendedit mask`, `edit --mask-prompt` and the Python API; bad input is an error."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import gen, tiny_folder
from PIL import Image

from blendedit import BlendedLatentDiffusionPipeline
from blendedit.cli import main
from blendedit.text_mask import (
    NothingFoundError,
    components,
    default_references,
    fill_holes,
    region,
)
from blendedit.toy import world as W


def test_default_references_swap_the_hue_and_its_article():
    assert default_references("a blue square") == [
        "a red square",
        "an orange square",
        "a yellow square",
        "a green square",
        "a purple square",
    ]
    assert default_references("An orange cat")[0] == "A red cat"
    assert default_references("the dog") == [""]  # no hue word: the empty prompt
    assert default_references("a bluebird") == [""]  # a word, not a hue


def test_components_and_holes():
    b = torch.zeros(12, 12, dtype=torch.bool)
    b[1:5, 1:5] = True  # a ring: a square with a hole
    b[2:4, 2:4] = False
    b[8:11, 7:11] = True  # a second part
    b[0, 11] = True  # a third, one cell, touching the border
    parts = components(b)
    assert sorted(int(p.sum()) for p in parts) == [1, 12, 12]
    ring = next(p for p in parts if p[1, 1])
    assert fill_holes(ring).sum() == 16  # the hole filled, nothing else
    assert not fill_holes(ring)[8, 8]


def test_region_keeps_the_part_the_text_predicts_best_and_refuses_none():
    diff = torch.zeros(32, 32)
    diff[2:8, 2:8] = 1.0  # the strongest difference ...
    diff[20:28, 20:28] = 0.8  # ... and a weaker one, where the text predicts better
    cls = torch.zeros(32, 32)
    cls[2:8, 2:8] = -1.0
    cls[20:28, 20:28] = 0.5
    base = torch.ones(32, 32)  # the references' error: the text removes half of it there
    keep, gain = region(diff, cls, base, 0.5, "q")
    assert keep[24, 24] and not keep[4, 4] and gain == pytest.approx(0.5)
    with pytest.raises(NothingFoundError, match="'a green star' matches nothing"):
        region(diff, cls, 4 * base, 0.5, "a green star")  # a gain of 12 % only


@pytest.fixture(scope="module")
def toy():
    return BlendedLatentDiffusionPipeline.from_pretrained("toy")


def _scene():
    """A fixed scene: a blue square and a yellow triangle on a plain background."""
    bg = W.Background("plain", ("light gray",))
    objs = [
        W.Obj("square", "blue", 0.27, 0.31, 0.14, 0.3),
        W.Obj("triangle", "yellow", 0.7, 0.69, 0.15),
    ]
    return W.Scene(bg, objs)


def test_shipped_model_finds_the_named_object(toy):
    scene = _scene()
    image = W.render(scene, toy.native_size)
    truths = [W.coverage(o, toy.native_size) > 0.5 for o in scene.objects]
    for text, i in (("a blue square", 0), ("a yellow triangle", 1)):
        found = toy.mask_from_text(image, text)
        m = np.array(found.mask) > 0
        assert found.mask.size == image.size and set(np.unique(np.array(found.mask))) <= {0, 255}
        covered = [(m & t).sum() / t.sum() for t in truths]
        iou = (m & truths[i]).sum() / (m | truths[i]).sum()
        assert covered[i] > 0.8 and covered[1 - i] == 0 and iou > 0.4, (text, covered, iou)
        assert found.info["references"] == default_references(text)
    with pytest.raises(NothingFoundError):  # no green star in the scene
        toy.mask_from_text(image, "a green star")


FAMILIES = ["sd", "sdxl", "sd3", "flux", "sd-inpaint", "flux-inpaint"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("text-mask")
    return {kind: tiny_folder(kind, root) for kind in FAMILIES}


@pytest.mark.parametrize("kind", FAMILIES)
def test_mask_and_edit_from_words_on_every_family(kind, folders, tmp_path):
    rng = np.random.RandomState(0)
    pixels = rng.randint(0, 255, (48, 80, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "in.png")
    model = folders[kind]
    args = ["--model", model, "--mask-prompt", "a red circle", "--mask-reference", ""]
    args += ["--mask-min-gain", "-1"]  # random weights: the part where it fits best, however little
    assert main(["mask", str(tmp_path / "in.png"), "--out", str(tmp_path / "m.png"), *args]) == 0
    m = np.array(Image.open(tmp_path / "m.png"))
    assert m.shape == (48, 80) and set(np.unique(m)) <= {0, 255} and m.any()
    out = tmp_path / "out"
    edit = ["edit", str(tmp_path / "in.png"), "--prompt", "a blue square", "--out", str(out)]
    assert main([*edit, *args, "-n", "1", "--steps", "2", "--seed", "3", "--quiet"]) == 0
    side = json.loads((out / "in.json").read_text())
    assert side["mask"] == "in-mask.png" and side["mask_prompt"]["text"] == "a red circle"
    assert side["mask_prompt"]["references"] == [""]
    found = np.array(Image.open(out / "in-mask.png")) > 0
    assert (found == (m > 0)).all()  # the same settings find the same mask
    result = np.array(Image.open(out / side["results"][0]["file"]).convert("RGB"))
    assert (result[~found] == pixels[~found]).all()  # outside the found mask: the input


def test_pipeline_call_takes_mask_prompt(toy):
    image = W.render(_scene(), toy.native_size)
    out = toy(
        "a red circle",
        image,
        mask_prompt="a blue square",
        num_inference_steps=4,
        num_images_per_prompt=1,
        generator=gen(1),
    )
    assert out.mask_info["text"] == "a blue square" and np.array(out.mask)[40, 34] > 0
    with pytest.raises(ValueError, match="either a mask or a mask_prompt"):
        toy("a red circle", image, out.mask, mask_prompt="a blue square")
    with pytest.raises(ValueError, match="either a mask or a mask_prompt"):
        toy("a red circle", image)


def test_a_bad_option_fails_before_the_mask_is_searched_for(toy, monkeypatch):
    searched = []
    monkeypatch.setattr(toy, "mask_from_text", lambda *a, **k: searched.append(a))
    image = W.render(_scene(), toy.native_size)
    with pytest.raises(ValueError, match="strength"):
        toy("a red circle", image, mask_prompt="a blue square", strength=1.5)
    with pytest.raises(ValueError, match="num_images_per_prompt"):
        toy("a red circle", image, mask_prompt="a blue square", num_images_per_prompt=0)
    assert searched == []


def test_bad_mask_prompts_are_named_errors(tmp_path, capsys):
    W.render(_scene(), 128).save(tmp_path / "in.png")
    base = ["mask", str(tmp_path / "in.png"), "--model", "toy"]
    cases = [
        ([*base, "--mask-prompt", " ", "--out", str(tmp_path / "m.png")], "mask_prompt: empty"),
        (
            [*base, "--mask-prompt", "a green star", "--out", str(tmp_path / "m.png")],
            "'a green star' matches nothing",
        ),
        (
            [*base, "--mask-prompt", "a blue square", "--out", str(tmp_path / "in.png")],
            "is the input image",
        ),
        (
            [*base, "--mask-prompt", "a blue square", "--out", str(tmp_path / "m.jpg")],
            "give a .png path",
        ),
        (
            [
                *base,
                "--mask-prompt",
                "a blue square",
                "--mask-reference",
                "a blue square",
                "--out",
                str(tmp_path / "m.png"),
            ],
            "is the text itself",
        ),
        (
            [
                "edit",
                str(tmp_path / "in.png"),
                "--prompt",
                "x",
                "--mask-prompt",
                "a blue square",
                "--method",
                "pixel",
                "--out",
                str(tmp_path / "o"),
            ],
            "pixel method's takes no text",
        ),
    ]
    for argv, message in cases:
        assert main(argv) == (4 if "input image" in message else 2), argv
        assert message in capsys.readouterr().err
    assert not (tmp_path / "m.png").exists() and not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):  # a mask and a mask prompt: argparse refuses the pair
        main(
            [
                "edit",
                str(tmp_path / "in.png"),
                "--prompt",
                "x",
                "--mask",
                "m.png",
                "--mask-prompt",
                "y",
            ]
        )


def test_batch_rows_take_a_mask_prompt_and_a_bad_one_fails_alone(tmp_path):
    W.render(_scene(), 128).save(tmp_path / "scene.png")
    rows = [
        dict(image="scene.png", prompt="a red circle", mask_prompt="a blue square", id="words"),
        dict(image="scene.png", prompt="a red circle", mask_prompt="a green star", id="absent"),
    ]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    argv = ["batch", str(tmp_path / "m.jsonl"), "--model", "toy", "--out", str(out)]
    main([*argv, "--steps", "2", "-n", "1", "--quiet"])
    summary = {
        e["id"]: e for e in map(json.loads, (out / "summary.jsonl").read_text().splitlines())
    }
    assert summary["words"]["status"] == "ok", summary["words"]
    assert summary["words"]["mask"] == "found from words: a blue square"
    assert "matches nothing" in summary["absent"]["error"]
    folder = Path(summary["words"]["folder"])
    side = json.loads((folder / "scene.json").read_text())
    assert (folder / side["mask"]).is_file() and side["mask_prompt"]["text"] == "a blue square"
