"""`blendedit bench`: every method and baseline on the same seeded Shapes World edit tasks, scored
by the project's pixel judge, with a markdown report and plots.

Tasks: :func:`blendedit.toy.tasks.task_suite` (replace an object, add into empty background,
small masks two or three latent cells wide, every fourth touching the border; every colour and
shape). Every method runs on the same model, steps, seeds and number of samples; a method that
ranks returns its best sample, one that does not its first.

Methods (:data:`METHODS`): our latent method with its defaults and one option changed at a time
(shrinking k = 3, 1 or 0 against the default ``auto``, background none / poisson / decoder,
nearest mask downsampling, fresh background noise, no ranking, the box around the mask zoomed
to the native size), diffusers'
``StableDiffusionInpaintPipeline`` on the same 4-channel UNet, text-to-image of the prompt
pasted into the mask, img2img of the whole frame (SDEdit) pasted into the mask, and the pixel
method (Blended Diffusion) when a pixel model is given.

Per method: judged success rate with a 95 % Wilson interval, PSNR and max error outside the mask,
PSNR in the band just outside it, seam error (the step across the mask border against the
source's, :func:`blendedit.toy.judge.seam_error`), CLIP score of the edited region, seconds per
edit and the process's peak resident memory while it ran (Linux).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from PIL import Image

from . import background as B
from .bench_stats import (  # noqa: F401 (bench's public names)
    INPAINT_OURS,
    INPAINT_THEIRS,
    METHODS,
    RAW_DECODE,
    against_raw_decode,
    compare_defaults,
    inpainting_pairs,
    paired,
    sign_test,
    summarize,
    wilson,
)
from .io import mask_to_tensor, pil_to_tensor, save_json, tensor_to_pil
from .runner import resolve_device
from .toy.tasks import TASK_KINDS, check_kinds

QUICK_METHODS = [
    "ours",
    "ours k=3",
    "ours first sample",
    "diffusers inpaint",
    "text-to-image + paste",
]


def default_methods(auto_k: int) -> list[str]:
    """Every method but the explicit "ours k=N" that ``shrink_iterations="auto"`` (``ours``)
    already is on the model (``auto_k``)."""
    return [m for m in METHODS if m != f"ours k={auto_k}"]


def machine_facts() -> dict:
    """Threads, cores, CPU and torch version: what a timing figure was measured on."""
    import os
    import platform

    return dict(
        threads=torch.get_num_threads(),
        cores=os.cpu_count(),
        cpu=platform.processor() or platform.machine(),
        torch=torch.__version__,
    )


def add_study_flags(p, settings: list[str], tasks: int, steps: int, out: str) -> None:
    """The flags the study scripts in benchmarks/ share."""
    p.add_argument("--tasks", type=int, default=tasks, help=f"edit tasks (default: {tasks})")
    p.add_argument("--samples", type=int, default=4, help="samples per edit (default: 4)")
    p.add_argument("--steps", type=int, default=steps, help=f"denoising steps (default: {steps})")
    p.add_argument("--settings", nargs="+", default=settings, help="settings to run (all)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--out", default=out, help=f"report folder (default: {out})")


def study_meta(args, t_start: float, **extra) -> dict:
    """What a study's report says it ran on: its tasks, samples, steps, ``extra``, the machine
    (:func:`machine_facts`) and the seconds since ``t_start``."""
    return dict(
        **extra,
        tasks=args.tasks,
        samples=args.samples,
        steps=args.steps,
        **machine_facts(),
        wall_s=round(time.perf_counter() - t_start, 1),
    )


def task_generators(seed: int, n: int) -> list[torch.Generator]:
    """The ``n`` samples' generators of a task: sample k is seeded ``seed + k`` (so the first
    samples of a larger ``n`` are the same)."""
    return [torch.Generator().manual_seed(seed + k) for k in range(n)]


def edit_task(pipe, task, samples: int, steps: int, **options):
    """Run a pipeline (either method) on a task: ``samples`` samples seeded as
    :func:`task_generators`, ``steps`` steps, ``options`` over the pipeline's defaults."""
    return pipe(
        task.prompt,
        task.image,
        task.mask,
        num_inference_steps=steps,
        num_images_per_prompt=samples,
        generator=task_generators(task.seed, samples),
        **options,
    )


def rss_mb(key: str = "VmHWM") -> float:
    """A /proc/self/status figure in MB: VmHWM (peak resident set) or VmRSS; NaN off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def reset_peak_rss() -> None:
    """Reset the process's peak resident set (VmHWM) to its current size (Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


@dataclass
class BenchConfig:
    model: str = "toy"
    clip: str | None = None  # CLIP folder that ranks and judges CLIP scores (built-ins: their own)
    pixel_model: str | None = None  # None: the built-in's own when the model is built in
    #: an inpainting checkpoint to run beside ``model`` (ours and diffusers' inpainting pipeline
    #: on it); None: toy-inpaint for the toy model when it is shipped, else none
    inpaint_model: str | None = None
    loras: tuple = ()  # LoRA files fused into ``model`` ("FILE[:SCALE]" each)
    tasks: int = 120
    kinds: tuple[str, ...] = TASK_KINDS  # task kinds to run, in the suite's order
    steps: int = 25
    samples: int = 4
    guidance_scale: float = 5.0
    #: None: every method but the explicit "ours k=N" that ``shrink_iterations="auto"`` already
    #: is on this model (k = 0 on the toy model's 16x16 latents, 3 on 512 px Stable Diffusion)
    methods: list[str] | None = None
    seed: int = 0
    examples: int = 6  # tasks shown in the grid of example edits
    label: str = ""  # a line for the report: what model this is, where it stands


def default_inpaint_model() -> str | None:
    """toy-inpaint where it is shipped (the toy model's inpainting counterpart)."""
    from .models import TOY_DIR

    return "toy-inpaint" if (TOY_DIR / "inpaint").is_dir() else None


def diffusers_baselines(p) -> tuple:
    """diffusers' inpainting, text-to-image and image-to-image pipelines of ``p``'s family and
    inpainting kind (the family adapter's ``baselines``), built over ``p``'s own components and
    sampler; None for one that an inpainting checkpoint cannot run (text-to-image, img2img)."""
    import diffusers

    fam, parts = p.adapter, p.adapter.baseline_parts(p)
    return tuple(name and getattr(diffusers, name)(**parts) for name in fam.baselines)


class Runner:
    """Every method over one set of loaded components."""

    def __init__(self, cfg: BenchConfig):
        from .latent import BlendedLatentDiffusionPipeline
        from .models import BUILTIN_MODELS, quiet_transformers

        self.cfg = cfg
        self.ours = BlendedLatentDiffusionPipeline.from_pretrained(
            cfg.model, ranker=cfg.clip, loras=cfg.loras
        )
        device, dtype = resolve_device()  # float32 on the CPU (shipped weights are float16)
        self.ours.to(device, getattr(torch, dtype))
        if self.ours.ranker is None:
            raise ValueError("clip: a model that is not built in needs a CLIP (--rank-model)")
        p = self.ours
        with quiet_transformers():
            self.inpaint, self.t2i, self.img2img = diffusers_baselines(p)
        for q in (self.inpaint, self.t2i, self.img2img):
            if q is not None:
                q.set_progress_bar_config(disable=True)
        self.ours_im = self.inpaint_im = None
        spec = cfg.inpaint_model or (default_inpaint_model() if cfg.model == "toy" else None)
        if spec and any(METHODS[m][0].endswith("_im") for m in cfg.methods or METHODS):
            # one CLIP (the plain model's, loaded once) ranks every method
            self.ours_im = BlendedLatentDiffusionPipeline.from_pretrained(spec, ranker=p.ranker)
            self.ours_im.to(device, getattr(torch, dtype))
            if self.ours_im.inpaint is None:
                raise ValueError(f"inpaint_model: {spec!r} is not an inpainting checkpoint")
            with quiet_transformers():
                self.inpaint_im = diffusers_baselines(self.ours_im)[0]
            self.inpaint_im.set_progress_bar_config(disable=True)
        self.pixel = None
        pixel_spec = cfg.pixel_model or (cfg.model if cfg.model in BUILTIN_MODELS else None)
        if pixel_spec and any(METHODS[m][0] == "pixel" for m in cfg.methods or METHODS):
            from .pixel import BlendedDiffusionPipeline

            own = pixel_spec == "toy"  # it brings its guidance CLIP; all rank with one CLIP
            self.pixel = BlendedDiffusionPipeline.from_pretrained(
                pixel_spec, clip=None if own else p.ranker
            )
            self.pixel.ranker = p.ranker

    def auto_shrink(self) -> int:
        """What ``shrink_iterations="auto"`` is for this model's native latent grid."""
        from .masks import auto_shrink_iterations

        side = self.ours.native_size // self.ours.vae_scale_factor
        return auto_shrink_iterations(side, side)

    def best(self, images: list[Image.Image], prompt: str, mask: Image.Image) -> Image.Image:
        """The highest-scoring image by the model's CLIP (the crop around the mask)."""
        x = torch.cat([pil_to_tensor(i) for i in images])
        m = mask_to_tensor(mask)
        s = self.ours.ranker.score(x, prompt, m, "crop")
        return images[int(torch.argmax(s))]

    def run(self, name: str, task) -> Image.Image:
        kind, opts = METHODS[name]
        c, n = self.cfg, self.cfg.samples
        self.timings = {}  # the stages' seconds of our method's edit, for the cost ratios
        common = dict(num_inference_steps=c.steps, guidance_scale=c.guidance_scale)
        size = task.image.width
        if kind in ("ours", "ours_im"):
            pipe = self.ours if kind == "ours" else self.ours_im
            opts = dict(opts)
            rank = opts.pop("rank", True)
            ranker, pipe.ranker = pipe.ranker, (pipe.ranker if rank else None)
            try:
                out = edit_task(pipe, task, n, c.steps, guidance_scale=c.guidance_scale, **opts)
            finally:
                pipe.ranker = ranker
            self.timings = out.timings
            return out.images[0] if rank else out.images[out.order.index(0)]
        if kind == "pixel":
            if self.pixel is None:
                raise ValueError("pixel_model: the pixel method needs a pixel model")
            # 4/3 of the steps: the same number run after its 25 % skipped
            out = edit_task(self.pixel, task, n, max(4 * c.steps // 3, 4))
            return out.images[0]
        g = task_generators(task.seed, n)
        if kind in ("inpaint", "inpaint_im"):
            images = (self.inpaint if kind == "inpaint" else self.inpaint_im)(
                task.prompt,
                image=task.image,
                mask_image=task.mask,
                height=size,
                width=size,
                strength=1.0,
                num_images_per_prompt=n,
                generator=g,
                **common,
            ).images
            return self.best(images, task.prompt, task.mask)  # its raw output: it keeps nothing
        if kind == "t2i":
            images = self.t2i(
                task.prompt,
                height=size,
                width=size,
                num_images_per_prompt=n,
                generator=g,
                **common,
            ).images
        else:  # sdedit
            images = self.img2img(
                task.prompt,
                image=task.image,
                strength=opts["strength"],
                num_images_per_prompt=n,
                generator=g,
                **common,
            ).images
        src = pil_to_tensor(task.image)
        m = mask_to_tensor(task.mask)
        pasted = [tensor_to_pil(B.paste(pil_to_tensor(i), src, m, feather=3))[0] for i in images]
        return self.best(pasted, task.prompt, task.mask)


def model_label(model: str) -> str:
    """For the shipped toy model (the built-in name ``toy`` or its pipeline folder), a line for
    a report with the figures its model card's measured section holds (what the shipped models
    are, where they stand); "" otherwise."""
    from .models import TOY_DIR
    from .toy.evaluate import read_measured

    if model != "toy" and Path(model).resolve() != (TOY_DIR / "pipeline").resolve():
        return ""

    rows = read_measured(TOY_DIR / "MODEL_CARD.md")
    if not rows:
        return ""
    return (
        "The shipped Shapes World models (src/blendedit/assets/toy), as `python -m "
        "blendedit.toy.evaluate --card` last measured them: " + "; ".join(rows) + "."
    )


def run_bench(cfg: BenchConfig, out: str | Path, progress: bool = True, log=print) -> dict:
    """Run every method of ``cfg`` over the task suite; write ``results.json``, ``report.md``
    and the plots to ``out``; return the results."""
    from tqdm.auto import tqdm

    from .toy.judge import continuation_psnr, judge
    from .toy.tasks import task_suite

    unknown = [m for m in cfg.methods or [] if m not in METHODS]
    if unknown:
        raise ValueError(f"methods: unknown {unknown}; known: {list(METHODS)}")
    check_kinds(cfg.kinds)  # a bad kind fails before any model loads
    if not cfg.label:
        cfg = replace(cfg, label=model_label(cfg.model))
    out = Path(out)
    t_all = time.perf_counter()
    runner = Runner(cfg)
    auto_k = runner.auto_shrink()
    whole_frame = ("t2i", "sdedit")  # diffusers' pipelines an inpainting checkpoint cannot run
    if cfg.methods is None:
        methods = default_methods(auto_k)
        if runner.t2i is None:
            methods = [m for m in methods if METHODS[m][0] not in whole_frame]
        cfg = replace(cfg, methods=methods)
    if runner.t2i is None and any(METHODS[m][0] in whole_frame for m in cfg.methods):
        raise ValueError(
            f"methods: {runner.ours.adapter.label} runs only in diffusers' inpainting pipeline; "
            "leave out 'text-to-image + paste' and 'SDEdit + paste'"
        )
    methods = [m for m in cfg.methods if METHODS[m][0] != "pixel" or runner.pixel is not None]
    methods = [m for m in methods if not METHODS[m][0].endswith("_im") or runner.ours_im]
    tasks = task_suite(cfg.tasks, size=runner.ours.native_size, seed=cfg.seed, kinds=cfg.kinds)
    rows: dict[str, list[dict]] = {}
    peaks: dict[str, float] = {}
    examples: dict[str, list[Image.Image]] = {}
    for name in methods:
        reset_peak_rss()
        rows[name], examples[name] = [], []
        for task in tqdm(tasks, desc=name, disable=not progress, leave=False):
            t0 = time.perf_counter()
            img = runner.run(name, task)
            dt = time.perf_counter() - t0
            v = judge(img, task.mask, task.prompt, source=task.image)
            m = mask_to_tensor(task.mask)
            clip = float(runner.ours.ranker.score(pil_to_tensor(img), task.prompt, m, "crop")[0])
            rows[name].append(
                dict(
                    task=task.seed,
                    kind=task.kind,
                    success=v.success,
                    reason=v.reason,
                    psnr_outside=v.psnr_outside,
                    max_err_outside=v.max_err_outside,
                    psnr_seam=v.psnr_seam,
                    seam_error=v.seam_error,
                    continuation_psnr=continuation_psnr(img, task),
                    clip=clip,
                    seconds=dt,
                    sample_s=runner.timings.get("sample"),
                    background_s=runner.timings.get("background"),
                )
            )
            if len(examples[name]) < cfg.examples:
                examples[name].append(img)
        peaks[name] = rss_mb("VmHWM")
        s = summarize(rows[name])
        log(
            f"{name}: success {s['success']:.0%} [{s['ci'][0]:.0%}, {s['ci'][1]:.0%}], "
            f"{s['seconds']:.2f} s/edit"
        )
    results = dict(
        config=asdict(cfg) | dict(auto_shrink_iterations=auto_k),
        tasks=[dict(seed=t.seed, kind=t.kind, prompt=t.prompt) for t in tasks],
        methods={m: summarize(rows[m]) | {"peak_mb": peaks[m]} for m in methods},
        per_task={m: rows[m] for m in methods},
        wall_seconds=time.perf_counter() - t_all,
    )
    results["defaults"] = compare_defaults(results["methods"], results["per_task"])
    results["against_raw_decode"] = against_raw_decode(results["per_task"])
    results["inpainting"] = inpainting_pairs(results["per_task"])
    out.mkdir(parents=True, exist_ok=True)
    save_json(results, out / "results.json")
    plots = write_plots(results, examples, tasks, out)
    (out / "report.md").write_text(report(results, plots))
    return results


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


def report(r: dict, plots: list[str]) -> str:
    c = r["config"]
    lines = [
        "# Quality and speed: every method on the same Shapes World edits",
        "",
        f"{len(r['tasks'])} tasks ({_kinds_phrase(c.get('kinds'))}; every fourth touching the "
        "border), "
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
