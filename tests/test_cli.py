import json

import numpy as np
import pytest
from PIL import Image

from blendedit import models
from blendedit.cli import main


@pytest.fixture
def files(tmp_path):
    rng = np.random.RandomState(0)
    img = tmp_path / "photo.png"
    Image.fromarray((rng.rand(64, 64, 3) * 255).astype(np.uint8)).save(img)
    mask = tmp_path / "mask.png"
    m = np.zeros((64, 64), np.uint8)
    m[16:40, 20:44] = 255
    Image.fromarray(m).save(mask)
    return img, mask


def edit(img, mask, out, *extra):
    return main(
        [
            "edit",
            str(img),
            "--mask",
            str(mask),
            "--prompt",
            "a red circle",
            "--model",
            "tiny-random",
            "--steps",
            "4",
            "--out",
            str(out),
            "--quiet",
            *extra,
        ]
    )


def test_reconstruct_redoes_the_background_from_saved_latents(files, tmp_path, capsys):
    img, mask = files
    out = tmp_path / "out"
    assert edit(img, mask, out, "-n", "2", "--seed", "3", "--background", "none") == 0
    meta = json.loads((out / "photo.json").read_text())
    assert meta["latents"] == "photo-latents.safetensors"
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # the same background again: the very same images, under the same seeds, from the latents
    assert main(["reconstruct", str(out / "photo.json"), "--background", "none", "--quiet"]) == 0
    again = json.loads((out / "photo-none.json").read_text())
    assert again["command"] == "reconstruct" and again["reconstructed_from"] == str(
        out / "photo.json"
    )
    for a, b in zip(meta["results"], again["results"]):
        # the score is recomputed on frames decoded in ranked order: equal up to float rounding
        assert a["seed"] == b["seed"] and a["score"] == pytest.approx(b["score"], abs=1e-6)
        assert (out / b["file"]).read_bytes() == (out / a["file"]).read_bytes()
    # paste from the same latents: the background becomes exact, the samples keep their seeds
    assert main(["reconstruct", str(out / "photo.json"), "--background", "paste", "--quiet"]) == 0
    pasted = json.loads((out / "photo-paste.json").read_text())
    assert pasted["options"]["background"] == "paste"
    assert sorted(r["seed"] for r in pasted["results"]) == [3, 4]
    src = np.asarray(Image.open(img)).astype(int)
    keep = np.asarray(Image.open(mask)) == 0
    raw = {r["seed"]: np.asarray(Image.open(out / r["file"])).astype(int) for r in meta["results"]}
    for r in pasted["results"]:
        res = np.asarray(Image.open(out / r["file"])).astype(int)
        assert np.abs(res - src)[keep].max() == 0
        assert np.abs(raw[r["seed"]] - src)[keep].max() > 0  # the raw decode was not exact
    # nothing of the earlier edit was touched
    assert all((out / n).read_bytes() == b for n, b in before.items())


def test_edit_writes_ranked_results_sidecar_and_sheet(files, tmp_path, capsys):
    img, mask = files
    before = img.read_bytes(), mask.read_bytes()
    assert edit(img, mask, tmp_path / "out", "-n", "3", "--seed", "7") == 0
    meta = json.loads((tmp_path / "out" / "photo.json").read_text())
    assert meta["seed"] == 7 and meta["prompt"] == "a red circle" and meta["model"] == "tiny-random"
    assert (
        meta["options"]["num_inference_steps"] == 4
        and meta["options"]["num_images_per_prompt"] == 3
    )
    assert meta["options"]["guidance_scale"] == 7.5  # unset: the model's own (here SD's), recorded
    scores = [r["score"] for r in meta["results"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == 3
    assert sorted(r["seed"] for r in meta["results"]) == [7, 8, 9]
    for r in meta["results"]:
        assert f"-{r['rank']:02d}-seed{r['seed']}-score{r['score']:.4f}.png" in r["file"]
        out = np.asarray(Image.open(tmp_path / "out" / r["file"])).astype(int)
        src = np.asarray(Image.open(img)).astype(int)
        m = np.asarray(Image.open(mask)) == 0
        assert np.abs(out - src)[m].max() == 0
    assert set(meta["timings"]) >= {"encode", "sample", "decode", "total"}
    assert (tmp_path / "out" / "photo-sheet.png").exists()
    assert (img.read_bytes(), mask.read_bytes()) == before
    printed = capsys.readouterr().out.split()
    assert len(printed) == 6 and all(  # 3 results, the sheet, the latents, the sidecar
        (tmp_path / "out").joinpath(p.split("/")[-1]).exists() for p in printed
    )


def test_shrink_iterations_flag_takes_auto_or_an_integer(files, tmp_path, capsys):
    img, mask = files
    for value, kept, used in (("auto", "auto", 0), ("2", 2, 2)):  # 64 px: 8x8 latents: auto 0
        out = tmp_path / value
        assert edit(img, mask, out, "--shrink-iterations", value, "--steps", "2") == 0
        meta = json.loads((out / "photo.json").read_text())
        assert meta["options"]["shrink_iterations"] == kept
        assert meta["shrink_iterations_used"] == used
    assert meta["options"]["num_inference_steps"] == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        edit(img, mask, tmp_path / "bad", "--shrink-iterations", "lots")
    assert e.value.code == 2
    assert "--shrink-iterations: expected an integer or auto, got 'lots'" in capsys.readouterr().err


def test_crop_to_mask_flag_takes_zoom(files, tmp_path, capsys):
    img, mask = files
    out = tmp_path / "zoom"
    assert edit(img, mask, out, "--crop-to-mask", "zoom", "--steps", "2") == 0
    meta = json.loads((out / "photo.json").read_text())
    assert meta["options"]["crop_to_mask"] == "zoom"
    x0, y0, x1, y1 = meta["crop_box"]  # the 24 px mask and half its side a side: 48 px
    assert (x1 - x0, y1 - y0) == (48, 48)
    first = out / meta["results"][0]["file"]
    res, src = (np.asarray(Image.open(p)).astype(int) for p in (first, img))
    keep = np.asarray(Image.open(mask)) == 0
    assert np.abs(res - src)[keep].max() == 0
    # the same background again from the saved latents: the same zoomed edit
    assert main(["reconstruct", str(out / "photo.json"), "--background", "paste", "--quiet"]) == 0
    again = json.loads((out / "photo-paste.json").read_text())
    assert (out / again["results"][0]["file"]).read_bytes() == first.read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        edit(img, mask, tmp_path / "bad", "--crop-to-mask", "tight")
    assert "expected auto, true, false, zoom or crop, got 'tight'" in capsys.readouterr().err


def test_same_seed_same_files(files, tmp_path):
    img, mask = files
    edit(img, mask, tmp_path / "a", "--seed", "3")
    edit(img, mask, tmp_path / "b", "--seed", "3")
    a = sorted(p.name for p in (tmp_path / "a").glob("photo-0*.png"))
    b = sorted(p.name for p in (tmp_path / "b").glob("photo-0*.png"))
    assert a == b and (tmp_path / "a" / a[0]).read_bytes() == (tmp_path / "b" / b[0]).read_bytes()


def test_mask_from_alpha(tmp_path):
    rgba = np.full((64, 64, 4), 200, np.uint8)
    rgba[10:30, 10:30, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cut.png")
    rc = main(
        [
            "edit",
            str(tmp_path / "cut.png"),
            "--mask-from-alpha",
            "--prompt",
            "a star",
            "--model",
            "tiny-random",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "o"),
            "--quiet",
        ]
    )
    assert rc == 0
    assert json.loads((tmp_path / "o" / "cut.json").read_text())["mask"] == "alpha of image"


def test_help_explains_every_option(capsys):
    from blendedit.latent import options_fields

    with pytest.raises(SystemExit):
        main(["edit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, _, help, _ in options_fields():
        assert f"--{name.replace('_', '-')}" in text
        assert " ".join(help.split()) in text
    for flag in ("--mask", "--prompt", "--model", "-n", "--seed", "--steps", "--out"):
        assert flag in text


def test_demo_runs_offline(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--quiet", "--steps", "3"]) == 0
    meta = json.loads((tmp_path / "d" / "scene.json").read_text())
    expected = "toy" if models.toy_shipped() else "tiny-random"  # falls back, and says so
    assert meta["model"] == expected and len(meta["results"]) == 4 and meta["seed"] == 0
    assert (tmp_path / "d" / "inputs" / "scene.png").exists()
    out, err = capsys.readouterr()
    assert "judge: " in err  # the demo reports the pixel judge's verdict
    assert str(tmp_path / "d" / "scene-sheet.png") in out.splitlines()  # and lists its files


def test_demo_without_the_shipped_model_says_so_and_runs_on_tiny_random(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(models, "TOY_DIR", tmp_path / "no-models")
    assert main(["demo", "--out", str(tmp_path / "d"), "--quiet", "--steps", "2", "-n", "1"]) == 0
    err = capsys.readouterr().err
    assert "not in this checkout yet" in err and "tiny-random" in err
    meta = json.loads((tmp_path / "d" / "scene.json").read_text())
    assert meta["model"] == "tiny-random"


def test_edit_with_the_pixel_method(files, tmp_path):
    img, mask = files
    rc = edit(
        img,
        mask,
        tmp_path / "px",
        "--method",
        "pixel",
        "--steps",
        "10",
        "--skip-timesteps",
        "3",
        "-n",
        "2",
        "--num-augmentations",
        "4",
        "--seed",
        "5",
    )
    assert rc == 0
    meta = json.loads((tmp_path / "px" / "photo.json").read_text())
    assert meta["method"] == "pixel" and meta["scheduler"] == "ddpm"
    assert meta["options"]["num_augmentations"] == 4 and meta["options"]["skip_timesteps"] == 3
    assert meta["options"]["clip_guidance_scale"] == 1000.0  # the pixel default
    assert sorted(r["seed"] for r in meta["results"]) == [5, 6]
    src = np.asarray(Image.open(img)).astype(int)
    keep = np.asarray(Image.open(mask)) == 0
    for r in meta["results"]:
        out = np.asarray(Image.open(tmp_path / "px" / r["file"])).astype(int)
        assert np.abs(out - src)[keep].max() == 0


def test_python_m_blendedit_is_the_command_line():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "blendedit", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    for command in ("edit", "batch", "serve", "demo", "bench", "reconstruct"):
        assert command in out.stdout


def test_an_uncached_default_ranker_leaves_the_samples_unranked_with_a_warning(
    files, tmp_path, capsys, tiny_components, monkeypatch
):
    from conftest import save_sd_folder

    from blendedit import runner

    c = tiny_components
    folder = tmp_path / "sd"
    save_sd_folder(
        folder,
        **{k: c[k] for k in ("unet", "vae", "text_encoder", "tokenizer")},
        scheduler=c["scheduler"],
    )
    # the default CLIP is a hub id that this offline machine has not cached
    monkeypatch.setattr(runner, "DEFAULT_RANK_MODEL", "nobody/no-such-clip")
    img, mask = files
    args = ["edit", str(img), "--mask", str(mask), "--prompt", "a red circle", "--model"]
    args += [str(folder), "--steps", "3", "-n", "2", "--seed", "4", "--out", str(tmp_path / "o")]
    assert main([*args, "--quiet"]) == 0
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if "unranked" in line]
    assert len(warned) == 1 and "nobody/no-such-clip" in warned[0]
    meta = json.loads((tmp_path / "o" / "photo.json").read_text())
    assert meta["ranked"] is False and meta["rank_model"] is None
    assert any("unranked" in w for w in meta["warnings"])
    assert len(meta["results"]) == 2 and all(
        (tmp_path / "o" / r["file"]).exists() for r in meta["results"]
    )
    # a ranker the user named stays an error (exit 3, nothing written)
    named = [*args[:-1], str(tmp_path / "o2"), "--rank-model", "nobody/no-such-clip", "--quiet"]
    assert main(named) == 3
    assert not (tmp_path / "o2").exists() or not list((tmp_path / "o2").iterdir())
