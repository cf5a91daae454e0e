"""The quality benchmark's mechanics on the tiny random model (its numbers mean nothing here;
the report for the shipped model lives in benchmarks/results/quality/)."""

import json

import pytest
from PIL import Image

from blendedit.bench import (
    BIG_FRAME_METHODS,
    METHODS,
    NATIVE_FRAMES,
    BenchConfig,
    against_raw_decode,
    compare_defaults,
    default_methods,
    run_bench,
    sign_test,
    wilson,
)
from blendedit.cli import main


def test_wilson_interval():
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.490, abs=1e-3) and hi == pytest.approx(0.943, abs=1e-3)
    assert wilson(0, 20)[0] == 0.0 and wilson(20, 20)[1] == 1.0


def test_bench_runs_every_method_and_writes_the_report(tmp_path):
    methods = ["ours", "ours first sample", "diffusers inpaint", "text-to-image + paste"]
    cfg = BenchConfig(model="tiny-random", tasks=3, steps=2, samples=2, methods=methods)
    r = run_bench(cfg, tmp_path, progress=False, log=lambda m: None)
    assert list(r["methods"]) == methods and len(r["tasks"]) == 3
    for name in methods:
        s = r["methods"][name]
        assert s["n"] == 3 and 0 <= s["ci"][0] <= s["success"] <= s["ci"][1] <= 1
        assert s["seconds"] > 0
    # paste keeps every pixel outside the mask; diffusers' inpainting re-decodes the frame
    assert r["methods"]["ours"]["all_exact_outside"]
    assert r["methods"]["text-to-image + paste"]["all_exact_outside"]
    assert not r["methods"]["diffusers inpaint"]["all_exact_outside"]
    text = (tmp_path / "report.md").read_text()
    assert all(f"| {m} |" in text for m in methods) and "ranking" in text
    assert r["config"]["auto_shrink_iterations"] == 0  # 64 px: 8x8 latents
    assert '`shrink_iterations="auto"` is k = 0 on this model' in text
    assert json.loads((tmp_path / "results.json").read_text())["config"]["tasks"] == 3
    for png in ("success_vs_time.png", "background_error.png", "examples.png"):
        assert (tmp_path / png).stat().st_size > 1000 and f"]({png})" in text


def test_defaults_study_says_which_setting_won():
    m = {
        "ours": dict(success=0.5, psnr_outside=40.0, ci=wilson(50, 100)),
        "ours k=0": dict(success=0.6, psnr_outside=40.0, ci=wilson(60, 100)),
    }
    (d,) = compare_defaults(m)
    assert d["option"] == "shrink_iterations" and d["better"] == "0" and not d["default_is_best"]
    assert not d["significant"]  # 50 % and 60 % of 100: the intervals overlap
    m["ours k=0"] |= dict(success=0.8, ci=wilson(80, 100))
    assert compare_defaults(m)[0]["significant"]


def test_model_label_quotes_the_shipped_card_for_its_name_and_folder(tmp_path, monkeypatch):
    from blendedit import models
    from blendedit.bench import model_label

    label = model_label("toy")
    assert label.startswith("The shipped Shapes World models") and "VAE reconstruction" in label
    assert model_label(str(models.TOY_DIR / "pipeline")) == label
    assert model_label("tiny-random") == "" and model_label(str(tmp_path)) == ""
    monkeypatch.setattr(models, "TOY_DIR", tmp_path)  # a card without the measured section
    (tmp_path / "MODEL_CARD.md").write_text("# a card\n")
    assert model_label("toy") == ""


def test_default_methods_leave_out_the_explicit_k_that_auto_already_is():
    assert "ours k=0" not in default_methods(0) and "ours k=3" in default_methods(0)
    assert "ours k=3" not in default_methods(3) and "ours k=0" in default_methods(3)
    # no explicit k=2 method: only the big-frames reference is left out (it runs on big frames)
    assert default_methods(2) == [m for m in METHODS if m != NATIVE_FRAMES]
    assert default_methods(2, frame_scale=6) == BIG_FRAME_METHODS


def test_sign_test_and_the_paired_defaults_study():
    assert sign_test(0, 0) == 1.0 and sign_test(3, 3) == 1.0
    assert sign_test(5, 0) == pytest.approx(2 / 32)  # 1/32 each tail
    assert sign_test(0, 6) == pytest.approx(2 / 64) and sign_test(6, 0) < 0.05
    assert sign_test(8, 2) == pytest.approx(2 * 56 / 1024)  # (1 + 10 + 45) / 2^10 per tail
    # same 20 tasks: the default edits tasks 0-9, k=0 tasks 0-7 and 10-17: 2 against 8
    rows = lambda ok: [dict(success=i in ok) for i in range(20)]  # noqa: E731
    per_task = {"ours": rows(range(10)), "ours k=0": rows([*range(8), *range(10, 18)])}
    m = {
        "ours": dict(success=0.5, psnr_outside=40.0, ci=wilson(10, 20)),
        "ours k=0": dict(success=0.8, psnr_outside=40.0, ci=wilson(16, 20)),
    }
    (d,) = compare_defaults(m, per_task)
    assert (d["only_default"], d["only_other"]) == (2, 8) and d["better"] == "0"
    assert d["p"] == pytest.approx(sign_test(2, 8)) and not d["significant"]
    per_task["ours k=0"] = rows([*range(10, 20)])  # 10 against 10: no difference at all
    assert compare_defaults(m, per_task)[0]["p"] == 1.0
    per_task["ours"] = rows([])  # 0 against 10
    assert compare_defaults(m, per_task)[0]["significant"]


def test_background_methods_are_paired_with_the_raw_decode():
    rows = lambda ok: [dict(success=i in ok) for i in range(12)]  # noqa: E731
    per_task = {
        "ours background=none": rows(range(10)),
        "ours": rows(range(10)),  # paste: the same edits
        "ours background=decoder": rows([0, 1, 10]),  # loses 8, gains 1
        "ours k=3": rows([]),  # not a background setting: left out
        "diffusers inpaint": rows([]),
    }
    d = against_raw_decode(per_task)
    assert set(d) == {"ours", "ours background=decoder"}
    assert (d["ours"]["only_a"], d["ours"]["only_b"], d["ours"]["p"]) == (0, 0, 1.0)
    dec = d["ours background=decoder"]
    assert (dec["only_a"], dec["only_b"]) == (1, 8) and dec["p"] == pytest.approx(sign_test(1, 8))
    assert dec["p"] < 0.05
    assert against_raw_decode({"ours": rows([])}) == {}  # no raw decode in the run


def test_bench_of_one_task_kind_runs_only_that_kind_and_names_a_bad_one(tmp_path):
    cfg = BenchConfig(model="tiny-random", tasks=2, steps=1, samples=1, methods=["ours"])
    cfg.kinds = ("small",)
    r = run_bench(cfg, tmp_path, progress=False, log=lambda m: None)
    assert [t["kind"] for t in r["tasks"]] == ["small", "small"]
    assert "2 tasks (small masks only;" in (tmp_path / "report.md").read_text()
    cfg.kinds = ("huge",)
    with pytest.raises(ValueError, match="kinds: expected some of"):
        run_bench(cfg, tmp_path / "x", progress=False, log=lambda m: None)
    assert main(["bench", "--kinds", "huge", "--out", str(tmp_path / "y")]) == 2


def bench_cli(out, *flags: str) -> dict:
    """``blendedit bench`` on tiny-random (2 tasks, 1 sample each) with ``flags``; its results."""
    args = ["bench", "--model", "tiny-random", "--tasks", "2", "--samples", "1", "--quiet"]
    assert main([*args, *flags, "--out", str(out)]) == 0
    return json.loads((out / "results.json").read_text())


def test_bench_seed_flag_draws_another_task_suite(tmp_path):
    def run(seed):
        return bench_cli(
            tmp_path / str(seed), "--steps", "1", "--methods", "ours", "--seed", str(seed)
        )

    a, b = run(0), run(3)
    assert (a["config"]["seed"], b["config"]["seed"]) == (0, 3)
    assert [t["seed"] for t in b["tasks"]] == [300_000, 300_001]
    assert [t["prompt"] for t in a["tasks"]] != [t["prompt"] for t in b["tasks"]]


def test_bench_guidance_flag_reaches_the_methods(tmp_path):
    def run(g):
        methods = ["--methods", "ours", "diffusers inpaint"]
        return bench_cli(tmp_path / g, "--steps", "2", *methods, "--guidance-scale", g)

    off, on = run("1"), run("8")
    assert (off["config"]["guidance_scale"], on["config"]["guidance_scale"]) == (1.0, 8.0)
    for method in ("ours", "diffusers inpaint"):  # the same seeds: only the guidance differs
        clip = [[r["clip"] for r in res["per_task"][method]] for res in (off, on)]
        assert clip[0] != clip[1], method


def test_bench_without_the_shipped_model_says_what_to_do(tmp_path, monkeypatch):
    from blendedit import models

    monkeypatch.setattr(models, "TOY_DIR", tmp_path / "none")
    assert main(["bench", "--quick", "--out", str(tmp_path / "b")]) == 2


def test_big_frames_edit_larger_renders_judge_at_native_size_and_pair_with_native(
    tmp_path, monkeypatch
):
    import diffusers

    seen = []  # the keyword arguments of diffusers' inpainting calls
    call = diffusers.StableDiffusionInpaintPipeline.__call__

    def spy(self, *args, **kwargs):
        seen.append(dict(kwargs, image_size=kwargs["image"].size))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(diffusers.StableDiffusionInpaintPipeline, "__call__", spy)
    r = bench_cli(tmp_path, "--frame-scale", "4", "--steps", "2")
    assert r["config"]["frame_scale"] == 4 and r["config"]["methods"] == BIG_FRAME_METHODS
    # diffusers' inpainting got the big frame, its crop-and-resize at the native size
    assert [s["image_size"] for s in seen] == [(256, 256)] * 2
    assert all(s["padding_mask_crop"] == 32 and s["height"] == 64 for s in seen)
    big = r["big_frames"]
    assert big["time_ratio"] > 0 and set(big["paired"]) >= {"only_a", "only_b", "p"}
    text = (tmp_path / "report.md").read_text()
    assert "frames 4x the native size" in text and "## Big frames: the tasks at 4x" in text
    # the grid of examples shows the results brought back to the native size (64 px cells)
    assert Image.open(tmp_path / "examples.png").size == (64 * 3, 64 * 4)
    assert main(["bench", "--frame-scale", "0", "--out", str(tmp_path / "x")]) == 2
