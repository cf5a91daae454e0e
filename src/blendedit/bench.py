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
from .bench_report import report, write_plots
from .bench_stats import (  # noqa: F401 (bench's public names)
    INPAINT_OURS,
    INPAINT_THEIRS,
    METHODS,
    NATIVE_FRAMES,
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


#: a big-frames run's methods (``frame_scale`` > 1): ours (its region zoomed to the model's
#: scale), diffusers' inpainting with its own answer to big frames (``padding_mask_crop``), and
#: ours on the same tasks at the native size, the reference of the time and success figures
BIG_FRAME_METHODS = ["ours", "diffusers inpaint", NATIVE_FRAMES]
#: diffusers' ``padding_mask_crop`` in a big-frames run, in native pixels (times the scale)
PADDING_MASK_CROP = 8


def default_methods(auto_k: int, frame_scale: int = 1) -> list[str]:
    """Every method but the explicit "ours k=N" that ``shrink_iterations="auto"`` (``ours``)
    already is on the model (``auto_k``); on big frames :data:`BIG_FRAME_METHODS`."""
    if frame_scale > 1:
        return list(BIG_FRAME_METHODS)
    return [m for m in METHODS if m not in (f"ours k={auto_k}", NATIVE_FRAMES)]


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
    #: big frames (issue 44): the tasks rendered this many times larger, their mask with them;
    #: every result is brought back to the native size and judged there
    frame_scale: int = 1
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
            if c.frame_scale > 1:  # its crop-and-resize, at the model's native size
                common["padding_mask_crop"] = PADDING_MASK_CROP * c.frame_scale
                size = self.ours.native_size
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


def big_frames_pairs(rows: dict[str, list[dict]]) -> dict | None:
    """Ours on the big frames against ours at the native size, on the same tasks: the median
    of same-task time ratios and the paired success (None without both methods)."""
    import statistics

    big, native = rows.get("ours"), rows.get(NATIVE_FRAMES)
    if not big or not native:
        return None
    ratio = statistics.median(b["seconds"] / a["seconds"] for a, b in zip(native, big))
    return dict(time_ratio=ratio, paired=paired(big, native))


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
    if not isinstance(cfg.frame_scale, int) or not 1 <= cfg.frame_scale <= 32:
        raise ValueError(f"frame_scale: a whole number from 1 to 32, got {cfg.frame_scale!r}")
    if not cfg.label:
        cfg = replace(cfg, label=model_label(cfg.model))
    out = Path(out)
    t_all = time.perf_counter()
    runner = Runner(cfg)
    auto_k = runner.auto_shrink()
    whole_frame = ("t2i", "sdedit")  # diffusers' pipelines an inpainting checkpoint cannot run
    if cfg.methods is None:
        methods = default_methods(auto_k, cfg.frame_scale)
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
    native = runner.ours.native_size
    tasks = task_suite(cfg.tasks, size=native, seed=cfg.seed, kinds=cfg.kinds)
    # big frames: the same tasks rendered larger; results come back to the native size
    frames = tasks
    if cfg.frame_scale > 1:
        frames = task_suite(cfg.tasks, native * cfg.frame_scale, seed=cfg.seed, kinds=cfg.kinds)
    rows: dict[str, list[dict]] = {}
    peaks: dict[str, float] = {}
    examples: dict[str, list[Image.Image]] = {}
    for name in methods:
        reset_peak_rss()
        rows[name], examples[name] = [], []
        for task, frame in tqdm(
            list(zip(tasks, tasks if name == NATIVE_FRAMES else frames)),
            desc=name,
            disable=not progress,
            leave=False,
        ):
            t0 = time.perf_counter()
            img = runner.run(name, frame)
            dt = time.perf_counter() - t0
            if img.size != task.image.size:
                img = img.resize(task.image.size, Image.BICUBIC)
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
    results["big_frames"] = big_frames_pairs(rows) if cfg.frame_scale > 1 else None
    out.mkdir(parents=True, exist_ok=True)
    save_json(results, out / "results.json")
    plots = write_plots(results, examples, tasks, out)
    (out / "report.md").write_text(report(results, plots))
    return results
