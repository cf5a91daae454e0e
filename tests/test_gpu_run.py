"""The prepared GPU run (issue 43), checked on the CPU: ``benchmarks/gpu_run.py --smoke`` runs
every step end to end and writes what a lent machine sends back; ``gpu_adopt.py`` takes the
trained UNet home and ships it only when it wins; the run's training resumes exactly."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_run  # noqa: E402

from blendedit.toy import train as T  # noqa: E402
from blendedit.toy.data import build_dataset  # noqa: E402

WEIGHTS = "diffusion_pytorch_model.safetensors"
pytestmark = pytest.mark.slow  # a subprocess smoke run of every step (about 2 min)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    out = root / "out"
    cmd = [sys.executable, "benchmarks/gpu_run.py", "--smoke", "--out", str(out)]
    cmd += ["--work", str(root / "work")]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_smoke_run_writes_every_step_within_what_a_machine_sends_back(smoke):
    report = json.loads((smoke / "gpu_run.json").read_text())
    steps = report["steps"]
    assert report["smoke"] and report["device"] == "cpu (no CUDA)"
    tests = steps["cuda_tests"]  # collected, and skipped cleanly where there is no CUDA
    assert tests["exit_code"] == 0 and tests["tests"] >= 20
    assert tests["skipped"] == tests["tests"] and tests["failed"] == []
    assert tests["skip_reasons"] == ["cuda is not usable here"]
    speed = steps["cuda_speed"]
    assert set(speed["kinds"]) == {
        "sd", "sdxl", "sd3", "flux", "sd-inpaint", "sdxl-inpaint", "flux-fill"
    }  # fmt: skip
    for kind, r in speed["kinds"].items():
        assert r["vs_inpaint"] > 0 and r["rounds"] >= 1, kind
        assert ("overhead_vs_t2i" in r) == (kind in ("sd", "sdxl", "sd3", "flux")), kind
    assert "| sd3 |" in (smoke / "speed.md").read_text()
    train = steps["train"]
    assert train["exit_code"] == 0 and "--init-from" in train["argv"]
    files = sorted(p for p in smoke.iterdir())
    assert len(files) <= 8 and all(p.stat().st_size <= 15 * 10**6 for p in files)
    assert [p.name for p in files if ".part" in p.name] == train["parts"]
    assert "train:" in (smoke / "gpu_run.log").read_text()


def test_adopt_reassembles_the_parts_and_ships_only_a_winner(smoke, tmp_path):
    from safetensors.torch import save_file

    dest = tmp_path / "toy"
    shutil.copytree(gpu_run.TOY, dest)
    # the "shipped" UNet of this copy predicts no noise at all: the candidate (the shipped
    # UNet, trained on) edits tasks that it cannot
    weights = dest / "pipeline" / "unet" / WEIGHTS
    save_file({k: torch.zeros_like(v) for k, v in load_file(weights).items()}, weights)
    before, card = weights.read_bytes(), (dest / "MODEL_CARD.md").read_text()
    base = [sys.executable, "benchmarks/gpu_adopt.py", str(smoke), "--tasks", "4", "--steps", "8"]
    base += ["--samples", "1", "--quiet", "--dest", str(dest)]

    def adopt(*extra):
        out = tmp_path / f"adopt{len(extra)}"
        p = subprocess.run([*base, "--out", str(out), *extra], cwd=ROOT, capture_output=True)
        assert p.returncode == 0, p.stderr[-3000:]
        return json.loads((out / "adopt.json").read_text()), out

    res, _ = adopt("--dry-run")  # wins, but a dry run never ships
    assert res["success"]["shipped"] == 0 and res["success"]["candidate"] > 0
    assert res["paired"]["only_b"] == 0 and res["paired"]["only_a"] > 0
    assert res["wins"] == (res["paired"]["p"] < 0.05) and not res["shipped"]
    assert weights.read_bytes() == before
    res, _ = adopt("--alpha", "0")  # a bound no sign test passes: reported, not shipped
    assert not res["wins"] and not res["shipped"] and weights.read_bytes() == before
    res, out = adopt("--alpha", "1.01")  # more tasks edited, under any bound: shipped
    assert res["wins"] and res["shipped"]
    after, candidate = load_file(weights), load_file(out / "unet" / WEIGHTS)
    assert after.keys() == candidate.keys()
    assert all(torch.equal(after[k], candidate[k]) for k in after)
    assert (dest / "MODEL_CARD.md").read_text() != card


def test_adopt_names_a_missing_part(smoke, tmp_path):
    parts = tmp_path / "parts"
    parts.mkdir()
    first = sorted(smoke.glob("unet.tar.part*"))[0]
    shutil.copy(first, parts / first.name)  # the second part did not come back
    cmd = [sys.executable, "benchmarks/gpu_adopt.py", str(parts), "--dry-run"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert p.returncode != 0 and "is one missing?" in p.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    p = subprocess.run([*cmd[:2], str(empty)], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode != 0 and "no unet.tar.part*" in p.stderr


def test_the_runs_training_resumes_to_the_weights_of_one_run(tmp_path):
    """Two runs of 2 steps (the first stopped by --stop-at) end with the weights, EMA and
    optimiser state of one run of 4 steps: the GPU run's command, by steps on the CPU."""
    work = tmp_path / "work"
    build_dataset(work / "data", n=6, size=128, seed=0, workers=1)
    build_dataset(work / "data-single", n=6, size=128, seed=0, workers=1, objects=1)

    def train(out_name, *extra):
        kw = dict(seconds=None, steps=4, batch_size=2, lr=3e-4, cuda=False)
        argv = gpu_run.train_argv(work, "a", **kw)
        argv[argv.index("--out") + 1] = str(tmp_path / out_name)
        T.main(argv + list(extra))
        return torch.load(tmp_path / out_name / "checkpoint.pt", weights_only=True)

    one = train("one")
    half = train("two", "--stop-at", "2")
    assert half["step"] == 2
    two = train("two")
    assert one["step"] == two["step"] == 4
    for part in ("model", "ema"):
        assert all(torch.equal(one[part][k], two[part][k]) for k in one[part]), part
    a, b = one["opt"]["state"], two["opt"]["state"]
    assert all(torch.equal(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"]) for i in a)
    # and the run moved: its weights are not the shipped UNet it started from
    start = load_file(gpu_run.TOY / "pipeline" / "unet" / WEIGHTS)
    k = "conv_in.weight"
    assert not torch.equal(one["ema"][k].half(), start[k])
