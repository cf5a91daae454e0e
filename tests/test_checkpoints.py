"""Weights committed to the repository: safetensors only, at most 60 MB in all, and the shipped
Shapes World models (``src/blendedit/assets/toy/``; ``BLENDEDIT_TOY_CHECKPOINTS`` points these
tests at another folder of that layout) still meet the targets they are committed for."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

from blendedit import models
from blendedit.toy.world import COLOURS, SHAPES

ROOT = Path(__file__).parents[1]
CHECKPOINTS = Path(os.environ.get("BLENDEDIT_TOY_CHECKPOINTS", models.TOY_DIR))
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".pkl", ".onnx", ".gguf")
present = pytest.mark.skipif(
    not models.toy_shipped(CHECKPOINTS),
    reason=f"no Shapes World checkpoints in {CHECKPOINTS}",
)


def _tracked_files() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / f for f in out.decode().split("\0") if f]


def test_committed_weights_are_safetensors_and_at_most_60_mb_in_all():
    weights = [f for f in _tracked_files() if f.suffix in WEIGHT_SUFFIXES and f.is_file()]
    assert all(f.suffix == ".safetensors" for f in weights), weights
    assert sum(f.stat().st_size for f in weights) <= 60 * 1000 * 1000


@present
def test_checkpoint_vae_reconstructs_held_out_scenes_at_28_db(tmp_path):
    from blendedit.toy.data import build_dataset
    from blendedit.toy.evaluate import vae_psnr

    heldout = build_dataset(tmp_path / "heldout", n=25, size=128, seed=1, workers=1)
    assert vae_psnr(CHECKPOINTS / "pipeline" / "vae", heldout, n=25) >= 28.0


@present
def test_checkpoint_clip_names_colour_and_shape_zero_shot(tmp_path, capsys):
    """Through the evaluation's command line, as the card's figure is made: 600 renders."""
    import json
    import shutil

    from blendedit.toy.evaluate import main, read_measured

    shutil.copytree(CHECKPOINTS / "clip", tmp_path / "toy" / "clip")
    argv = ["--model-dir", str(tmp_path / "toy"), "--only", "clip", "--card"]
    assert main(argv + ["--out", str(tmp_path / "figures.json")]) == 0
    top1 = json.loads((tmp_path / "figures.json").read_text())["clip_zero_shot_top1"]
    assert top1 >= 0.9
    assert f"clip_zero_shot_top1 {top1:.4g}" in capsys.readouterr().err  # shown as it comes
    assert read_measured(tmp_path / "toy" / "MODEL_CARD.md")[0].endswith(f": {top1}")


@present
def test_checkpoint_pipeline_loads_in_float32_and_tells_the_prompts_apart():
    c = models.load_sd_components(str(CHECKPOINTS / "pipeline"), torch_dtype=torch.float32)
    assert c["unet"].dtype == torch.float32 and c["vae"].config.scaling_factor < 1
    prompts = [f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES]
    ids = c["tokenizer"](prompts, padding="max_length", return_tensors="pt").input_ids
    assert len({tuple(i.tolist()) for i in ids}) == 30
    with torch.no_grad():
        states = c["text_encoder"](ids)[0][:, 3]  # at the shape word (bos a colour shape)
    states = torch.nn.functional.normalize(states, dim=-1)
    same_colour = states.view(len(COLOURS), len(SHAPES), -1)  # prompts are colour-major
    cos = torch.einsum("csd,ctd->cst", same_colour, same_colour)
    off = cos[:, ~torch.eye(len(SHAPES), dtype=bool)]
    # the text encoder separates shapes for the UNet (the earlier contrastive CLIP: 0.86-0.97)
    assert float(off.mean()) < 0.85, float(off.mean())
