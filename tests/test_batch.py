"""The batch runner: every row done exactly once, across a SIGKILL; bad rows reported while the
others succeed; Ray's outputs equal the sequential runner's."""

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blendedit.batch import _coerce, run_batch
from blendedit.cli import main
from blendedit.io import PROBE_PREFIX
from blendedit.outputs import listed_files
from blendedit.runner import EditRequest, ModelSpec
from blendedit.toy.tasks import write_manifest

TINY = ModelSpec(model="tiny-random")


def defaults(**options) -> EditRequest:
    return EditRequest(image="", prompt="", options={"num_inference_steps": 2} | options)


def summary(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]


def file_ids(out: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``out/rows`` -> (inode, mtime_ns): changes if a file is rewritten."""
    return {
        str(p.relative_to(out)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted((out / "rows").rglob("*"))
        if p.is_file()
    }


def assert_complete(out: Path, n_rows: int, n_results: int = 1) -> None:
    """Every row's folder holds exactly its sidecar, sheet and results; no temporary files."""
    rows = sorted((out / "rows").iterdir())
    assert len(rows) == n_rows
    for folder in rows:
        sidecars = list(folder.glob("*.json"))
        assert len(sidecars) == 1
        meta = json.loads(sidecars[0].read_text())
        listed = set(listed_files(meta)) | {sidecars[0].name}
        assert meta["latents"] in listed  # results, sheet, latents
        assert len(meta["results"]) == n_results
        assert {p.name for p in folder.iterdir()} == listed
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(f"{PROBE_PREFIX}*"))
    entries = summary(out)
    assert [e["row"] for e in entries] == list(range(1, n_rows + 1))
    assert all(e["status"] in ("ok", "skipped") and e["best"] for e in entries)
    with open(out / "summary.csv") as f:
        assert len(list(csv.DictReader(f))) == n_rows


def test_batch_runs_every_row_and_a_rerun_skips_them(tmp_path):
    manifest = write_manifest(tmp_path / "in", 5, size=64)
    out = tmp_path / "out"
    report = run_batch(manifest, out, TINY, defaults(), progress=False)
    assert report.counts == {"ok": 5}
    assert_complete(out, 5)
    tasks = [json.loads(line) for line in manifest.read_text().splitlines()]
    for e, t in zip(summary(out), tasks):
        assert e["id"] == t["id"] and e["prompt"] == t["prompt"] and e["seconds"] > 0
        # the background is kept: every pixel outside the mask equals the input's
        src = np.asarray(Image.open(manifest.parent / t["image"])).astype(int)
        keep = np.asarray(Image.open(manifest.parent / t["mask"])) == 0
        assert np.abs(np.asarray(Image.open(e["best"])).astype(int) - src)[keep].max() == 0
    before = file_ids(out)
    again = run_batch(manifest, out, TINY, defaults(), progress=False)
    assert again.counts == {"skipped": 5} and file_ids(out) == before
    # another option is another edit: keyed by the options, not only by the files
    other = run_batch(manifest, out, TINY, defaults(guidance_scale=3.0), progress=False)
    assert other.counts == {"ok": 5} and len(list((out / "rows").iterdir())) == 10


def test_seeds_do_not_depend_on_row_order(tmp_path):
    manifest = write_manifest(tmp_path / "in", 3, size=64)
    lines = manifest.read_text().splitlines()
    reversed_manifest = manifest.with_name("reversed.jsonl")
    reversed_manifest.write_text("\n".join(lines[::-1]) + "\n")
    a = run_batch(manifest, tmp_path / "a", TINY, defaults(), progress=False).entries
    b = run_batch(reversed_manifest, tmp_path / "b", TINY, defaults(), progress=False).entries
    assert {e["id"]: (e["seed"], e["key"]) for e in a} == {
        e["id"]: (e["seed"], e["key"]) for e in b
    }


@pytest.mark.slow
def test_sigkill_half_way_then_the_same_command_finishes_each_row_once(tmp_path):
    n = 16
    manifest = write_manifest(tmp_path / "in", n, size=64)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "blendedit.cli", "batch", str(manifest), "--out", str(out)]
    cmd += ["--model", "tiny-random", "--steps", "25", "--quiet", "--threads", "1"]
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while len(list(out.glob("rows/*/*.json"))) < 4 and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    done_before = {p.parent for p in out.glob("rows/*/*.json")}
    assert 4 <= len(done_before) < n, "the kill must land half way"
    survivors = {k: v for k, v in file_ids(out).items() if (out / k).parent in done_before}
    # the kill may also land inside a summary write, or between a row folder's write probe and
    # its removal: the re-run clears what those leave
    (out / ".summary.csv.killed.tmp").write_bytes(b"row,")
    (out / "rows" / f"{PROBE_PREFIX}killed").write_bytes(b"")
    (out / f"{PROBE_PREFIX}killed").write_bytes(b"")

    rc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rc.returncode == 0, rc.stderr
    assert_complete(out, n)
    after = file_ids(out)
    assert all(after[k] == v for k, v in survivors.items())  # finished rows written once
    statuses = [e["status"] for e in summary(out)]
    assert statuses.count("skipped") == len(done_before) and statuses.count("ok") == n - len(
        done_before
    )
    assert f"{n - len(done_before)} done now, {len(done_before)} already done" in rc.stderr


def test_bad_rows_are_reported_and_the_others_succeed(tmp_path, capsys):
    manifest = write_manifest(tmp_path / "in", 4, size=64)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    Image.new("L", (64, 64), 0).save(manifest.parent / "masks" / "empty.png")
    bad = [
        rows[0] | {"id": "missing", "image": "images/nope.png"},
        rows[1] | {"id": "empty-mask", "mask": "masks/empty.png"},
        rows[2] | {"id": "bad-option", "strength": 2.0},
        rows[2] | {"id": "unknown-option", "colour": "red"},
        rows[3] | {"id": "not-a-number", "steps": "many"},
    ]
    lines = [json.dumps(r) for r in rows[:2] + bad[:3]] + ["{not json"]
    lines += [json.dumps(r) for r in bad[3:] + rows[2:]]
    manifest.write_text("\n".join(lines) + "\n")
    before = {p: p.read_bytes() for p in manifest.parent.rglob("*") if p.is_file()}
    rc = main(
        ["batch", str(manifest), "--out", str(tmp_path / "out"), "--model", "tiny-random"]
        + ["--steps", "2", "--quiet"]
    )
    assert rc == 2
    entries = {e["row"]: e for e in summary(tmp_path / "out")}
    assert len(entries) == 10
    expect = {
        3: "image: file not found",
        4: "mask: the mask is empty",
        5: "strength: expected a number in (0.0, 1.0], got 2.0",
        6: "manifest: line 6: not valid JSON",
        7: "options: unknown column(s) 'colour'",
        8: "num_inference_steps: expected an integer, got 'many'",
    }
    for row, e in entries.items():
        if row in expect:
            assert e["status"] == "failed" and expect[row] in e["error"], e
        else:
            assert e["status"] == "ok" and e["error"] is None and Path(e["best"]).is_file()
    err = capsys.readouterr().err
    assert (
        "4 done now" in err and "6 failed" in err and "row 3 failed: image: file not found" in err
    )
    assert before == {p: p.read_bytes() for p in manifest.parent.rglob("*") if p.is_file()}
    # failed rows are retried by the next run (still failing), finished ones are not redone
    again = run_batch(manifest, tmp_path / "out", TINY, defaults(), progress=False)
    assert again.counts == {"skipped": 4, "failed": 6}


def test_manifest_errors_name_the_manifest(tmp_path):
    with pytest.raises(ValueError, match="manifest: file not found"):
        run_batch(tmp_path / "none.jsonl", tmp_path / "o", TINY, defaults(), progress=False)
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(ValueError, match="must be .jsonl or .csv"):
        run_batch(tmp_path / "m.txt", tmp_path / "o", TINY, defaults(), progress=False)
    with pytest.raises(ValueError, match="more than one worker runs on Ray"):
        run_batch(tmp_path / "m.txt", tmp_path / "o", TINY, defaults(), workers=2)


def test_csv_manifest_with_per_row_options(tmp_path):
    jsonl = write_manifest(tmp_path / "in", 2, size=64)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    path = jsonl.with_suffix(".csv")
    with open(path, "w", newline="") as f:
        names = ["image", "mask", "prompt", "seed", "n", "strength", "shrink_iterations"]
        w = csv.DictWriter(f, fieldnames=names)
        w.writeheader()
        w.writerow({k: rows[0][k] for k in ("image", "mask", "prompt")} | {"seed": 7, "n": 2})
        w.writerow(
            {k: rows[1][k] for k in ("image", "mask", "prompt")}
            | {"strength": "0.5", "shrink_iterations": "2"}
        )
    report = run_batch(path, tmp_path / "out", TINY, defaults(), progress=False)
    assert report.counts == {"ok": 2}
    first, second = report.entries
    assert first["seed"] == 7 and first["results"] == 2 and second["results"] == 1
    meta = json.loads(next(Path(second["folder"]).glob("*.json")).read_text())
    assert meta["options"]["strength"] == 0.5 and meta["options"]["shrink_iterations"] == 2


def test_manifest_values_take_the_options_words():
    # crop_to_mask's default is the string "auto": its other values were passed on as strings
    assert _coerce("crop_to_mask", "Zoom", "auto") == "zoom"
    assert _coerce("crop_to_mask", "no", "auto") is False
    with pytest.raises(ValueError, match="crop_to_mask: expected"):
        _coerce("crop_to_mask", "tight", "auto")


def test_flags_and_manifest_cells_read_words_alike():
    # one parser serves both: a word the command line takes, a manifest takes as the same value
    from blendedit.cli_parser import _flag_type
    from blendedit.latent import LatentEditOptions

    defaults = asdict(LatentEditOptions())
    cases = [
        ("crop_to_mask", "On", True),
        ("crop_to_mask", "ZOOM", "zoom"),
        ("crop_to_mask", "0", False),
        ("shrink_iterations", "auto", "auto"),
        ("shrink_iterations", "2", 2),
        ("num_inference_steps", "30", 30),
        ("guidance_scale", "7.5", 7.5),
        ("background", "poisson", "poisson"),
    ]
    for name, text, want in cases:
        flag = _flag_type(name, defaults[name])(text)
        assert flag == want and type(flag) is type(want), (name, text, flag)
        assert _coerce(name, text, defaults[name]) == flag
    for name, text in [("crop_to_mask", "tight"), ("num_inference_steps", "2.5")]:
        with pytest.raises(ValueError, match=f"{name}: expected"):
            _coerce(name, text, defaults[name])
        with pytest.raises(argparse.ArgumentTypeError, match="expected"):
            _flag_type(name, defaults[name])(text)


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_outputs_equal_the_sequential_runs(tmp_path, local_ray):
    manifest = write_manifest(tmp_path / "in", 6, size=64)
    seq, par = tmp_path / "seq", tmp_path / "ray"
    run_batch(manifest, seq, TINY, defaults(num_images_per_prompt=2), threads=1, progress=False)
    report = run_batch(
        manifest,
        par,
        TINY,
        defaults(num_images_per_prompt=2),
        workers=2,
        use_ray=True,
        threads=1,
        progress=False,
    )
    assert report.counts == {"ok": 6}
    assert_complete(par, 6, n_results=2)
    a = {k: (seq / k).read_bytes() for k in file_ids(seq) if k.endswith(".png")}
    b = {k: (par / k).read_bytes() for k in file_ids(par) if k.endswith(".png")}
    assert a.keys() == b.keys() and a == b  # same names (seeds, scores) and the same bytes


def test_an_unfinished_row_folder_is_redone_from_clean(tmp_path):
    manifest = write_manifest(tmp_path / "in", 2, size=64)
    out = tmp_path / "out"
    run_batch(manifest, out, TINY, defaults(), progress=False)
    folder = sorted((out / "rows").iterdir())[0]
    sidecar = next(folder.glob("*.json"))
    sidecar.unlink()  # as if killed between the last image's rename and the sidecar's
    (folder / ".task0000-01.png.x1y2.tmp").write_bytes(b"partial")
    report = run_batch(manifest, out, TINY, defaults(), progress=False)
    assert sorted(e["status"] for e in report.entries) == ["ok", "skipped"]
    assert_complete(out, 2)
