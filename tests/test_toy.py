import math

import numpy as np
import pytest

from blendedit.toy.judge import colour_labels, components, judge, parse_prompt, seam_error
from blendedit.toy.tasks import TASK_KINDS, make_task, task_suite
from blendedit.toy.world import (
    BACKGROUND_COLOURS,
    COLOURS,
    SHAPES,
    Background,
    Obj,
    Scene,
    caption,
    describe,
    place,
    random_object,
    render,
    sample_background,
    sample_scene,
)


def test_render_is_deterministic_any_size_and_exact_on_flat_areas():
    scene = Scene(Background("plain", ("slate",)), (Obj("square", "red", 0.3, 0.3, 0.15, 0.3),))
    a, b = render(scene, 128), render(scene, 128)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    for size in (64, 100, 256):
        img = np.asarray(render(scene, size))
        assert img.shape == (size, size, 3)
        assert tuple(img[int(0.3 * size), int(0.3 * size)]) == COLOURS["red"]
        assert tuple(img[int(0.9 * size), int(0.9 * size)]) == BACKGROUND_COLOURS["slate"]


def test_shadow_falls_down_right_darkens_at_most_35_percent_and_never_over_objects():
    sq = Obj("square", "blue", 0.5, 0.5, 0.2, 0.0)
    near = Obj("circle", "yellow", 0.5 + 0.2 / math.sqrt(2) + 0.03, 0.5, 0.02)
    img = np.asarray(render(Scene(Background("plain", ("cream",)), (sq, near)), 256)).astype(float)
    bg = np.array(BACKGROUND_COLOURS["cream"], float)
    edge = int((0.5 + 0.2 / math.sqrt(2)) * 256)
    below_right = img[edge + 3, 140]
    above_left = img[256 - edge - 4, 140]
    assert np.allclose(above_left, bg, atol=1)
    ratio = below_right / bg
    assert 0.6 < ratio.mean() < 0.95 and ratio.min() >= 0.65 - 0.01
    cy, cx = int(near.cy * 256), int(near.cx * 256)
    assert tuple(img[cy, cx].astype(int)) == COLOURS["yellow"]


def test_scenes_keep_objects_inside_and_apart():
    rng = np.random.RandomState(0)
    for _ in range(50):
        s = sample_scene(rng, 3)
        for i, o in enumerate(s.objects):
            assert o.r - 1e-9 <= o.cx <= 1 - o.r and o.r - 1e-9 <= o.cy <= 1 - o.r
            assert 0.07 <= o.r <= 0.20
            for p in s.objects[i + 1 :]:
                assert math.hypot(o.cx - p.cx, o.cy - p.cy) > o.r + p.r


def test_captions_follow_grammar_and_can_name_one_object():
    assert describe(Obj("cross", "orange", 0.5, 0.5, 0.15)) == "an orange cross"
    assert describe(Obj("star", "blue", 0.5, 0.5, 0.18)) == "a big blue star"
    assert describe(Obj("star", "blue", 0.5, 0.5, 0.08)) == "a small blue star"
    assert describe(Obj("star", "blue", 0.5, 0.5, 0.08), with_size=False) == "a blue star"
    rng = np.random.RandomState(1)
    scene = Scene(
        Background("stripes", ("gray", "tan")),
        (Obj("circle", "red", 0.2, 0.2, 0.1), Obj("square", "green", 0.7, 0.7, 0.1)),
    )
    caps = {caption(scene, rng) for _ in range(200)}
    assert any(" and " in c for c in caps) and any(" and " not in c for c in caps)
    assert any(c.endswith("on a striped background") for c in caps)


def test_name_small_always_calls_a_small_object_small_and_changes_nothing_else():
    small, mid = Obj("star", "blue", 0.2, 0.2, 0.08), Obj("cross", "red", 0.7, 0.7, 0.13)
    scene = Scene(Background("plain", ("cream",)), (small, mid))
    plain = [caption(scene, np.random.RandomState(s)) for s in range(300)]
    named = [caption(scene, np.random.RandomState(s), name_small=True) for s in range(300)]
    # half the time a size word, as before; with name_small the small star always has one
    assert any("a blue star" in c for c in plain)
    assert all("a blue star" not in c for c in named)
    assert sum("a small blue star" in c for c in named) > sum(
        "a small blue star" in c for c in plain
    )
    # the same draws: only the size word of the small object differs
    assert [c.replace("small ", "") for c in plain] == [c.replace("small ", "") for c in named]


def _single_object_case(rng, shape, colour, r_range):
    o = place(rng, random_object(rng, r_range, shape=shape, colour=colour), [])
    img = render(Scene(sample_background(rng), (o,)), 128)
    m = np.zeros((128, 128), bool)
    lo = [max(0, int((c - o.r * 1.25) * 128)) for c in (o.cx, o.cy)]
    hi = [int((c + o.r * 1.25) * 128) + 1 for c in (o.cx, o.cy)]
    m[lo[1] : hi[1], lo[0] : hi[0]] = True
    return o, img, m


@pytest.mark.slow
def test_judge_is_right_on_rendered_ground_truth_at_least_98_percent():
    """Colours x shapes x sizes (small, big) x random rotations and backgrounds: the right prompt
    succeeds, a wrong shape or a wrong colour fails."""
    rng = np.random.RandomState(7)
    right = total = 0
    colours = list(COLOURS)
    for shape in SHAPES:
        for ci, colour in enumerate(colours):
            for r_range in ((0.07, 0.11), (0.16, 0.20)):
                o, img, m = _single_object_case(rng, shape, colour, r_range)
                wrong_shape = SHAPES[(SHAPES.index(shape) + 1 + rng.randint(4)) % 5]
                wrong_colour = colours[(ci + 1 + rng.randint(5)) % 6]
                right += judge(img, m, f"a {colour} {shape}").success
                right += not judge(img, m, f"a {colour} {wrong_shape}").success
                right += not judge(img, m, f"a {wrong_colour} {shape}").success
                total += 3
    assert right / total >= 0.98, f"{right}/{total}"


def test_judge_background_measures():
    _, img, m = _single_object_case(np.random.RandomState(3), "star", "red", (0.15, 0.18))
    a = np.asarray(img).copy()
    v = judge(a, m, "a red star", source=img)
    assert v.success and v.psnr_outside == math.inf and v.max_err_outside == 0
    ys, xs = np.nonzero(m)
    a[ys.min() - 2, xs.min() + 3] += 9  # one pixel on the seam, just outside the mask
    v = judge(a, m, "a red star", source=img)
    assert v.max_err_outside == 9 and v.max_err_seam == 9 and v.psnr_seam < math.inf


def test_seam_error_sees_a_hard_border_that_the_outside_band_cannot():
    rng = np.random.RandomState(0)
    src = (rng.rand(64, 64, 3) * 200).astype(np.uint8)
    m = np.zeros((64, 64), bool)
    m[20:40, 16:44] = True
    assert seam_error(src, src, m) == 0.0
    # everything outside kept exactly, the inside 30 levels brighter: a seam of 30 levels
    hard = src.astype(int)
    hard[m] += 30
    v = judge(hard.astype(np.uint8), m, "a red star", source=src)
    assert v.psnr_seam == math.inf and v.psnr_outside == math.inf
    assert v.seam_error == pytest.approx(30.0)
    # the same brightening spread smoothly over the whole frame: no step at the border
    ramp = src.astype(float) + np.linspace(0, 30, 64)[None, :, None]
    assert seam_error(ramp, src, m) < 1.0 < seam_error(hard, src, m)


def test_judge_rejects_too_small_and_split_regions_and_bad_prompts():
    scene = Scene(Background("plain", ("gray",)), (Obj("circle", "red", 0.5, 0.5, 0.04),))
    m = np.zeros((128, 128), bool)
    m[40:90, 40:90] = True
    v = judge(render(scene, 128), m, "a red circle")
    assert not v.success and "too small" in v.reason
    two = Scene(
        Background("plain", ("gray",)),
        (Obj("circle", "red", 0.38, 0.5, 0.08), Obj("circle", "red", 0.62, 0.5, 0.08)),
    )
    m[:, :] = True
    v = judge(render(two, 128), m, "a red circle")
    assert not v.success and "split" in v.reason
    with pytest.raises(ValueError, match="^prompt: "):
        parse_prompt("a dog")
    assert parse_prompt("a small Blue Star") == ("blue", "star")


def test_components_and_colour_labels():
    b = np.zeros((6, 6), bool)
    b[0, 0] = b[1, 1] = True  # diagonal neighbours: one component
    b[4:6, 4:6] = True
    lab = components(b)
    assert lab.max() == 2 and lab[0, 0] == lab[1, 1] != lab[5, 5]
    px = np.array([[COLOURS["green"], BACKGROUND_COLOURS["tan"]]], np.uint8)
    assert colour_labels(px).tolist() == [[list(COLOURS).index("green"), -1]]


@pytest.mark.parametrize("kind", TASK_KINDS)
def test_tasks_are_deterministic_sized_and_solvable(kind):
    a, b = make_task(11, kind), make_task(11, kind)
    assert a.prompt == b.prompt and np.array_equal(np.asarray(a.image), np.asarray(b.image))
    for seed in range(8):
        t = make_task(seed, kind, touch_border=seed % 2 == 1)
        side = t.box[2] - t.box[0]
        assert (0.18 <= side <= 0.24) if kind == "small" else (0.3 <= side <= 0.5 + 1e-9)
        if seed % 2 == 1:
            assert min(t.box) <= 1e-9 or max(t.box) >= 1 - 1e-9
        assert t.prompt.startswith("a small ") == (kind == "small")
        assert judge(t.ground_truth, t.mask, t.prompt, source=t.image).success
        m = np.asarray(t.mask) > 0
        src = np.asarray(t.image)
        if kind != "replace":  # empty background under the mask: no object colour there
            assert (colour_labels(src)[m] == -1).all()
        assert not judge(t.image, t.mask, t.prompt).success  # the task is not already done


def test_suite_mixes_kinds_and_border_tasks():
    s = task_suite(12)
    assert [t.kind for t in s[:3]] == list(TASK_KINDS)
    assert sum(min(t.box) <= 1e-9 or max(t.box) >= 1 - 1e-9 for t in s) >= 3


def test_suite_of_some_kinds_repeats_the_full_suites_tasks_of_those_kinds():
    full = task_suite(12)
    small = task_suite(6, kinds=("small",))
    assert [t.kind for t in small] == ["small"] * 6
    same = [t for t in full if t.kind == "small"]  # the full suite's 4, then 2 more
    assert [t.seed for t in small[:4]] == [t.seed for t in same]
    assert all(np.array_equal(np.asarray(a.mask), np.asarray(b.mask)) for a, b in zip(small, same))
    assert [t.seed for t in task_suite(12, kinds=TASK_KINDS)] == [t.seed for t in full]
    for bad in (("tiny",), ()):
        with pytest.raises(ValueError, match="kinds: expected some of"):
            task_suite(3, kinds=bad)
