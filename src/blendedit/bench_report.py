"""The report of `blendedit bench`: its markdown (:func:`report`) and plots
(:func:`write_plots`)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from .bench_stats import INPAINT_OURS, INPAINT_THEIRS, NATIVE_FRAMES, RAW_DECODE
from .toy.tasks import TASK_KINDS


def write_plots(results: dict, examples: dict, tasks, out: Path) -> list[str]:
    """success vs time, background error per method, a grid of example edits; [] without
    matplotlib (the report says so)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    m = results["methods"]
    names = list(m)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in names:
        lo, hi = m[name]["ci"]
        y = m[name]["success"]
        ax.errorbar(m[name]["seconds"], y, yerr=[[y - lo], [hi - y]], fmt="o", capsize=3)
        ax.annotate(
            name, (m[name]["seconds"], y), fontsize=7, xytext=(4, 2), textcoords="offset points"
        )
    ax.set_xlabel("seconds per edit (median)")
    ax.set_ylabel("judged success (95 % CI)")
    ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(out / "success_vs_time.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    vals = [min(m[n]["psnr_outside"], 60.0) for n in names]
    ax.barh(names, vals)
    ax.set_xlabel("PSNR outside the mask, dB (median; exact = shown as 60)")
    fig.tight_layout()
    fig.savefig(out / "background_error.png", dpi=110)
    plt.close(fig)
    from PIL import ImageDraw

    cols = len(tasks[: len(next(iter(examples.values()), []))])
    size = tasks[0].image.width
    grid = Image.new("RGB", (size * (cols + 1), size * (len(names) + 1)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    draw.text((4, size // 2), "task (mask red)", fill=(0, 0, 0))
    for i, name in enumerate(names):
        for k, part in enumerate(name.replace(" + ", " +\n").replace("=", "=\n").split("\n")):
            draw.text((4, size * (i + 1) + size // 2 - 8 + 12 * k), part, fill=(0, 0, 0))
    for j in range(cols):
        src = tasks[j].image.copy()
        overlay = Image.composite(
            Image.new("RGB", src.size, (255, 0, 64)), src, tasks[j].mask.point(lambda v: v // 2)
        )
        grid.paste(overlay, (size * (j + 1), 0))
    for i, name in enumerate(names):
        for j, img in enumerate(examples[name][:cols]):
            grid.paste(img, (size * (j + 1), size * (i + 1)))
    grid.save(out / "examples.png")
    labels = "\n".join(f"row {i + 1}: {n}" for i, n in enumerate(names))
    (out / "examples.txt").write_text("row 0: the tasks (mask in red)\n" + labels + "\n")
    return ["success_vs_time.png", "background_error.png", "examples.png"]


def _kinds_phrase(kinds) -> str:
    words = {"replace": "replace", "add": "add", "small": "small masks"}
    kinds = list(kinds or TASK_KINDS)
    return ", ".join(words[k] for k in kinds) + (" only" if len(kinds) < len(TASK_KINDS) else "")


def _inpainting_section(pairs: list[dict]) -> list[str]:
    """Does blending still help a model trained to inpaint? The paired comparisons."""
    if not pairs:
        return []
    lines = [
        "## The inpainting model: does blending still help?",
        "",
        f"`{INPAINT_OURS}`: Blended Latent Diffusion with the inpainting checkpoint (its own "
        f"mask and masked-image input, the blend on top); `{INPAINT_THEIRS}`: diffusers' "
        "inpainting pipeline on the same checkpoint (no blend); `ours`: the plain model. On the "
        "same tasks, the tasks only the first edits, only the second, exact sign test:",
        "",
    ]
    for d in pairs:
        lines.append(
            f"- {d['a']} against {d['b']}: {d['only_a']} against {d['only_b']}, p = {d['p']:.3f}"
            + (" (beyond noise)" if d["p"] < 0.05 else " (within noise)")
        )
    return lines + [""]


def _big_frames_section(c: dict, d: dict | None) -> list[str]:
    """Big frames (issue 44): ours on the frames ``frame_scale`` times larger against ours at
    the native size."""
    if (c.get("frame_scale") or 1) == 1:
        return []
    lines = [
        f"## Big frames: the tasks at {c['frame_scale']}x",
        "",
        "Every task was rendered at the native size times the scale (the mask with it) and "
        "edited there; each result was brought back to the native size and judged against the "
        f"native task. `{NATIVE_FRAMES}` is ours on the native tasks; `diffusers inpaint` ran "
        "with its `padding_mask_crop` (the masked box cropped with padding and resized to the "
        "model's size). The resize back to the native size resamples every pixel, so the "
        "columns of pixels outside the mask measure that resampling here, not the edit.",
        "",
    ]
    if d is None:
        return lines + [f"(run both `ours` and `{NATIVE_FRAMES}` for the paired figures)", ""]
    p = d["paired"]
    return lines + [
        f"Ours on big frames against ours at the native size: time **{d['time_ratio']:.2f}x** "
        f"(median of same-task ratios); on the same tasks only the big frames edit "
        f"{p['only_a']}, only the native ones {p['only_b']}, exact sign test p = {p['p']:.2f}"
        + (" (beyond noise)." if p["p"] < 0.05 else " (within noise)."),
        "",
    ]


def report(r: dict, plots: list[str]) -> str:
    c = r["config"]
    lines = [
        "# Quality and speed: every method on the same Shapes World edits",
        "",
        f"{len(r['tasks'])} tasks ({_kinds_phrase(c.get('kinds'))}; every fourth touching the "
        "border"
        + (f"; frames {c['frame_scale']}x the native size" if c.get("frame_scale", 1) > 1 else "")
        + "), "
        f"model `{c['model']}`, {c['steps']} steps, {c['samples']} samples per edit (ranked "
        f"methods return the best by the model's CLIP, the others the first), guidance "
        f"{c['guidance_scale']}, seed {c['seed']}. Whole run {r['wall_seconds']:.0f} s."
        + (
            f' `ours` is the defaults; its `shrink_iterations="auto"` is k = '
            f"{c['auto_shrink_iterations']} on this model's latent grid."
            if "auto_shrink_iterations" in c
            else ""
        ),
        "",
        *([c["label"], ""] if c.get("label") else []),
        "| method | success [95 % CI] | replace / add / small | PSNR outside (dB) | every pixel "
        "kept | band PSNR (dB) | seam error | background in mask (dB) | CLIP | s / edit | "
        "peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in r["methods"].items():
        bk = s["by_kind"]
        kinds = " / ".join(f"{bk[k]:.0%}" if k in bk else "-" for k in TASK_KINDS)
        lines.append(
            f"| {name} | {s['success']:.0%} [{s['ci'][0]:.0%}, {s['ci'][1]:.0%}] | {kinds} | "
            f"{s['psnr_outside']:.1f} | {'yes' if s['all_exact_outside'] else 'no'} | "
            f"{s['psnr_seam']:.1f} | {s['seam_error']:.2f} | "
            f"{s.get('continuation_psnr', float('nan')):.1f} | {s['clip']:.3f} | "
            f"{s['seconds']:.2f} | {s['peak_mb']:.0f} |"
        )
    lines += [
        "",
        "PSNR outside: median over tasks, pixels outside the mask against the source. Band PSNR: "
        "the 3 px band just outside the mask. Seam error: the step across the mask border minus "
        "the source's step there, mean absolute 0-255 levels (lower is better; a hard paste "
        "shows here although every pixel outside is kept). Background in mask: PSNR against "
        "the ground truth inside the mask away from the asked-for object (median; how well the "
        "background continues where no object was asked for).",
        "",
        *_inpainting_section(r.get("inpainting") or []),
        *_big_frames_section(c, r.get("big_frames")),
        "## Background reconstruction cost",
        "",
        "Seconds of the background step over seconds of sampling, timed within the same edit "
        "(median over tasks):",
        "",
    ]
    for name, s in r["methods"].items():
        if s.get("background_ratio") is not None:
            lines.append(f"- {name}: {s['background_ratio']:.2f}x")
    vs_raw = r.get("against_raw_decode") or {}
    if vs_raw:
        lines += [
            "",
            f"Edits kept against the raw decode (`{RAW_DECODE}`) on the same tasks: the tasks "
            "only this method edits, only the raw decode edits, exact sign test (p < 0.05: "
            "beyond noise):",
            "",
        ]
        for name, d in vs_raw.items():
            lines.append(
                f"- {name}: {d['only_a']} against {d['only_b']}, p = {d['p']:.2f}"
                + (" (beyond noise)" if d["p"] < 0.05 else " (within noise)")
            )
    lines += [
        "",
        "## Defaults, from these runs",
        "",
    ]
    for d in r["defaults"]:
        verdict = "the default is best" if d["default_is_best"] else f"**{d['other']} is better**"
        if "p" in d:
            paired = (
                f"on the same tasks {d['default']} alone edits {d['only_default']}, "
                f"{d['other']} alone {d['only_other']}, exact sign test p = {d['p']:.2f}"
            )
            verdict += (
                f" ({paired}: beyond noise)"
                if d["significant"]
                else f" (within noise: {paired}; the default stays)"
            )
        elif not d.get("significant", True):
            verdict += " (within noise: the 95 % intervals overlap; the default stays)"
        lines.append(
            f"- `{d['option']}`: {d['default']} {d['default_success']:.0%} against {d['other']} "
            f"{d['other_success']:.0%}: {verdict}."
        )
    if not r["defaults"]:
        lines.append("- (no option study in this run)")
    lines += [""]
    if plots:
        lines += [f"![{p}]({p})" for p in plots] + [
            "",
            "examples.png: top row the tasks (mask in red), then one row per method in the "
            "order of the table.",
        ]
    else:
        lines.append("(no plots: `pip install matplotlib`)")
    return "\n".join(lines) + "\n"
