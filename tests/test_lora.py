"""LoRA files (issue 41) on every family, through diffusers' own loaders: a LoRA at scale 1
changes the edit, at scale 0 gives the edit without it, the background stays exact, a kohya-ss
file gives the diffusers-layout file's image, two stack, the sidecar records them and
`reconstruct` checks their hashes; a file that does not fit leaves the model as it was."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import edit_twice_and_check_paste, gen, tiny_folder

from blendedit import BlendedLatentDiffusionPipeline
from blendedit.cli import main
from blendedit.lora import expand_prompt
from blendedit.tiny_lora import save_random_lora, to_kohya

FAMILIES = ["sd", "sdxl", "sd3", "flux", "sd-inpaint", "sdxl-inpaint", "flux-inpaint"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """For each kind: its model folder and two random LoRA files (seeds 1 and 2)."""
    root = tmp_path_factory.mktemp("lora")
    out = {}
    for kind in FAMILIES:
        folder = tiny_folder(kind, root)
        pipe = BlendedLatentDiffusionPipeline.from_pretrained(folder)
        files = [save_random_lora(pipe, root / f"{kind}-{s}", seed=s) for s in (1, 2)]
        out[kind] = (folder, files)
    return out


def _inputs():
    rng = np.random.RandomState(0)
    from PIL import Image

    image = Image.fromarray((rng.rand(64, 64, 3) * 255).astype(np.uint8))
    mask = np.zeros((64, 64), bool)
    mask[16:48, 12:40] = True
    return image, mask


def _edit(pipe):
    image, mask = _inputs()
    kw = dict(num_inference_steps=3, crop_to_mask=False)
    return np.asarray(pipe("a red cat", image, mask, generator=gen(1), **kw).images[0])


@pytest.mark.parametrize("kind", FAMILIES)
def test_a_lora_changes_the_edit_at_scale_1_and_not_at_0(kind, made):
    folder, (one, two) = made[kind]
    load = BlendedLatentDiffusionPipeline.from_pretrained
    plain = _edit(load(folder))
    assert np.array_equal(_edit(load(folder, loras=[(one, 0.0)])), plain)
    pipe = load(folder, loras=[f"{one}:1"])
    assert [r["scale"] for r in pipe.loras] == [1.0] and pipe.loras[0]["fused"]
    with_one = _edit(pipe)
    inside = _inputs()[1]
    assert np.abs(with_one.astype(int) - plain)[inside].mean() > 2  # 8-bit levels
    image, mask = _inputs()
    edit_twice_and_check_paste(pipe, image, mask, num_inference_steps=3, crop_to_mask=False)
    # two stack: the pair is neither one alone
    both = _edit(load(folder, loras=[one, two]))
    assert not np.array_equal(both, with_one)
    assert not np.array_equal(both, _edit(load(folder, loras=[two])))


def test_fused_and_unfused_give_the_same_edit(made):
    folder, (one, two) = made["sd"]
    fused = BlendedLatentDiffusionPipeline.from_pretrained(folder, loras=[(one, 0.7), two])
    unfused = BlendedLatentDiffusionPipeline.from_pretrained(folder)
    unfused.load_lora_weights(one, 0.7, fuse=False)
    unfused.load_lora_weights(two, fuse=False)
    a, b = _edit(fused), _edit(unfused)
    assert np.abs(a.astype(int) - b).max() <= 2  # float sums in another order


def test_a_kohya_file_gives_the_diffusers_files_image(made, tmp_path):
    folder, (one, _) = made["sd"]
    kohya = to_kohya(one, tmp_path / "style_kohya.safetensors")
    a = _edit(BlendedLatentDiffusionPipeline.from_pretrained(folder, loras=[one]))
    b = _edit(BlendedLatentDiffusionPipeline.from_pretrained(folder, loras=[kohya]))
    assert np.array_equal(a, b)


def test_a_lora_of_another_family_leaves_the_model_as_it_was(made):
    folder, _ = made["sd"]
    pipe = BlendedLatentDiffusionPipeline.from_pretrained(folder)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    plain = _edit(pipe)
    with pytest.raises(ValueError, match="is not a LoRA for"):
        pipe.load_lora_weights(made["sdxl"][1][0])
    assert pipe.loras == []
    after = pipe.unet.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert np.array_equal(_edit(pipe), plain)


def test_the_sidecar_records_the_loras_and_reconstruct_checks_them(made, tmp_path):
    from PIL import Image

    folder, (one, two) = made["sd"]
    image, mask = _inputs()
    image.save(tmp_path / "in.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "m.png")
    args = ["edit", str(tmp_path / "in.png"), "--mask", str(tmp_path / "m.png"), "--prompt"]
    args += ["a red cat", "--model", folder, "--steps", "3", "--seed", "0", "--quiet", "-n", "2"]
    args += ["--lora", f"{one}:0.8", "--lora", str(two), "--out", str(tmp_path / "a")]
    assert main(args) == 0
    meta = json.loads((tmp_path / "a" / "in.json").read_text())
    assert [(r["file"], r["scale"]) for r in meta["loras"]] == [(one.name, 0.8), (two.name, 1.0)]
    assert all(len(r["sha256"]) == 64 for r in meta["loras"])
    sidecar = str(tmp_path / "a" / "in.json")
    assert main(["reconstruct", sidecar, "--out", str(tmp_path / "b"), "--quiet"]) == 0
    again = json.loads((tmp_path / "b" / "in-paste.json").read_text())
    for r, s in zip(meta["results"], again["results"]):
        first = np.asarray(Image.open(tmp_path / "a" / r["file"]))
        assert np.array_equal(first, np.asarray(Image.open(tmp_path / "b" / s["file"])))
    # the same name, other bytes: refused by its hash
    save_random_lora(BlendedLatentDiffusionPipeline.from_pretrained(folder), two.parent, seed=9)
    code = main(["reconstruct", sidecar, "--out", str(tmp_path / "c"), "--quiet"])
    assert code == 2 and not (tmp_path / "c").exists()


def test_batch_bench_and_serve_take_lora(made, tmp_path):
    """--lora on the other commands: the batch's sidecars record it, the bench's model has it
    fused, and a bad one stops `serve` before it serves anything."""
    from blendedit.bench import BenchConfig, Runner
    from blendedit.toy.tasks import write_manifest

    folder, (one, _) = made["sd"]
    manifest = write_manifest(tmp_path / "in", 1, size=64)
    out = tmp_path / "batch"
    argv = ["batch", str(manifest), "--out", str(out), "--model", folder, "--steps", "2"]
    assert main([*argv, "--quiet", "--lora", f"{one}:0.5"]) == 0
    (sidecar,) = out.glob("rows/*/*.json")
    assert [(r["file"], r["scale"]) for r in json.loads(sidecar.read_text())["loras"]] == [
        (one.name, 0.5)
    ]
    # a `lora` column: the row's own LoRA on top, a bad one fails its row only
    import shutil

    shutil.copy(one, manifest.parent / "style.safetensors")
    (row,) = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows = [row, row | {"lora": "style.safetensors:0.7"}, row | {"lora": "nope.safetensors"}]
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "batch2"
    argv = ["batch", str(manifest), "--out", str(out), "--model", folder, "--steps", "2"]
    assert main([*argv, "--quiet"]) == 2  # one row failed
    summary = [json.loads(x) for x in (out / "summary.jsonl").read_text().splitlines()]
    assert [e["status"] for e in summary] == ["ok", "ok", "failed"]
    assert "lora: no such file" in summary[2]["error"]
    metas = [
        json.loads(Path(e["best"]).parent.joinpath(Path(e["image"]).stem + ".json").read_text())
        for e in summary[:2]
    ]
    assert "loras" not in metas[0] and [r["scale"] for r in metas[1]["loras"]] == [0.7]
    bench = Runner(BenchConfig(model=folder, loras=(str(one),), methods=["ours"]))
    assert [r["file"] for r in bench.ours.loras] == [one.name]
    code = main(["serve", "--model", folder, "--lora", str(tmp_path / "nope.safetensors")])
    assert code == 2


# --- textual inversions ------------------------------------------------------------------


def _embedding_files(pipe, root):
    """Random embeddings for ``pipe``: SD: diffusers' layout (one vector, its token the key) and
    A1111's .pt (two vectors); SDXL: clip_l and clip_g vectors (two each)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    dims = [e.config.hidden_size for e in (pipe.text_encoder, pipe.text_encoder_2) if e]
    root.mkdir(parents=True, exist_ok=True)
    if pipe.family == "sdxl":
        vecs = {k: torch.randn(2, d, generator=g) for k, d in zip(("clip_l", "clip_g"), dims)}
        save_file(vecs, str(root / "glowing.safetensors"))
        return [root / "glowing.safetensors"]
    save_file(
        {"<shiny>": torch.randn(dims[0], generator=g)}, str(root / "learned_embeds.safetensors")
    )
    a1111 = {"string_to_param": {"*": torch.randn(2, dims[0], generator=g)}, "name": "glowing"}
    torch.save(a1111, root / "glowing.pt")
    return [root / "learned_embeds.safetensors", root / "glowing.pt"]


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_an_embedding_changes_the_edit_as_in_diffusers_pipeline(kind, made, tmp_path):
    import diffusers

    folder, _ = made[kind]
    load = BlendedLatentDiffusionPipeline.from_pretrained
    files = _embedding_files(load(folder), tmp_path)
    ours = load(folder, embeddings=[str(f) for f in files])
    tokens = [r["token"] for r in ours.embeddings]
    assert tokens == (["glowing"] if kind == "sdxl" else ["<shiny>", "glowing"])
    # the prompt with the token: a new id, and spelled out, all of a two-vector embedding's
    plain_ids = load(folder).tokenizer("a cat").input_ids
    ids = ours.tokenizer(f"a {tokens[-1]} cat").input_ids
    assert len(ids) == len(plain_ids) + 1 and ids[2] >= len(load(folder).tokenizer)
    spelled = expand_prompt(ours, f"a {tokens[-1]} cat")
    assert len(ours.tokenizer(spelled).input_ids) == len(plain_ids) + 2
    # diffusers' own pipeline, over a fresh copy of the model with its own loader
    fresh = load(folder)
    cls = "StableDiffusionXLPipeline" if kind == "sdxl" else "StableDiffusionPipeline"
    theirs = getattr(diffusers, cls)(**fresh.adapter.baseline_parts(fresh))
    if kind == "sdxl":
        from safetensors.torch import load_file

        vecs = load_file(str(files[0]))
        for key, enc, tok in (("clip_g", "text_encoder_2", "tokenizer_2"), ("clip_l", "", "")):
            enc, tok = enc or "text_encoder", tok or "tokenizer"
            theirs.load_textual_inversion(
                vecs[key],
                token="glowing",
                text_encoder=getattr(fresh, enc),
                tokenizer=getattr(fresh, tok),
            )
    else:
        theirs.load_textual_inversion(str(files[0]))
        theirs.load_textual_inversion(str(files[1]), token="glowing")
    prompt = f"a {tokens[-1]} cat"
    kw = dict(device=torch.device("cpu"), num_images_per_prompt=1)
    want = theirs.encode_prompt(prompt, do_classifier_free_guidance=False, **kw)[0]
    got = ours.encode_prompt(prompt, "", 1, False)[0]
    assert torch.allclose(got, want, atol=1e-5)
    plain = load(folder)
    assert not torch.allclose(plain.encode_prompt("a glowing cat", "", 1, False)[0], got)
    a, b = _edit_prompt(plain, "a glowing cat"), _edit_prompt(ours, prompt)
    assert not np.array_equal(a, b)


def _edit_prompt(pipe, prompt):
    image, mask = _inputs()
    kw = dict(num_inference_steps=3, crop_to_mask=False)
    return np.asarray(pipe(prompt, image, mask, generator=gen(1), **kw).images[0])


def test_a_rows_lora_is_taken_out_after_the_row(made):
    """A batch row's own LoRA is on the model for that row only: after it the model edits as
    before, its --lora LoRA (fused) still in, and no adapter layer is left."""
    from blendedit.lora import LoraSpec, adapter_layers, loras_for_a_while

    folder, (one, two) = made["sd"]
    pipe = BlendedLatentDiffusionPipeline.from_pretrained(folder, loras=[one])
    before = _edit(pipe)
    with loras_for_a_while(pipe, [LoraSpec(str(two), 0.9)]) as records:
        assert [r["file"] for r in pipe.loras] == [one.name, two.name]
        during = _edit(pipe)
    assert not np.array_equal(before, during)
    assert np.array_equal(_edit(pipe), before)
    assert [r["file"] for r in pipe.loras] == [one.name]
    assert adapter_layers(pipe, records[0]["adapter"]) == 0
    assert not any(hasattr(m, "lora_A") for m in pipe.unet.modules())


def test_a_lora_repository_in_the_local_cache_loads_by_its_hub_id(made, tmp_path, monkeypatch):
    """`--lora owner/name`: a LoRA repository that the Hugging Face cache holds loads offline
    (the cache laid out as `hf download` leaves it); one it does not hold is a model error."""
    import shutil

    import huggingface_hub.constants as hub

    from blendedit.sources import ModelNotFoundError

    folder, (one, _) = made["sd"]
    repo = tmp_path / "hub" / "models--someone--style-lora"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    shutil.copy(one, repo / "snapshots" / commit / "pytorch_lora_weights.safetensors")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    load = BlendedLatentDiffusionPipeline.from_pretrained
    by_id = load(folder, loras=["someone/style-lora:1"])
    assert by_id.loras[0]["file"] == "someone/style-lora"
    assert np.array_equal(_edit(by_id), _edit(load(folder, loras=[one])))
    with pytest.raises(ModelNotFoundError, match="local Hugging Face cache"):
        load(folder, loras=["someone/other-lora"])


def test_a_lora_that_does_not_fit_is_one_line_on_stderr(made, tmp_path):
    """diffusers' own report of the state dict (many lines) is not printed: the error is one
    line that names the file and the first shape that does not fit (in a process of its own,
    as a user runs it: diffusers' log handler writes to the real stderr)."""
    import subprocess
    import sys

    from PIL import Image

    folder, _ = made["sd"]
    image, mask = _inputs()
    image.save(tmp_path / "in.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "m.png")
    sdxl_lora = made["sdxl"][1][0]
    args = ["edit", str(tmp_path / "in.png"), "--mask", str(tmp_path / "m.png"), "--prompt"]
    args += ["a red cat", "--model", folder, "--steps", "2", "--quiet", "--lora", str(sdxl_lora)]
    cmd = [sys.executable, "-m", "blendedit.cli", *args, "--out", str(tmp_path / "a")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2
    err = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(err) == 1 and "is not a LoRA for" in err[0] and "size mismatch" in err[0], err
