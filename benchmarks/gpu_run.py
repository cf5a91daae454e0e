"""The prepared GPU run (issue 43): CUDA tests, CUDA speed against diffusers, then the long
training run of the latent model, inside one time budget.

    python3 -m pip install --no-index --no-deps .gpu-wheels/*.whl    # diffusers, carried
    python3 benchmarks/gpu_run.py --out $OUT [--minutes 9]           # on the lent machine
    python benchmarks/gpu_run.py --smoke --out /tmp/gpu-smoke         # the same, on a CPU

In order, each step logged with its seconds (``gpu_run.log``) and every figure written to
``gpu_run.json`` as soon as it is known (a cut-off run keeps what it did):

1. **CUDA tests**: ``pytest -m cuda tests/test_cuda.py`` (every family's tiny folder in float16
   and bfloat16, both methods, decoder fine-tuning, crop and zoom, the batch runner with one
   GPU worker); where there is no CUDA they skip, and the report says so.
2. **CUDA speed**: ``benchmarks/cuda_speed.py`` (ours against diffusers' inpainting pipeline of
   each family on random models of the real architectures, and the blend's overhead against
   text-to-image), its table in ``speed.md``.
3. **Training**: the rest of the time, less a reserve for packing, continues the shipped
   text-to-image UNet (``--design a``, committed in ``src/blendedit/assets/toy/pipeline/unet``:
   each GPU run starts from the last one that was shipped) on the shipped recipe's data, at a
   GPU's batch size. ``--design b`` trains the grid pilot's 32x32 UNet on the committed f=4 VAE
   instead, from ``--init-from`` when given (its weights, 22 MB in float16, do not fit in the
   repository beside the shipped models unless they win). The Shapes World data render in the
   background while steps 1 and 2 run. The EMA weights come back in float16 as ``unet.tar``
   split in parts of at most 15 MB; ``benchmarks/gpu_adopt.py DIR`` reassembles them, benches
   the candidate against the shipped model on the CPU (paired) and ships it only if it wins.

Within a run the trainer checkpoints and resumes exactly (the same weights as one run of the
same length: tests/test_gpu_run.py). Between GPU runs only the weights travel: the optimiser's
state (twice the weights again, in float32) does not fit in what a machine sends back (8 files
of 16 MB), so each run is a warm start with its own warm-up and cosine schedule.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "src" / "blendedit" / "assets" / "toy"
PILOT_VAE = ROOT / "benchmarks" / "results" / "grid_pilot" / "vae4"
#: the shipped recipe's data (MODEL_CARD.md): 0-3 objects, and one-object scenes
DATA = dict(multi=30000, single=40000)
SMOKE_DATA = dict(multi=40, single=40)
PART_BYTES = 15 * 10**6
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT / "src"))


class Report:
    """``gpu_run.json`` and ``gpu_run.log`` in ``out``, rewritten after every step."""

    def __init__(self, out: Path, facts: dict):
        self.out, self.data, self.start = out, dict(facts, steps={}), time.time()
        out.mkdir(parents=True, exist_ok=True)
        self.log_file = (out / "gpu_run.log").open("a")

    def log(self, msg: str) -> None:
        line = f"[gpu_run {time.strftime('%H:%M:%S')} +{self.elapsed():.0f}s] {msg}"
        print(line, file=sys.stderr, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def elapsed(self) -> float:
        return time.time() - self.start

    def step(self, name: str, result: dict) -> None:
        self.data["steps"][name] = result
        self.data["elapsed_s"] = round(self.elapsed(), 1)
        tmp = self.out / "gpu_run.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.out / "gpu_run.json")
        self.log(f"{name}: {json.dumps(result)[:400]}")


def run_logged(cmd: list[str], rep: Report, timeout: float, **kw) -> tuple[int, str]:
    """Run ``cmd``, its output into the log; (exit code, output's tail). 124 on the timeout."""
    rep.log("$ " + " ".join(cmd))
    try:
        p = subprocess.run(
            cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout, **kw
        )
        code, text = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        code = 124
        text = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(
            errors="replace"
        )
    rep.log_file.write(text[-20000:] + "\n")
    return code, text[-3000:]


def cuda_tests(rep: Report, work: Path, seconds: float) -> dict:
    xml = work / "cuda_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q", "-rs"]
    cmd += ["-p", "no:cacheprovider", f"--junitxml={xml}"]
    code, tail = run_logged(cmd, rep, seconds)
    res = dict(exit_code=code, budget_s=round(seconds, 1))
    if not xml.exists():
        return res | dict(error="no report", tail=tail[-1500:])
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed, skipped = [], set()
    for case in suite.iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            failed.append(f"{case.get('name')}: {(bad.get('message') or '')[:200]}")
        skip = case.find("skipped")
        if skip is not None:
            skipped.add(skip.get("message") or "")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return res | counts | dict(failed=failed, skip_reasons=sorted(skipped))


def cuda_speed(rep: Report, work: Path, out: Path, seconds: float, smoke: bool) -> dict:
    cmd = [sys.executable, "benchmarks/cuda_speed.py", "--out", str(work / "speed")]
    cmd += ["--deadline", str(max(10.0, seconds - 30))] + (["--smoke"] if smoke else [])
    code, tail = run_logged(cmd, rep, seconds)
    path = work / "speed" / "speed.json"
    if (work / "speed" / "speed.md").exists():
        shutil.copy(work / "speed" / "speed.md", out / "speed.md")
    res = json.loads(path.read_text()) if path.exists() else dict(error="no results")
    return dict(res, exit_code=code) | ({} if code == 0 else dict(tail=tail[-1500:]))


def render_data(work: Path, smoke: bool) -> subprocess.Popen:
    """The training data, rendered in the background (CPU work) while the GPU tests run."""
    sizes = SMOKE_DATA if smoke else DATA
    workers = str(max(1, (os.cpu_count() or 2) // 2))
    base = [sys.executable, "-m", "blendedit.toy.train", "data", "--seed", "0"]
    multi = base + ["--out", str(work / "data"), "-n", str(sizes["multi"]), "--workers", workers]
    single = base + ["--objects", "1", "--out", str(work / "data-single")]
    single += ["-n", str(sizes["single"]), "--workers", workers]
    script = " && ".join(" ".join(c) for c in (multi, single))
    return subprocess.Popen(
        ["nice", "-n", "5", "sh", "-c", script],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def train_argv(
    work: Path,
    design: str,
    *,
    seconds: float | None,
    steps: int | None = None,
    batch_size: int,
    lr: float,
    cuda: bool,
    init_from: str | None = None,
) -> list[str]:
    """The ``train-toy unet`` command of the run: the shipped UNet's recipe (MODEL_CARD.md)
    continued at a GPU's batch size; by ``seconds`` of training (the GPU run) or ``steps``."""
    if design == "a":
        vae, init = TOY / "pipeline" / "vae", init_from or str(TOY / "pipeline" / "unet")
    else:
        vae, init = PILOT_VAE, init_from
    argv = ["unet", "--data", str(work / "data-single"), str(work / "data")]
    argv += ["--clip", str(TOY / "clip"), "--vae", str(vae), "--out", str(work / f"unet-{design}")]
    argv += ["--object-weight", "4", "--batch-size", str(batch_size), "--lr", str(lr)]
    argv += ["--warmup", "100", "--log-every", "50", "--ckpt-every", "500", "--device", "auto"]
    argv += ["--init-from", init] if init else []
    argv += ["--name-small"] if design == "b" else []  # the pilot's (b) recipe
    if seconds is not None:
        argv += ["--steps", "100000000", "--time-budget", f"{seconds:.1f}"]
    else:
        argv += ["--steps", str(steps)]
    argv += ["--bf16", "--noise-on-device"] if cuda else []
    return argv


def pack(run: Path, out: Path, facts: dict) -> list[str]:
    """The run's EMA UNet in float16 with its card, loss log and commands, as ``unet.tar``
    split into parts of at most 15 MB in ``out``."""
    from diffusers import UNet2DConditionModel

    folder = run.parent / "pack"
    shutil.rmtree(folder, ignore_errors=True)
    UNet2DConditionModel.from_pretrained(run / "model").half().save_pretrained(folder / "unet")
    for f in ("card.md", "loss.csv", "commands.log"):
        if (run / f).exists():
            shutil.copy(run / f, folder / "unet" / f)
    (folder / "unet" / "gpu_run.json").write_text(json.dumps(facts, indent=1))
    tar = run.parent / "unet.tar"
    subprocess.run(["tar", "cf", str(tar), "-C", str(folder), "unet"], check=True)
    parts, data = [], tar.read_bytes()
    for k in range(0, len(data), PART_BYTES):
        name = f"unet.tar.part{k // PART_BYTES:02d}"
        (out / name).write_bytes(data[k : k + PART_BYTES])
        parts.append(name)
    return parts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="what comes back: json, log, speed.md, parts")
    p.add_argument("--minutes", type=float, default=9.0, help="the whole run's budget")
    p.add_argument("--work", default=str(ROOT / "runs" / "gpu-work"), help="scratch folder")
    p.add_argument("--smoke", action="store_true", help="tiny data and budgets: a CPU check")
    p.add_argument("--skip", nargs="*", default=[], choices=["tests", "speed", "train"])
    p.add_argument("--design", default="a", choices=["a", "b"], help="a: the shipped 16x16")
    p.add_argument("--init-from", default=None, help="UNet folder to continue (default: shipped)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=3e-4)
    args = p.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    out = Path(args.out).resolve()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    budget = args.minutes * 60
    facts = dict(
        command="python benchmarks/gpu_run.py " + " ".join(argv or sys.argv[1:]),
        device=torch.cuda.get_device_name(0) if cuda else "cpu (no CUDA)",
        cores=os.cpu_count(),
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        budget_s=budget,
        smoke=args.smoke,
    )
    try:
        import diffusers
        import transformers

        facts.update(diffusers=diffusers.__version__, transformers=transformers.__version__)
    except ImportError as e:
        raise SystemExit(
            f"gpu_run: {e.name} is not installed; carry its wheel (.gpu-wheels/, see the "
            "module's doc) and pip install it first"
        ) from None
    rep = Report(out, facts)
    rep.log(f"start on {facts['device']}, budget {budget:.0f} s")
    data = None if "train" in args.skip else render_data(work, args.smoke)
    # the shares: tests and speed capped, the rest for training, 45 s kept for packing
    test_s = 120.0 if args.smoke else min(100.0, 0.2 * budget)
    speed_s = 60.0 if args.smoke else min(160.0, 0.3 * budget)
    if "tests" not in args.skip:
        rep.step("cuda_tests", cuda_tests(rep, work, test_s))
    if "speed" not in args.skip:
        rep.step("cuda_speed", cuda_speed(rep, work, out, speed_s, args.smoke))
    if data is not None:
        t0 = time.time()
        _, err = data.communicate()
        if data.returncode != 0:
            rep.step("train", dict(error="rendering the data failed", tail=err[-1500:]))
            return 1
        rep.log(f"data ready (waited {time.time() - t0:.0f} s)")
        reserve = 15.0 if args.smoke else 60.0  # loading, encoding latents, packing
        seconds = 4.0 if args.smoke else max(30.0, budget - rep.elapsed() - reserve - 45)
        t_argv = train_argv(
            work,
            args.design,
            seconds=None if args.smoke else seconds,  # smoke: 3 steps, the same on any CPU
            steps=3,
            batch_size=8 if args.smoke else args.batch_size,
            lr=args.lr,
            cuda=cuda,
            init_from=args.init_from,
        )
        cmd = [sys.executable, "-m", "blendedit.toy.train", *t_argv]
        code, tail = run_logged(cmd, rep, seconds + reserve + 120)
        run = work / f"unet-{args.design}"
        res = dict(exit_code=code, argv=t_argv, train_seconds=round(seconds, 1))
        if (run / "loss.csv").exists():
            rows = (run / "loss.csv").read_text().splitlines()
            res.update(first_log=rows[1] if len(rows) > 1 else None, last_log=rows[-1])
        if code == 0 and (run / "model").is_dir():
            res["parts"] = pack(run, out, rep.data)
        else:
            res["tail"] = tail[-1500:]
        rep.step("train", res)
    rep.log(f"done in {rep.elapsed():.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
