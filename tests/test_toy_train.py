"""Shapes World training code: data sets, captions, tokenizer, checkpoints and resuming."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import save_sd_folder
from safetensors.torch import load_file

from blendedit.tokenizer import build_clip_tokenizer
from blendedit.toy import train as T
from blendedit.toy.data import (
    SceneData,
    build_dataset,
    scene_for,
    scene_from_dict,
    scene_to_dict,
    train_caption,
)
from blendedit.toy.judge import read_objects
from blendedit.toy.world import Background, Obj, Scene, render


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("data"), n=12, size=128, seed=0, workers=1)


def test_dataset_is_scene_for_index_and_round_trips(data_dir):
    data = SceneData(data_dir)
    assert data.images.shape == (12, 128, 128, 3) and data.images.dtype == np.uint8
    for i in (0, 7):
        assert data.scenes[i] == scene_for(0, i)
        assert (
            scene_from_dict(json.loads(json.dumps(scene_to_dict(data.scenes[i]))))
            == (data.scenes[i])
        )
        assert np.array_equal(data.images[i], np.asarray(render(scene_for(0, i), 128)))
    assert scene_for(1, 0) != scene_for(0, 0)  # the held-out seed draws other scenes
    stamp = (data_dir / "images-128.npy").stat().st_mtime_ns
    build_dataset(data_dir, n=12, size=128, seed=0, workers=1)  # complete: not rebuilt
    assert (data_dir / "images-128.npy").stat().st_mtime_ns == stamp


def test_missing_dataset_says_how_to_build_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="blendedit.toy.train data"):
        SceneData(tmp_path)


def test_captions_drop_about_ten_percent_and_name_only_the_scenes_objects():
    rng = np.random.RandomState(0)
    scene = Scene(
        Background("plain", ("slate",)),
        (Obj("star", "red", 0.3, 0.3, 0.1, 0.0), Obj("cross", "blue", 0.7, 0.7, 0.18, 0.0)),
    )
    caps = [train_caption(scene, rng) for _ in range(2000)]
    assert 0.08 < caps.count("") / len(caps) < 0.12
    singles = [c for c in caps if c and " and " not in c]
    assert len(singles) > 500  # one object of a multi-object scene (SHAPES_WORLD.md)
    for c in caps:
        assert ("red star" in c) or ("blue cross" in c) or c == ""
        assert "green" not in c and "circle" not in c


def test_world_tokenizer_one_token_per_word_and_captions_fit(tmp_path):
    tok = build_clip_tokenizer(T.world_words(), tmp_path, max_length=T.TEXT_MAX_LENGTH)
    for w in T.world_words():
        assert len(tok(w).input_ids) == 3, w  # bos, word, eos
    longest = "a small purple triangle and a big orange square and a small yellow cross on a "
    longest += "light gray background"
    assert len(tok(longest).input_ids) <= T.TEXT_MAX_LENGTH
    ids = T.tokenize(tok, ["a red circle", "a red square", "a blue circle", ""])
    assert ids.shape == (4, T.TEXT_MAX_LENGTH)
    assert len({tuple(r.tolist()) for r in ids}) == 4


def test_read_objects_reads_every_rendered_object():
    scene = Scene(
        Background("stripes", ("cream", "gray"), angle=0.785, period=0.1),
        (Obj("star", "green", 0.3, 0.3, 0.15, 0.4), Obj("circle", "purple", 0.72, 0.7, 0.12)),
    )
    found = {(c, s) for c, s, _ in read_objects(render(scene, 64))}
    assert found == {("green", "star"), ("purple", "circle")}
    assert read_objects(render(Scene(Background("plain", ("tan",))), 64)) == []


def _pixel_args(data_dir, out, steps, fresh=False, stop_at=None):
    return T.build_parser().parse_args(
        [
            "pixel",
            "--data",
            str(data_dir),
            "--out",
            str(out),
            "--steps",
            str(steps),
            "--batch-size",
            "2",
            "--log-every",
            "1",
            "--ckpt-every",
            "1",
            "--warmup",
            "2",
        ]
        + (["--fresh"] if fresh else [])
        + (["--stop-at", str(stop_at)] if stop_at else [])
    )


SMALL_PIXEL = dict(T.PIXEL_CONFIG, block_out_channels=(8, 8, 16, 16), norm_num_groups=4)


def _shrink_pixel(monkeypatch):
    monkeypatch.setattr(T.arch, "PIXEL_CONFIG", SMALL_PIXEL)


def test_pixel_training_resumes_exactly_and_writes_a_loadable_model(
    data_dir, tmp_path, monkeypatch
):
    _shrink_pixel(monkeypatch)
    T.train_pixel(_pixel_args(data_dir, tmp_path / "straight", 4))
    T.train_pixel(_pixel_args(data_dir, tmp_path / "resumed", 4, stop_at=2))  # interrupted
    assert not (tmp_path / "resumed" / "model").exists()
    T.train_pixel(_pixel_args(data_dir, tmp_path / "resumed", 4))  # the same command again
    state = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4
    a = load_file(tmp_path / "straight" / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "resumed" / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = (tmp_path / "resumed" / "loss.csv").read_text().splitlines()
    assert log[0].startswith("step,loss") and [r.split(",")[0] for r in log[1:]] == [
        "1",
        "2",
        "3",
        "4",
    ]
    card = (tmp_path / "resumed" / "card.md").read_text()
    assert "steps: 4" in card and "python -m blendedit.toy.train" in card
    from diffusers import UNet2DModel

    UNet2DModel.from_pretrained(tmp_path / "resumed" / "model" / "unet")


def test_pixel_min_objects_skips_empty_scenes_and_init_from_starts_there(
    data_dir, tmp_path, monkeypatch
):
    _shrink_pixel(monkeypatch)
    T.train_pixel(_pixel_args(data_dir, tmp_path / "a", 1))
    scenes = SceneData(data_dir).scenes
    assert any(not sc.objects for sc in scenes)  # the fixture has empty scenes to skip
    drawn = []
    real = T.image_batch
    monkeypatch.setattr(T.pixel, "image_batch", lambda d, idx: drawn.extend(idx) or real(d, idx))
    args = _pixel_args(data_dir, tmp_path / "b", 3)
    args.init_from, args.min_objects, args.lr = str(tmp_path / "a" / "model"), 1, 0.0
    T.train_pixel(args)  # lr 0: the weights stay where they start
    assert drawn and all(scenes[i].objects for i in drawn)
    a = load_file(tmp_path / "a" / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "b" / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    card = (tmp_path / "b" / "card.md").read_text()
    assert card.startswith("# Shapes World pixel model, continued") and "at least 1 object" in card
    args = _pixel_args(data_dir, tmp_path / "c", 1)
    args.min_objects = 4
    with pytest.raises(SystemExit, match="--min-objects 4"):
        T.train_pixel(args)


def test_snapshot_writes_the_runs_current_ema_as_its_model_would_be(
    data_dir, tmp_path, monkeypatch
):
    _shrink_pixel(monkeypatch)
    T.train_pixel(_pixel_args(data_dir, tmp_path / "done", 3))
    T.train_pixel(_pixel_args(data_dir, tmp_path / "half", 3, stop_at=2))
    # a finished run: the snapshot of its last checkpoint is its model
    snap = T.snapshot(tmp_path / "done")
    name = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(snap / name), load_file(tmp_path / "done" / "model" / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # an unfinished one: its checkpoint's EMA, at the step it reached, loadable
    snap = T.snapshot(tmp_path / "half")
    state = torch.load(tmp_path / "half" / "checkpoint.pt", weights_only=True)
    assert (snap / "STEP").read_text().strip() == "2" and not (tmp_path / "half" / "model").exists()
    c = load_file(snap / name)
    assert all(torch.equal(c[k], state["ema"][k]) for k in c)
    assert not all(torch.equal(c[k], a[k]) for k in c)  # two steps are not three
    from diffusers import DDPMScheduler, UNet2DModel

    UNet2DModel.from_pretrained(snap / "unet")
    DDPMScheduler.from_pretrained(snap / "scheduler")
    with pytest.raises(SystemExit, match="no checkpoint.pt"):
        T.snapshot(tmp_path / "nowhere")


def test_fresh_ignores_the_checkpoint(data_dir, tmp_path, monkeypatch):
    _shrink_pixel(monkeypatch)
    T.train_pixel(_pixel_args(data_dir, tmp_path / "r", 2))
    T.train_pixel(_pixel_args(data_dir, tmp_path / "r", 1, fresh=True))
    assert torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["step"] == 1


@pytest.fixture(scope="module")
def single_dir(tmp_path_factory):
    return build_dataset(
        tmp_path_factory.mktemp("single"), n=6, size=128, seed=0, workers=1, objects=1
    )


def test_one_object_data_set_and_rebuild_on_another_object_count(single_dir, tmp_path):
    data = SceneData(single_dir)
    assert [len(s.objects) for s in data.scenes] == [1] * 6
    assert data.scenes[3] == scene_for(0, 3, objects=1) != scene_for(0, 3)
    assert json.loads((single_dir / "scenes.json").read_text())["objects"] == 1
    folder = build_dataset(tmp_path / "d", n=3, size=64, seed=0, workers=1, objects=1)
    stamp = (folder / "images-64.npy").stat().st_mtime_ns
    build_dataset(folder, n=3, size=64, seed=0, workers=1, objects=2)  # not the same data set
    assert [len(s.objects) for s in SceneData(folder, 64).scenes] == [2] * 3
    assert (folder / "images-64.npy").stat().st_mtime_ns != stamp
    with pytest.raises(ValueError, match="objects: a scene holds 0 to 3"):
        build_dataset(tmp_path / "e", n=1, objects=4)


def test_dihedral_gives_the_eight_distinct_turns_and_flips():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    outs = [T._dihedral(x, k) for k in range(8)]
    assert len({tuple(o.flatten().tolist()) for o in outs}) == 8
    assert torch.equal(outs[0], x) and torch.equal(T._dihedral(outs[1], 3), x)


def _vision_args(data, out, steps, stop_at=None):
    argv = ["vision", "--data", str(data), "--out", str(out), "--steps", str(steps)]
    argv += ["--batch-size", "3", "--log-every", "1", "--warmup", "1"]
    return T.build_parser().parse_args(argv + (["--stop-at", str(stop_at)] if stop_at else []))


@pytest.mark.slow
def test_vision_stage_trains_resumes_and_starts_the_clip(single_dir, data_dir, tmp_path):
    T.train_vision(_vision_args(single_dir, tmp_path / "v", 2, stop_at=1))
    assert not (tmp_path / "v" / "model").exists()
    snap = T.snapshot(tmp_path / "v")  # an unfinished vision run can be looked at
    assert (snap / "STEP").read_text().strip() == "1" and (snap / "head.safetensors").exists()
    T.train_vision(_vision_args(single_dir, tmp_path / "v", 2))
    model = tmp_path / "v" / "model"
    metrics = json.loads((tmp_path / "v" / "metrics.json").read_text())
    loaded = T.VisionClassifier.load(model)  # the figures are the saved model's
    acc = {f"{k} top-1 (300 renders)": v for k, v in T.vision_accuracy(loaded).items()}
    assert acc == metrics
    assert set(metrics) == {f"{k} top-1 (300 renders)" for k in ("colour", "shape", "both")}
    assert "steps: 2" in (tmp_path / "v" / "card.md").read_text()
    from transformers import CLIPModel, CLIPVisionModel

    tower = CLIPVisionModel.from_pretrained(model).state_dict()
    tok = build_clip_tokenizer(T.world_words(), None, max_length=T.TEXT_MAX_LENGTH)
    clip = CLIPModel(T.clip_config(tok))
    text_before = {k: v.clone() for k, v in clip.text_model.state_dict().items()}
    fits = T._fitting_weights(clip, model)
    assert set(fits) == {f"vision_model.{k}" for k in tower}  # the whole tower, nothing else
    clip.load_state_dict(fits, strict=False)
    assert all(torch.equal(clip.state_dict()[f"vision_model.{k}"], v) for k, v in tower.items())
    assert all(torch.equal(v, text_before[k]) for k, v in clip.text_model.state_dict().items())
    with pytest.raises(SystemExit, match="model.safetensors is missing"):
        T._fitting_weights(clip, tmp_path)
    # locked-image tuning: the contrastive stage trains around the tower and keeps it
    argv = ["clip", "--data", str(data_dir), "--out", str(tmp_path / "c"), "--steps", "2"]
    argv += ["--batch-size", "4", "--warmup", "1", "--class-loss", "1", "--crop-prob", "0.5"]
    T.train_clip(T.build_parser().parse_args(argv + ["--init-from", str(model), "--freeze-vision"]))
    lit = CLIPModel.from_pretrained(tmp_path / "c" / "model").state_dict()
    assert all(torch.equal(lit[f"vision_model.{k}"], v) for k, v in tower.items())
    torch.manual_seed(0)  # the contrastive run's own start: seed 0, then the tower loaded
    start = CLIPModel(T.clip_config(tok)).state_dict()
    for name in ("visual_projection.weight", "text_projection.weight"):
        assert not torch.equal(lit[name], start[name])  # what is not frozen learns
    assert "locked-image tuning" in (tmp_path / "c" / "card.md").read_text()
    with pytest.raises(SystemExit, match="--init-from"):
        T.train_clip(T.build_parser().parse_args(argv + ["--freeze-vision", "--fresh"]))


def test_vision_stage_names_a_data_set_with_several_objects(data_dir, tmp_path):
    with pytest.raises(SystemExit, match="--objects 1"):
        T.train_vision(_vision_args(data_dir, tmp_path / "v", 2))


def _tiny_unet_inputs(monkeypatch, vae_dir, clip_dir, half=False) -> dict:
    """A tiny UNet config (patched in) and a tiny VAE and CLIP (with the world's tokenizer)
    saved in ``vae_dir`` and ``clip_dir``, for train_unet's --vae and --clip; returns the
    UNet config."""
    from diffusers import AutoencoderKL
    from transformers import CLIPModel

    small = dict(T.UNET_CONFIG, block_out_channels=(8, 8, 8), norm_num_groups=4)
    monkeypatch.setattr(T.arch, "UNET_CONFIG", small)
    vae = AutoencoderKL(**dict(T.VAE_CONFIG, block_out_channels=(8, 8, 8, 8), norm_num_groups=4))
    tok = build_clip_tokenizer(T.world_words(), None, max_length=T.TEXT_MAX_LENGTH)
    clip = CLIPModel(T.clip_config(tok))
    if half:  # like the shipped models
        vae, clip = vae.half(), clip.half()
    vae.save_pretrained(vae_dir)
    clip.save_pretrained(clip_dir)
    tok.save_pretrained(clip_dir)
    return small


def test_unet_widths_bf16_and_device_options_train_and_snapshot(data_dir, tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    _tiny_unet_inputs(monkeypatch, tmp_path / "vae" / "model", tmp_path / "clip" / "model")
    base = ["unet", "--data", str(data_dir), "--steps", "2", "--batch-size", "4"]
    base += ["--clip", str(tmp_path / "clip"), "--vae", str(tmp_path / "vae"), "--device", "cpu"]
    wide = ["--channels", "32", "32", "64", "--layers", "2"]
    losses = {}
    for name, extra in (("fp32", []), ("bf16", ["--bf16"])):
        T.train_unet(
            T.build_parser().parse_args(base + wide + extra + ["--out", str(tmp_path / name)])
        )
        rows = (tmp_path / name / "loss.csv").read_text().splitlines()
        losses[name] = float(rows[-1].split(",")[1])
    # autocast is on: the same draws give a slightly different loss, not a broken one
    assert losses["bf16"] != losses["fp32"] and abs(losses["bf16"] / losses["fp32"] - 1) < 0.1
    model = UNet2DConditionModel.from_pretrained(tmp_path / "bf16" / "model")
    assert list(model.config.block_out_channels) == [32, 32, 64]
    assert model.config.layers_per_block == 2
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay float32
    snap = UNet2DConditionModel.from_pretrained(T.snapshot(tmp_path / "bf16"))  # its own widths
    a, b = snap.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit, match="--device nonsense: not usable here"):
        T.train_unet(T.build_parser().parse_args(base[:-1] + ["nonsense", "--out", str(tmp_path)]))
    with pytest.raises(SystemExit, match="widths .32, 32, 64. x 2 layers are not this one's"):
        argv = base + ["--init-from", str(tmp_path / "bf16"), "--out", str(tmp_path / "y")]
        T.train_unet(T.build_parser().parse_args(argv))
    with pytest.raises(SystemExit, match="--channels: each width a multiple of 32"):
        argv = base + ["--channels", "32", "48", "64", "--out", str(tmp_path / "x")]
        T.train_unet(T.build_parser().parse_args(argv))


def test_unet_zero_snr_trains_v_prediction_on_a_schedule_that_ends_in_pure_noise(
    data_dir, tmp_path, monkeypatch
):
    sched = T._latent_ddpm(zero_snr=True)
    assert float(sched.alphas_cumprod[-1]) < 1e-6 < float(T._latent_ddpm().alphas_cumprod[-1])
    z0, noise = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    t = torch.tensor([999, 500])
    v = sched.get_velocity(z0, noise, t)
    assert torch.allclose(v[0], -z0[0], atol=1e-3)  # at pure noise v is minus the image
    _tiny_unet_inputs(monkeypatch, tmp_path / "vae" / "model", tmp_path / "clip" / "model")
    argv = ["unet", "--data", str(data_dir), "--steps", "2", "--batch-size", "4", "--zero-snr"]
    argv += ["--clip", str(tmp_path / "clip"), "--vae", str(tmp_path / "vae")]
    T.train_unet(T.build_parser().parse_args(argv + ["--out", str(tmp_path / "u")]))
    loss = float((tmp_path / "u" / "loss.csv").read_text().splitlines()[-1].split(",")[1])
    assert math.isfinite(loss) and loss > 0
    assert "v-prediction" in (tmp_path / "u" / "card.md").read_text()
    # the scheduler it needs travels with it, through a snapshot and into the assembled pipeline
    assert (
        json.loads((T.snapshot(tmp_path / "u") / "sampling.json").read_text())["prediction_type"]
        == "v_prediction"
    )
    argv = ["assemble", "--work", str(tmp_path), "--vae", "vae", "--clip", "clip", "--unet", "u"]
    T.assemble(T.build_parser().parse_args(argv + ["--pixel", "", "--dest", str(tmp_path / "toy")]))
    cfg = json.loads((tmp_path / "toy/pipeline/scheduler/scheduler_config.json").read_text())
    assert cfg["_class_name"] == "DDIMScheduler" and cfg["rescale_betas_zero_snr"] is True
    assert (cfg["prediction_type"], cfg["timestep_spacing"]) == ("v_prediction", "trailing")
    T.assemble(
        T.build_parser().parse_args(
            argv[:2] + [str(tmp_path), "--only", "clip", "--dest", str(tmp_path / "toy")]
        )
    )
    again = json.loads((tmp_path / "toy/pipeline/scheduler/scheduler_config.json").read_text())
    assert again == cfg  # replacing another part keeps it


def test_unet_init_from_starts_from_the_given_unet(data_dir, tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    small = _tiny_unet_inputs(monkeypatch, tmp_path / "vae" / "model", tmp_path / "clip" / "model")
    torch.manual_seed(123)
    UNet2DConditionModel(**small).save_pretrained(tmp_path / "start")
    argv = ["unet", "--data", str(data_dir), "--out", str(tmp_path / "u"), "--steps", "1"]
    argv += ["--batch-size", "2", "--lr", "0", "--clip", str(tmp_path / "clip")]
    argv += ["--vae", str(tmp_path / "vae"), "--init-from", str(tmp_path / "start")]
    T.train_unet(T.build_parser().parse_args(argv))  # lr 0: the weights stay where they start
    a = load_file(tmp_path / "start" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "u" / "model" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "u" / "model" / "text_encoder").exists()  # frozen: not shipped here
    card = (tmp_path / "u" / "card.md").read_text()
    assert "Started from" in card
    assert card.startswith("# Shapes World text-to-image UNet, continued from an earlier run")


def test_unet_pooled_text_joins_a_unet_silently_and_then_conditions_it(
    data_dir, tmp_path, monkeypatch
):
    from diffusers import UNet2DConditionModel

    small = _tiny_unet_inputs(monkeypatch, tmp_path / "vae" / "model", tmp_path / "clip" / "model")
    torch.manual_seed(4)
    plain = UNet2DConditionModel(**small)
    plain.save_pretrained(tmp_path / "start")
    argv = ["unet", "--data", str(data_dir), "--out", str(tmp_path / "u"), "--steps", "1"]
    argv += ["--batch-size", "2", "--lr", "0", "--clip", str(tmp_path / "clip")]
    argv += ["--vae", str(tmp_path / "vae"), "--init-from", str(tmp_path / "start")]
    T.train_unet(T.build_parser().parse_args(argv + ["--pooled-text"]))
    pooled = UNet2DConditionModel.from_pretrained(tmp_path / "u" / "model")
    assert pooled.config.addition_embed_type == "text"
    z, t = torch.randn(2, 4, 16, 16), torch.tensor([900, 10])
    a, b = torch.randn(2, 8, 128), torch.randn(2, 8, 128)
    with torch.no_grad():  # added silent: the continued UNet answers as the one it started from
        assert torch.allclose(pooled(z, t, a).sample, plain(z, t, a).sample, atol=1e-6)
        pooled.add_embedding.norm2.weight.fill_(1.0)  # once it has learnt: the text's pooled
        pooled.add_embedding.norm2.bias.normal_()  # hidden states move the time embedding
        assert not torch.allclose(pooled.add_embedding(a), pooled.add_embedding(b))
        assert not torch.allclose(pooled(z, t, a).sample, plain(z, t, a).sample, atol=1e-4)
    snap = UNet2DConditionModel.from_pretrained(T.snapshot(tmp_path / "u"))
    assert snap.config.addition_embed_type == "text"
    argv[argv.index("--init-from") + 1] = str(tmp_path / "u")  # pooled into a plain UNet: no
    argv[argv.index("--out") + 1] = str(tmp_path / "v")
    with pytest.raises(SystemExit, match="--pooled-text can be added to a UNet without it"):
        T.train_unet(T.build_parser().parse_args(argv))


def test_card_chain_lists_the_runs_a_run_started_from_earliest_first(tmp_path):
    def run(name, *commands):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "card.md").write_text(f"# {name}\n")
        log = [f"from step 0: python -m blendedit.toy.train {c}" for c in commands]
        (folder / "commands.log").write_text("\n".join(log) + "\n")
        return folder

    vision = run("vision", "vision --out x")
    lit = run("lit", f"clip --init-from {vision / 'model'} --freeze-vision", "clip --steps 9")
    vae = run("vae", "vae --steps 3")
    dec = run("dec", f"vae --decoder-only {vae / 'model'} --crop 128")
    assert T._card_chain(lit) == [vision / "card.md", lit / "card.md"]
    assert T._card_chain(dec) == [vae / "card.md", dec / "card.md"]
    assert T._card_chain(vae) == [vae / "card.md"]  # no parent: just its own card
    cont = run("cont", f"vae --init-from {dec} --object-weight 10")  # a run folder, not model/
    assert T._card_chain(cont) == [vae / "card.md", dec / "card.md", cont / "card.md"]
    other = run("other", f"unet --init-from {tmp_path / 'elsewhere'}")  # not a run's model/
    assert T._card_chain(other) == [other / "card.md"]
    a, b = tmp_path / "a", tmp_path / "b"  # runs that name each other: no endless recursion
    run("a", f"unet --init-from {b / 'model'}")
    run("b", f"unet --init-from {a / 'model'}")
    assert T._card_chain(a) == [b / "card.md", a / "card.md"]


def test_unet_takes_committed_float16_model_folders_for_vae_and_clip(
    data_dir, tmp_path, monkeypatch
):
    from diffusers import UNet2DConditionModel

    _tiny_unet_inputs(monkeypatch, tmp_path / "ckpt" / "vae", tmp_path / "ckpt" / "clip", half=True)
    argv = ["unet", "--data", str(data_dir), "--out", str(tmp_path / "u"), "--steps", "1"]
    argv += ["--batch-size", "2", "--clip", str(tmp_path / "ckpt" / "clip")]
    argv += ["--vae", str(tmp_path / "ckpt" / "vae")]
    T.train_unet(T.build_parser().parse_args(argv))
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "u" / "model")
    assert unet.dtype == torch.float32
    cache = tmp_path / "u" / f"latents-{data_dir.name}.pt"
    assert torch.load(cache, weights_only=True).dtype == torch.float32
    argv[argv.index("--vae") + 1] = str(tmp_path / "nowhere")
    argv[argv.index("--out") + 1] = str(tmp_path / "v")  # no cached latents there
    with pytest.raises(SystemExit, match="--vae: .*nowhere is neither a finished run"):
        T.train_unet(T.build_parser().parse_args(argv))


def test_unet_draws_from_the_union_of_several_data_sets(data_dir, tmp_path, monkeypatch):
    single = build_dataset(tmp_path / "single", n=5, size=128, seed=3, workers=1, objects=1)
    _tiny_unet_inputs(monkeypatch, tmp_path / "vae", tmp_path / "clip")
    seen = []
    real_caption = T.train_caption
    monkeypatch.setattr(
        T.unet,
        "train_caption",
        lambda sc, rng, **kw: seen.append(sc) or real_caption(sc, rng, **kw),  # noqa: E501
    )
    argv = ["unet", "--data", str(data_dir), str(single), "--out", str(tmp_path / "u")]
    argv += ["--steps", "3", "--batch-size", "16", "--clip", str(tmp_path / "clip")]
    argv += ["--vae", str(tmp_path / "vae")]
    T.train_unet(T.build_parser().parse_args(argv))
    z = [
        torch.load(tmp_path / "u" / f"latents-{d.name}.pt", weights_only=True)
        for d in (data_dir, single)
    ]
    assert [len(x) for x in z] == [12, 5]  # one cache per set, every image encoded
    one_object = [sc for sc in seen if sc in SceneData(single).scenes]
    assert one_object and len(one_object) < len(seen)  # batches mix both sets
    assert f"- data: {data_dir}, {single}" in (tmp_path / "u" / "card.md").read_text()


def test_unet_data_folders_need_distinct_names(tmp_path):
    argv = ["unet", "--data", str(tmp_path / "a" / "data"), str(tmp_path / "b" / "data")]
    with pytest.raises(SystemExit, match="--data: the folders need distinct names"):
        T.train_unet(T.build_parser().parse_args(argv + ["--out", str(tmp_path / "u")]))


def test_assemble_ships_float16_folders_that_load_and_names_a_missing_run(tmp_path, monkeypatch):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DConditionModel, UNet2DModel

    from blendedit import models

    work = tmp_path / "runs"
    small = _tiny_unet_inputs(monkeypatch, work / "vae" / "model", work / "clip" / "model")
    UNet2DConditionModel(**small).save_pretrained(work / "unet" / "model")
    UNet2DModel(**SMALL_PIXEL).save_pretrained(work / "pixel" / "model" / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(work / "pixel" / "model" / "scheduler")
    for run in ("vae", "clip", "unet", "pixel"):
        (work / run / "card.md").write_text(f"# Shapes World {run}\n")
    dest = tmp_path / "toy"
    argv = ["assemble", "--work", str(work), "--vae", "vae", "--clip", "clip"]
    argv += ["--text-encoder", "clip", "--unet", "unet", "--dest", str(dest)]
    T.assemble(T.build_parser().parse_args(argv + ["--pixel", "pixel"]))
    assert models.toy_shipped(dest) and not dest.with_name("toy.tmp").exists()
    weights = list(dest.rglob("*.safetensors"))
    assert {w.parts[len(dest.parts)] for w in weights} == {"pipeline", "clip", "pixel"}
    assert all(t.dtype == torch.float16 for w in weights for t in load_file(w).values())
    c = models.load_sd_components(str(dest / "pipeline"), torch_dtype=torch.float32)
    assert c["unet"].dtype == torch.float32
    assert c["guidance_scale"] == 5.0  # the edits' default guidance travels with the pipeline
    assert len({tuple(c["tokenizer"](p).input_ids) for p in ("a red circle", "a blue star")}) == 2
    assert DDPMPipeline.from_pretrained(dest / "pixel").unet.config.sample_size == 64
    for tok in (dest / "pipeline" / "tokenizer", dest / "clip"):  # how it was loaded is not kept
        assert "local_files_only" not in json.loads((tok / "tokenizer_config.json").read_text())
    card = (dest / "MODEL_CARD.md").read_text()
    assert all(f"# Shapes World {run}" in card for run in ("vae", "clip", "unet", "pixel"))
    before = sorted(p.relative_to(dest) for p in dest.rglob("*"))
    with pytest.raises(SystemExit, match="no such run folder"):  # a typo in a run name
        T.assemble(T.build_parser().parse_args(argv + ["--pixel", "pixle"]))
    assert sorted(p.relative_to(dest) for p in dest.rglob("*")) == before  # the old one stays
    assert not dest.with_name("toy.tmp").exists()  # and nothing half-built is left beside it
    T.assemble(T.build_parser().parse_args(argv + ["--pixel", ""]))  # '' ships none
    assert not (dest / "pixel").exists() and models.toy_shipped(dest)


def _assembled_with_figures(tmp_path, monkeypatch):
    """A shipped folder assembled from tiny runs (no pixel model), with measured figures on its
    card: (runs folder, shipped folder, the UNet's config)."""
    from diffusers import UNet2DConditionModel

    from blendedit.toy.evaluate import write_measured

    work = tmp_path / "runs"
    small = _tiny_unet_inputs(monkeypatch, work / "vae" / "model", work / "clip" / "model")
    torch.manual_seed(0)
    UNet2DConditionModel(**small).save_pretrained(work / "unet" / "model")
    for run in ("vae", "clip", "unet"):
        (work / run / "card.md").write_text(f"# Shapes World {run}\n")
    dest = tmp_path / "toy"
    argv = ["assemble", "--work", str(work), "--vae", "vae", "--clip", "clip", "--vision", ""]
    argv += ["--unet", "unet", "--pixel", "", "--dest", str(dest)]
    T.assemble(T.build_parser().parse_args(argv))
    write_measured(dest / "MODEL_CARD.md", {"t2i_judge_success": 0.25, "seconds": 1})
    return work, dest, small


def test_assemble_only_unet_replaces_the_unet_and_keeps_every_other_part(tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    work, dest, small = _assembled_with_figures(tmp_path, monkeypatch)
    old = {p.relative_to(dest): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    torch.manual_seed(1)
    UNet2DConditionModel(**small).save_pretrained(work / "unet2" / "model")
    (work / "unet2" / "card.md").write_text("# Shapes World unet, continued\n")
    (work / "unet2" / "commands.log").write_text(f"2026: unet --init-from {dest}/pipeline/unet\n")
    shutil.rmtree(work / "vae")  # the parts kept come from the folder itself, not from runs
    update = ["assemble", "--work", str(work), "--only", "unet", "--unet", "unet2"]
    T.assemble(T.build_parser().parse_args(update + ["--dest", str(dest)]))
    new = {p.relative_to(dest): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert new.keys() == old.keys()
    changed = {str(k) for k in new if new[k] != old[k]}
    unet = {f"pipeline/unet/{f}" for f in ("diffusion_pytorch_model.safetensors", "config.json")}
    assert changed == unet | {"MODEL_CARD.md"}  # the rest byte for byte as it was
    assert (
        "unet2"
        in json.loads((dest / "pipeline" / "unet" / "config.json").read_text())["_name_or_path"]
    )
    shipped = load_file(dest / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    trained = UNet2DConditionModel.from_pretrained(work / "unet2" / "model").state_dict()
    assert all(torch.equal(shipped[k], trained[k].half()) for k in shipped)
    card = (dest / "MODEL_CARD.md").read_text()
    assert card.index("# Shapes World unet\n") < card.index("# Shapes World unet, continued")
    assert "# Shapes World vae" in card and "Measured by" not in card  # stale figures dropped
    with pytest.raises(SystemExit, match="not an assembled folder"):
        T.assemble(T.build_parser().parse_args(update + ["--dest", str(tmp_path / "none")]))
    with pytest.raises(SystemExit, match="no such run folder"):
        T.assemble(T.build_parser().parse_args(update[:-1] + ["unte", "--dest", str(dest)]))
    assert {p.relative_to(dest): p.read_bytes() for p in dest.rglob("*") if p.is_file()} == new


def test_assemble_only_guide_clip_adds_it_and_keeps_every_part_and_figure(tmp_path, monkeypatch):
    """`assemble --only guide-clip`: the pixel model's guidance CLIP is added beside the ranking
    one; nothing else changes, and the card's measured figures stay (none measures it)."""
    from transformers import CLIPModel

    from blendedit.toy.common import MEASURED

    work, dest, _ = _assembled_with_figures(tmp_path, monkeypatch)
    old = {p.relative_to(dest): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    figures = (dest / "MODEL_CARD.md").read_text().split(MEASURED)[1]
    guide = CLIPModel.from_pretrained(work / "clip" / "model")
    with torch.no_grad():
        for w in guide.vision_model.parameters():
            w.add_(0.01)
    guide.save_pretrained(work / "g" / "model")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(work / "clip" / "model" / f, work / "g" / "model" / f)
    (work / "g" / "card.md").write_text("# Shapes World guidance CLIP (x̂0)\n")
    update = ["assemble", "--work", str(work), "--only", "guide-clip", "--guide-clip", "g"]
    T.assemble(T.build_parser().parse_args(update + ["--dest", str(dest)]))
    new = {p.relative_to(dest): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert {str(k) for k in new if k not in old} == {
        f"guide-clip/{f}"
        for f in (
            "config.json",
            "model.safetensors",
            "preprocessor_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
        )
    }
    assert {str(k) for k in old if new[k] != old[k]} == {"MODEL_CARD.md"}
    shipped = load_file(dest / "guide-clip" / "model.safetensors")
    assert all(
        torch.equal(shipped[k], v.half()) for k, v in guide.state_dict().items() if k in shipped
    )
    card = (dest / "MODEL_CARD.md").read_text()
    assert card.index("# Shapes World guidance CLIP") < card.index(MEASURED)
    assert card.split(MEASURED)[1] == figures and "0.25" in figures


def test_unet_train_text_encoder_trains_it_and_the_pipeline_ships_that_one(
    data_dir, tmp_path, monkeypatch
):
    from transformers import AutoTokenizer, CLIPTextModel

    work = tmp_path / "runs"
    _tiny_unet_inputs(monkeypatch, work / "vae" / "model", work / "clip" / "model")
    argv = ["unet", "--data", str(data_dir), "--out", str(work / "u"), "--steps", "3"]
    argv += ["--batch-size", "4", "--lr", "1e-2", "--clip", str(work / "clip")]
    argv += ["--vae", str(work / "vae"), "--train-text-encoder", "--ckpt-every", "2"]
    T.train_unet(T.build_parser().parse_args(argv))
    key = "encoder.layers.0.self_attn.q_proj.weight"
    start = CLIPTextModel.from_pretrained(work / "clip" / "model").state_dict()[key]
    trained = work / "u" / "model" / "text_encoder"
    assert not torch.equal(CLIPTextModel.from_pretrained(trained).state_dict()[key], start)
    tok = AutoTokenizer.from_pretrained(trained)  # the tokenizer travels with it
    assert len({tuple(tok(p).input_ids) for p in ("a red circle", "a red square")}) == 2
    assert "trained with the UNet" in (work / "u" / "card.md").read_text()
    # a snapshot of the finished run's checkpoint is laid out as its model/, text encoder too
    snap = T.snapshot(work / "u")
    a = CLIPTextModel.from_pretrained(snap / "text_encoder").state_dict()
    b = CLIPTextModel.from_pretrained(trained).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    dest = tmp_path / "toy"
    argv = ["assemble", "--work", str(work), "--vae", "vae", "--clip", "clip", "--unet", "u"]
    argv += ["--pixel", "", "--vision", "", "--dest", str(dest)]
    T.assemble(T.build_parser().parse_args(argv))
    shipped = CLIPTextModel.from_pretrained(dest / "pipeline" / "text_encoder").state_dict()[key]
    assert torch.equal(shipped, b[key].half())  # the UNet's own, not the CLIP's
    with pytest.raises(SystemExit, match="trained with its own text encoder"):
        T.assemble(T.build_parser().parse_args(argv + ["--text-encoder", "clip"]))


def test_object_band_covers_objects_and_their_edges_and_weights_the_loss():
    obj = Obj(shape="square", colour="red", cx=0.5, cy=0.5, r=0.15)
    plain = Background("plain", ("cream",))
    scenes = [Scene(plain, (obj,)), Scene(plain, ())]
    band = T.object_band(scenes, 64)
    assert band.shape == (2, 1, 64, 64) and float(band[1].max()) == 0  # no objects: no band
    cov = torch.from_numpy(T.coverage(obj, 64, ss=2)) > 0
    assert bool((band[0, 0][cov] == 1).all())  # every covered pixel is in the band
    ring = (T.object_band(scenes[:1], 64, band=2)[0, 0] > 0) & ~cov
    assert 0 < int(ring.sum()) and int(ring.sum()) < int(cov.sum())  # a thin band around it
    x = torch.zeros(2, 3, 64, 64)
    rec = x.clone()
    rec[0, :, ~cov] = 0.5  # error only off the object
    w = 1 + 10 * band
    plain, weighted = T._weighted_rec_loss(rec, x), T._weighted_rec_loss(rec, x, w)
    assert weighted < plain  # the weights move the loss towards object pixels
    rec2 = x.clone()
    rec2[0, :, cov] = 0.5  # the same error on the object
    assert T._weighted_rec_loss(rec2, x, w) > T._weighted_rec_loss(rec2, x)
    assert torch.isclose(T._weighted_rec_loss(rec, x, torch.ones(2, 1, 64, 64)), plain)


@pytest.mark.slow
def test_vae_init_from_continues_a_vae_with_the_object_weighted_loss(
    data_dir, tmp_path, monkeypatch
):
    from diffusers import AutoencoderKL

    small = dict(T.VAE_CONFIG, block_out_channels=(8, 8, 8, 8), norm_num_groups=4)
    monkeypatch.setattr(T.arch, "VAE_CONFIG", small)
    torch.manual_seed(5)
    AutoencoderKL(**small).save_pretrained(tmp_path / "start" / "model")
    (tmp_path / "start" / "card.md").write_text("# Shapes World VAE\n")
    argv = [
        "vae",
        "--data",
        str(data_dir),
        "--heldout",
        str(data_dir),
        "--out",
        str(tmp_path / "v"),
    ]
    argv += ["--steps", "1", "--batch-size", "2", "--lr", "0", "--crop", "128"]
    argv += ["--init-from", str(tmp_path / "start"), "--object-weight", "10"]
    T.train_vae(T.build_parser().parse_args(argv))  # lr 0: the weights stay where they start
    a = load_file(tmp_path / "start" / "model" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "v" / "model" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    card = (tmp_path / "v" / "card.md").read_text()
    assert card.startswith("# Shapes World VAE, continued from an earlier run")
    assert "weighs 11x" in card
    with pytest.raises(SystemExit, match="--decoder-only and --init-from"):
        T.train_vae(T.build_parser().parse_args(argv + ["--decoder-only", str(tmp_path / "start")]))


@pytest.mark.slow
def test_vae_denoised_by_decodes_the_unets_one_step_predictions(data_dir, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    small = _tiny_unet_inputs(monkeypatch, tmp_path / "vae" / "model", tmp_path / "clip")
    pipe = tmp_path / "pipe"
    save_sd_folder(
        pipe,
        vae=AutoencoderKL.from_pretrained(tmp_path / "vae" / "model"),
        text_encoder=CLIPTextModel.from_pretrained(tmp_path / "clip"),
        tokenizer=AutoTokenizer.from_pretrained(tmp_path / "clip"),
        unet=UNet2DConditionModel(**small),
        scheduler=DDIMScheduler(**T.LATENT_SCHEDULER),
    )
    den = T._Denoiser(str(pipe))
    z0 = torch.randn(6, 4, 16, 16)
    texts = ["a red circle"] * 6
    rng = np.random.RandomState(0)
    assert torch.equal(den(z0, texts, rng, 250, clean_share=1.0), z0)
    mixed = den(z0, texts, np.random.RandomState(1), 250, clean_share=0.5)
    same = [torch.equal(a, b) for a, b in zip(mixed, z0)]
    assert any(same) and not all(same)  # some clean, the rest the UNet's prediction
    den.unet = lambda zt, t, cond: type("Out", (), {"sample": torch.zeros_like(zt)})()
    g = np.random.RandomState(2)  # an epsilon of zero: x0 is z_t scaled back to the signal
    x0 = den(z0, texts, g, 0, clean_share=0.0)  # t = 0: almost no noise, so x0 is near z0
    assert not torch.equal(x0, z0) and torch.allclose(x0, z0, atol=0.2)
    # a `unet --zero-snr` pipeline: its UNet answers v, on the rescaled schedule
    shutil.copytree(pipe, tmp_path / "pipe_v")
    zero_snr = dict(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    DDIMScheduler(**T.LATENT_SCHEDULER, **zero_snr).save_pretrained(
        tmp_path / "pipe_v" / "scheduler"
    )
    den_v = T._Denoiser(str(tmp_path / "pipe_v"))
    den_v.unet = den.unet  # v = 0: x0 = sqrt(alpha_bar) z_t (an epsilon of 0 would divide by it)
    g = torch.Generator().manual_seed(int(np.random.RandomState(3).randint(2**31)))
    t = torch.randint(0, 1000, (6,), generator=g)  # the draws __call__ makes, in its order
    ab = den_v.sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert float(den_v.sched.alphas_cumprod[-1]) < 1e-6  # rescaled: pure noise at the last step
    zt = ab.sqrt() * z0 + (1 - ab).sqrt() * torch.randn(z0.shape, generator=g)
    x0 = den_v(z0, texts, np.random.RandomState(3), 999, clean_share=0.0)
    assert torch.allclose(x0, ab.sqrt() * zt, atol=1e-5)
    vae_small = dict(T.VAE_CONFIG, block_out_channels=(8, 8, 8, 8), norm_num_groups=4)
    monkeypatch.setattr(T.arch, "VAE_CONFIG", vae_small)
    argv = ["vae", "--data", str(data_dir), "--heldout", str(data_dir), "--out"]
    argv += [str(tmp_path / "d"), "--steps", "1", "--batch-size", "2", "--crop", "128"]
    argv += ["--decoder-only", str(tmp_path / "vae"), "--denoised-by", str(pipe)]
    T.train_vae(T.build_parser().parse_args(argv))
    assert AutoencoderKL.from_pretrained(tmp_path / "d" / "model").config.latent_channels == 4
    assert "predicted back in one step by the UNet of" in (tmp_path / "d" / "card.md").read_text()
    bad = [a if a != "128" else "32" for a in argv]  # crops: the captions would not fit them
    with pytest.raises(SystemExit, match="--denoised-by: only with --decoder-only"):
        T.train_vae(T.build_parser().parse_args(bad + ["--fresh"]))
    argv[argv.index("--denoised-by") + 1] = str(tmp_path / "clip")
    with pytest.raises(SystemExit, match="not a pipeline folder"):
        T.train_vae(T.build_parser().parse_args(argv + ["--fresh"]))


def test_unet_object_weight_weighs_the_latent_cells_under_objects(data_dir, tmp_path, monkeypatch):
    plain = Background("plain", ("cream",))
    corner = Scene(plain, (Obj("square", "red", 0.2, 0.2, 0.1, 0.0),))
    cells = T.object_cells([corner, Scene(plain, ())], 128, 8)
    assert cells.shape == (2, 1, 16, 16) and float(cells[1].max()) == 0
    on = cells[0, 0] > 0
    assert on[3, 3] and not on[12, 12] and 4 <= int(on.sum()) <= 25  # its cells, no others
    err = torch.zeros(2, 4, 16, 16)
    err[:, :, on] = 1.0  # all the error on the object's cells
    w = 1 + 4 * cells
    assert torch.allclose(T._per_image_mean(err, torch.ones_like(w)), T._per_image_mean(err))
    assert T._per_image_mean(err, w)[0] > 2 * T._per_image_mean(err)[0]
    _tiny_unet_inputs(monkeypatch, tmp_path / "vae", tmp_path / "clip")
    argv = ["unet", "--data", str(data_dir), "--out", str(tmp_path / "u"), "--steps", "1"]
    argv += ["--batch-size", "4", "--clip", str(tmp_path / "clip"), "--vae", str(tmp_path / "vae")]
    T.train_unet(T.build_parser().parse_args(argv + ["--object-weight", "4", "--name-small"]))
    card = (tmp_path / "u" / "card.md").read_text()
    assert "weigh 5x in the loss" in card and "always called small" in card


def test_unet_max_t_trains_only_on_the_low_noise_steps(data_dir, tmp_path, monkeypatch):
    _tiny_unet_inputs(monkeypatch, tmp_path / "vae", tmp_path / "clip")
    drawn = []
    real = T._noise_and_steps

    def recording(*a, **k):
        noise, t = real(*a, **k)
        drawn.append(t)
        return noise, t

    monkeypatch.setattr(T.unet, "_noise_and_steps", recording)
    argv = ["unet", "--data", str(data_dir), "--out", str(tmp_path / "u"), "--steps", "3"]
    argv += ["--batch-size", "16", "--clip", str(tmp_path / "clip"), "--vae", str(tmp_path / "vae")]
    T.train_unet(T.build_parser().parse_args(argv + ["--max-t", "40"]))
    t = torch.cat(drawn)
    assert len(t) == 48 and int(t.max()) < 40 and len(set(t.tolist())) > 10
    assert "only on timesteps below 40" in (tmp_path / "u" / "card.md").read_text()
    with pytest.raises(SystemExit, match="--max-t: .* from 1 to 1000; got 0"):
        T.train_unet(T.build_parser().parse_args(argv + ["--max-t", "0", "--fresh"]))


def test_unet_limit_encodes_and_draws_only_the_first_images(data_dir, tmp_path, monkeypatch):
    _tiny_unet_inputs(monkeypatch, tmp_path / "vae", tmp_path / "clip")
    seen = []
    real_caption = T.train_caption
    monkeypatch.setattr(
        T.unet,
        "train_caption",
        lambda sc, rng, **kw: seen.append(sc) or real_caption(sc, rng, **kw),  # noqa: E501
    )
    argv = ["unet", "--data", str(data_dir), "--out", str(tmp_path / "u"), "--limit", "4"]
    argv += ["--steps", "2", "--batch-size", "16", "--clip", str(tmp_path / "clip")]
    argv += ["--vae", str(tmp_path / "vae")]
    T.train_unet(T.build_parser().parse_args(argv))
    z = torch.load(tmp_path / "u" / f"latents-{data_dir.name}-first4.pt", weights_only=True)
    assert len(z) == 4
    first = SceneData(data_dir).scenes[:4]
    assert seen and all(sc in first for sc in seen)
    assert "Only the first 4 images of each data set." in (tmp_path / "u" / "card.md").read_text()
    argv[argv.index("--limit") + 1] = "0"
    with pytest.raises(SystemExit, match="--limit: .* at least 1; got 0"):
        T.train_unet(T.build_parser().parse_args(argv))


@pytest.mark.slow
def test_vae_factor_4_gives_32x32_latents_and_the_unet_takes_the_32x32_layout(
    data_dir, tmp_path, monkeypatch
):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    _tiny_unet_inputs(monkeypatch, tmp_path / "unused-vae", tmp_path / "clip")
    monkeypatch.setattr(
        T.arch, "VAE_CONFIG", dict(T.VAE_CONFIG, block_out_channels=(8, 8, 8, 8), norm_num_groups=4)
    )
    argv = ["vae", "--factor", "4", "--data", str(data_dir), "--heldout", str(data_dir)]
    argv += ["--out", str(tmp_path / "v4"), "--steps", "2", "--batch-size", "2", "--crop", "64"]
    T.train_vae(T.build_parser().parse_args(argv + ["--object-weight", "10"]))
    vae = AutoencoderKL.from_pretrained(tmp_path / "v4" / "model")
    assert T.vae_factor(vae.config) == 4 and vae.config.layers_per_block == 2
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 128, 128)).latent_dist.mode()
    assert z.shape == (1, 4, 32, 32)
    card = (tmp_path / "v4" / "card.md").read_text()
    assert "downscale 4 (128 px -> 32x32x4 latents)" in card and "aligned to the 4 px" in card
    snap = AutoencoderKL.from_pretrained(T.snapshot(tmp_path / "v4"))  # rebuilt as an f=4 VAE
    assert T.vae_factor(snap.config) == 4
    # the UNet trained on those latents takes the 32x32 layout: no attention at 32x32
    argv = ["unet", "--data", str(data_dir), "--out", str(tmp_path / "u"), "--steps", "1"]
    argv += ["--batch-size", "2", "--clip", str(tmp_path / "clip"), "--vae", str(tmp_path / "v4")]
    T.train_unet(T.build_parser().parse_args(argv + ["--object-weight", "4"]))
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "u" / "model")
    assert unet.config.sample_size == 32
    assert list(unet.config.down_block_types) == list(T.UNET_GRID32["down_block_types"])
    assert "on 32x32x4 VAE latents" in (tmp_path / "u" / "card.md").read_text()
    with pytest.raises(SystemExit):
        T.build_parser().parse_args(["vae", "--factor", "2"])


def test_time_budget_stops_by_wall_time_and_keeps_snapshots(data_dir, tmp_path, monkeypatch):
    _tiny_unet_inputs(monkeypatch, tmp_path / "vae", tmp_path / "clip")
    clock = iter(range(0, 10**6))  # each call of time.time() one second later
    monkeypatch.setattr(T.time, "time", lambda: float(next(clock)))
    argv = ["unet", "--data", str(data_dir), "--out", str(tmp_path / "u"), "--steps", "1000000"]
    argv += ["--batch-size", "2", "--clip", str(tmp_path / "clip"), "--vae", str(tmp_path / "vae")]
    argv += ["--time-budget", "6", "--snapshots", "3", "--warmup", "1", "--log-every", "1"]
    T.train_unet(T.build_parser().parse_args(argv))
    steps = [int((tmp_path / "u" / f"snapshot-{k}" / "STEP").read_text()) for k in (1, 2, 3)]
    final = torch.load(tmp_path / "u" / "checkpoint.pt", weights_only=True)
    assert steps[0] < steps[1] < steps[2] == final["step"] < 1000  # stopped by the budget
    assert final["wall"] >= 6
    # the learning rate decays over the budget, not over --steps (a million of them)
    lrs = [float(r.split(",")[2]) for r in (tmp_path / "u" / "loss.csv").read_text().split()[1:]]
    assert len(lrs) == final["step"] and lrs == sorted(lrs, reverse=True)
    assert lrs[-1] < 0.5 * lrs[0] and (tmp_path / "u" / "model").is_dir()
    # a step longer than a K-th of the budget (here every step: the clock runs fast) passes
    # several marks at once: each still gets its snapshot
    argv[argv.index("--snapshots") + 1] = "12"
    T.train_unet(T.build_parser().parse_args(argv + ["--out", str(tmp_path / "u12")]))
    steps = [int((tmp_path / "u12" / f"snapshot-{k}" / "STEP").read_text()) for k in range(1, 13)]
    assert (
        steps == sorted(steps)
        and len(set(steps)) < 12
        and not (tmp_path / "u12" / "snapshot").exists()
    )


def test_band_cache_is_object_band_computed_once(data_dir, tmp_path):
    data = SceneData(data_dir)
    cache = tmp_path / "bands.pt"
    band = T.band_cache(data, cache, workers=2)
    want = T.object_band(data.scenes, 128)
    assert band.dtype == torch.uint8 and band.shape == (12, 1, 128, 128)
    assert torch.allclose(band.float() / 255, want, atol=1 / 255)
    cache.write_bytes(b"")  # a second call reads the cache, it does not compute again
    with pytest.raises(Exception):  # noqa: B017 (torch's error for an empty file)
        T.band_cache(data, cache)


def test_caption_ids_are_tokenizes_and_each_caption_is_tokenized_once():
    tok = build_clip_tokenizer(T.world_words(), None, max_length=T.TEXT_MAX_LENGTH)
    calls = []

    def counting(texts, **kw):
        calls.append(list(texts))
        return tok(texts, **kw)

    ids = T.unet.CaptionIds(counting, "cpu")
    a = ["a red circle", "", "a blue star on a striped background", "a red circle"]
    b = ["a red circle", "a green cross", ""]
    for texts in (a, b):
        assert torch.equal(ids(texts), T.tokenize(tok, texts))
    assert calls == [["a red circle", "", "a blue star on a striped background"], ["a green cross"]]


def test_noise_on_device_trains_and_draws_on_the_device(data_dir, tmp_path, monkeypatch):
    sched = T._latent_ddpm()
    rng = np.random.RandomState(0)
    noise, t = T._noise_and_steps(rng, (3, 4, 8, 8), sched, "cpu", 50, on_device=True)
    assert noise.shape == (3, 4, 8, 8) and int(t.max()) < 50 and noise.device.type == "cpu"
    _tiny_unet_inputs(monkeypatch, tmp_path / "vae", tmp_path / "clip")
    argv = ["unet", "--data", str(data_dir), "--out", str(tmp_path / "u"), "--steps", "2"]
    argv += ["--batch-size", "4", "--clip", str(tmp_path / "clip"), "--vae", str(tmp_path / "vae")]
    T.train_unet(T.build_parser().parse_args(argv + ["--noise-on-device"]))
    rows = (tmp_path / "u" / "loss.csv").read_text().splitlines()
    assert (tmp_path / "u" / "model").is_dir() and math.isfinite(float(rows[-1].split(",")[1]))


def test_assemble_only_vae_unet_ships_a_32x32_pair_and_refuses_a_mismatch(tmp_path, monkeypatch):
    from pathlib import Path

    from diffusers import AutoencoderKL, UNet2DConditionModel

    from blendedit import models

    work = tmp_path / "runs"
    small = _tiny_unet_inputs(monkeypatch, work / "vae" / "model", work / "clip" / "model")
    monkeypatch.setattr(
        T.arch, "VAE_CONFIG", dict(T.VAE_CONFIG, block_out_channels=(8, 8, 8, 8), norm_num_groups=4)
    )
    torch.manual_seed(0)
    UNet2DConditionModel(**small).save_pretrained(work / "unet" / "model")
    AutoencoderKL(**T.vae_config(4)).save_pretrained(work / "vae4" / "model")
    UNet2DConditionModel(**T._unet_config(False, grid=32)).save_pretrained(work / "u32" / "model")
    for run in ("vae", "clip", "unet", "vae4", "u32"):
        (work / run / "card.md").write_text(f"# Shapes World {run}\n")
    dest = tmp_path / "toy"
    argv = ["assemble", "--work", str(work), "--vae", "vae", "--clip", "clip", "--vision", ""]
    T.assemble(
        T.build_parser().parse_args(argv + ["--unet", "unet", "--pixel", "", "--dest", str(dest)])
    )
    before = {p.relative_to(dest): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    update = [
        "assemble",
        "--work",
        str(work),
        "--dest",
        str(dest),
        "--vae",
        "vae4",
        "--unet",
        "u32",
    ]
    with pytest.raises(SystemExit, match="ship a new VAE with the UNet"):
        T.assemble(T.build_parser().parse_args(update + ["--only", "vae"]))
    with pytest.raises(SystemExit, match=r"takes 4x32x32 latents, the VAE .* makes 4x16x16"):
        T.assemble(T.build_parser().parse_args(update + ["--only", "unet"]))
    assert {p.relative_to(dest): p.read_bytes() for p in dest.rglob("*") if p.is_file()} == before
    T.assemble(T.build_parser().parse_args(update + ["--only", "vae", "unet"]))
    c = models.load_sd_components(str(dest / "pipeline"), torch_dtype=torch.float32)
    assert T.vae_factor(c["vae"].config) == 4 and c["unet"].config.sample_size == 32
    assert (dest / "clip" / "model.safetensors").read_bytes() == before[
        Path("clip/model.safetensors")
    ]


def test_guide_clip_tunes_the_vision_tower_on_x0_and_keeps_the_text_tower(tmp_path):
    """`train-toy guide-clip`: a bank of the pixel model's x̂0 (cached, reused for the same
    recipe), the vision tower trained, the text tower (the prompts' embeddings) untouched."""
    from safetensors.torch import load_file

    from blendedit.models import TOY_DIR
    from blendedit.toy.train import main as train_main
    from blendedit.toy.train.guide_clip import BANK_FILE, edit_like_masks

    out = tmp_path / "g"
    argv = ["guide-clip", "--out", str(out), "--bank", "8", "--steps", "2", "--batch-size", "4"]
    assert train_main(argv + ["--warmup", "1", "--log-every", "1"]) == 0
    bank = torch.load(out / BANK_FILE, weights_only=True)
    assert bank["images"].shape == (8, 3, 64, 64) and bank["images"].dtype == torch.uint8
    assert len(set(bank["steps"].tolist())) == 1  # one step per batch of 32
    before = load_file(TOY_DIR / "clip" / "model.safetensors")
    after = load_file(out / "model" / "model.safetensors")
    text = [k for k in before if k.startswith(("text_model.", "text_projection"))]
    vision = [k for k in before if k.startswith("vision_model.encoder")]
    assert text and all(torch.equal(before[k].float(), after[k].float()) for k in text)
    assert any(not torch.equal(before[k].float(), after[k].float()) for k in vision)
    masks = edit_like_masks(bank["objects"], 64, np.random.RandomState(0))
    for m, (cx, cy, _) in zip(masks, bank["objects"].tolist()):  # each mask holds its object
        assert m[0, int(cy * 64), int(cx * 64)] == 1 and 0.05 < float(m.mean()) < 0.5
