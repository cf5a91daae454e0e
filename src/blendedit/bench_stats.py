"""The statistics of `blendedit bench`: success intervals, per-method summaries, paired
comparisons and sign tests (what the report's tables say about the rows)."""

from __future__ import annotations

import math
import statistics

INPAINT_OURS = "ours, inpainting model"
INPAINT_THEIRS = "diffusers inpaint, inpainting model"
INPAINT_RAW = "ours background=none, inpainting model"

#: a big-frames run's reference method: ours on the same tasks rendered at the native size
NATIVE_FRAMES = "ours, native frames"

#: name -> (kind, options). ``ours*`` are our latent method with these options over its defaults.
METHODS: dict[str, tuple[str, dict]] = {
    "ours": ("ours", {}),
    "ours k=3": ("ours", {"shrink_iterations": 3}),
    "ours k=1": ("ours", {"shrink_iterations": 1}),
    "ours k=0": ("ours", {"shrink_iterations": 0}),
    "ours nearest": ("ours", {"mask_downsample": "nearest"}),
    "ours fresh noise": ("ours", {"background_noise": "fresh"}),
    "ours first sample": ("ours", {"rank": False}),
    "ours zoom": ("ours", {"crop_to_mask": "zoom"}),
    "ours background=none": ("ours", {"background": "none"}),
    "ours background=poisson": ("ours", {"background": "poisson"}),
    "ours background=decoder": ("ours", {"background": "decoder"}),
    "ours decoder lambda=100": ("ours", {"background": "decoder", "decoder_lambda": 100.0}),
    "diffusers inpaint": ("inpaint", {}),
    "text-to-image + paste": ("t2i", {}),
    "SDEdit + paste": ("sdedit", {"strength": 0.75}),
    "pixel (Blended Diffusion)": ("pixel", {}),
    # the same edits with the inpainting model (``--inpaint-model``; toy: toy-inpaint)
    INPAINT_OURS: ("ours_im", {}),
    INPAINT_RAW: ("ours_im", {"background": "none"}),  # the blend alone, before any paste
    INPAINT_THEIRS: ("inpaint_im", {}),
    # big frames (``frame_scale`` > 1): the reference, ours on the same tasks at the native size
    NATIVE_FRAMES: ("ours", {}),
}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a success rate k / n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def _finite(xs):
    return [x for x in xs if x is not None and math.isfinite(x)]


def summarize(rows: list[dict]) -> dict:
    k, n = sum(r["success"] for r in rows), len(rows)
    by_kind = {}
    for kind in sorted({r["kind"] for r in rows}):
        sub = [r for r in rows if r["kind"] == kind]
        by_kind[kind] = sum(r["success"] for r in sub) / len(sub)
    psnr = _finite(r["psnr_outside"] for r in rows)
    seam = _finite(r["psnr_seam"] for r in rows)
    cont = _finite(r.get("continuation_psnr") for r in rows)
    return dict(
        success=k / n if n else 0.0,
        ci=wilson(k, n),
        n=n,
        by_kind=by_kind,
        psnr_outside=statistics.median(psnr) if psnr else float("inf"),
        all_exact_outside=all(r["max_err_outside"] == 0 for r in rows),
        max_err_outside=max(r["max_err_outside"] for r in rows),
        psnr_seam=statistics.median(seam) if seam else float("inf"),
        seam_error=statistics.mean(r["seam_error"] for r in rows) if rows else 0.0,
        continuation_psnr=statistics.median(cont) if cont else float("nan"),
        clip=statistics.mean(r["clip"] for r in rows),
        seconds=statistics.median(r["seconds"] for r in rows),
        background_ratio=_median_ratio(rows, "background_s", "sample_s"),
    )


def _median_ratio(rows: list[dict], num: str, den: str) -> float | None:
    """Median over tasks of ``row[num] / row[den]`` (both timed within the same edit)."""
    ratios = [r[num] / r[den] for r in rows if r.get(num) is not None and r.get(den)]
    return statistics.median(ratios) if ratios else None


#: Our option studies: (option, default's method, alternative's method, their values).
DEFAULT_STUDIES = [
    ("shrink_iterations", "ours", "ours k=3", "auto", "3"),
    ("shrink_iterations", "ours", "ours k=1", "auto", "1"),
    ("shrink_iterations", "ours", "ours k=0", "auto", "0"),
    ("ranking", "ours", "ours first sample", "best of N", "first sample"),
    ("background_noise", "ours", "ours fresh noise", "fixed", "fresh"),
    ("mask_downsample", "ours", "ours nearest", "max", "nearest"),
    ("crop_to_mask", "ours", "ours zoom", "auto", "zoom"),
    ("decoder_lambda", "ours background=decoder", "ours decoder lambda=100", "10", "100"),
]
#: Background reconstructions compared with the raw decode they start from, on the same tasks.
RAW_DECODE = "ours background=none"


def paired(rows_a: list[dict], rows_b: list[dict]) -> dict:
    """Two methods' per-task rows (same tasks, same order): the tasks only ``a`` edits, only
    ``b`` edits, and :func:`sign_test`'s p on them."""
    pairs = list(zip(rows_a, rows_b, strict=True))
    only_a = sum(x["success"] and not y["success"] for x, y in pairs)
    only_b = sum(y["success"] and not x["success"] for x, y in pairs)
    return dict(only_a=only_a, only_b=only_b, p=sign_test(only_a, only_b))


def inpainting_pairs(per_task: dict) -> list[dict]:
    """The inpainting model's three-way question, paired on the same tasks: our blend with it
    against the plain model, our blend against diffusers' pipeline on it (no blend), and the
    plain model against diffusers' on the inpainting model."""
    pairs = [(INPAINT_OURS, "ours"), (INPAINT_OURS, INPAINT_THEIRS), ("ours", INPAINT_THEIRS)]
    return [
        dict(a=a, b=b, **paired(per_task[a], per_task[b]))
        for a, b in pairs
        if a in per_task and b in per_task
    ]


def against_raw_decode(per_task: dict) -> dict[str, dict]:
    """Our defaults (paste) and each other background setting of ours, paired with
    :data:`RAW_DECODE`: does reconstructing the background cost edits?"""
    if RAW_DECODE not in per_task:
        return {}

    def is_background(name):
        kind, opts = METHODS.get(name, ("", {}))
        return kind == "ours" and (not opts or "background" in opts)

    base = per_task[RAW_DECODE]
    return {
        name: paired(rows, base)
        for name, rows in per_task.items()
        if name != RAW_DECODE and is_background(name)
    }


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test (McNemar's exact test) on the discordant pairs of a paired
    comparison: the probability, were both settings equally good, of a split at least this
    uneven. 1.0 when there are no discordant pairs."""
    n, k = wins + losses, min(wins, losses)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def compare_defaults(methods: dict, per_task: dict | None = None) -> list[dict]:
    """For each option study present: which setting edits better (success, then PSNR), and
    whether the difference is beyond noise. Both settings run on the same tasks and seeds, so
    with ``per_task`` rows the test is paired (:func:`sign_test` on the tasks only one of them
    edits, p < 0.05); without them, whether the 95 % intervals are disjoint."""
    out = []
    for option, a, b, va, vb in DEFAULT_STUDIES:
        if a not in methods or b not in methods:
            continue
        sa, sb = methods[a], methods[b]
        better = (
            va if (sa["success"], sa["psnr_outside"]) >= (sb["success"], sb["psnr_outside"]) else vb
        )
        d = dict(
            option=option,
            default=va,
            other=vb,
            default_success=sa["success"],
            other_success=sb["success"],
            better=better,
            default_is_best=better == va,
        )
        if per_task and a in per_task and b in per_task:
            pr = paired(per_task[a], per_task[b])
            d |= dict(
                only_default=pr["only_a"],
                only_other=pr["only_b"],
                p=pr["p"],
                significant=pr["p"] < 0.05,
            )
        else:
            overlap = sa["ci"][0] <= sb["ci"][1] and sb["ci"][0] <= sa["ci"][1]
            d["significant"] = not overlap
        out.append(d)
    return out
