"""Take a GPU run's trained UNet home (issue 43): reassemble ``unet.tar.part*`` from
``benchmarks/gpu_run.py``'s output, bench it against the shipped model on the same edit tasks
(ours, paired, on this CPU), and ship it (``train-toy assemble --only unet``) only if it wins:
more tasks edited and a paired sign test below ``--alpha``.

    python benchmarks/gpu_adopt.py DIR [--tasks 120] [--dry-run]

Writes ``adopt.json`` and ``report.md`` into ``--out`` (default: DIR/adopt); the shipped folder
is left as it is unless the candidate wins (and never with ``--dry-run``).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

TOY = ROOT / "src" / "blendedit" / "assets" / "toy"
PILOT_VAE = ROOT / "benchmarks" / "results" / "grid_pilot" / "vae4"


#: what a run folder keeps beside model/ (card, loss log, commands), not part of the model
RUN_FILES = ("card.md", "loss.csv", "commands.log")
NOT_MODEL = shutil.ignore_patterns("*.md", "*.csv", "*.log", "gpu_run.json")


def reassemble(parts_dir: Path, work: Path) -> Path:
    """The parts, in order, as one tar, unpacked into ``work``; the UNet folder."""
    parts = sorted(parts_dir.glob("unet.tar.part*"))
    if not parts:
        raise SystemExit(f"gpu_adopt: no unet.tar.part* in {parts_dir} (a gpu_run.py output)")
    data = b"".join(p.read_bytes() for p in parts)
    shutil.rmtree(work / "unet", ignore_errors=True)
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(work, filter="data")
    except tarfile.TarError as e:
        raise SystemExit(f"gpu_adopt: the parts do not make a tar ({e}); is one missing?") from None
    if not (work / "unet" / "config.json").is_file():
        raise SystemExit(f"gpu_adopt: no unet/config.json in the parts of {parts_dir}")
    return work / "unet"


def candidate_pipeline(unet: Path, work: Path, toy: Path) -> tuple[Path, bool]:
    """The shipped pipeline with the candidate UNet (and, for a 32x32 UNet, the pilot's f=4
    VAE); whether the VAE was replaced too."""
    cfg = json.loads((unet / "config.json").read_text())
    f4 = int(cfg.get("sample_size", 16)) == 32
    folder = work / "pipeline"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(toy / "pipeline", folder)
    shutil.rmtree(folder / "unet")
    shutil.copytree(unet, folder / "unet", ignore=NOT_MODEL)
    if f4:
        shutil.rmtree(folder / "vae")
        shutil.copytree(PILOT_VAE, folder / "vae", ignore=NOT_MODEL)
    return folder, f4


def bench_both(candidate: Path, args, out: Path) -> dict:
    from blendedit.bench import BenchConfig, run_bench
    from blendedit.bench_stats import paired

    res = {}
    toy = Path(args.dest)
    for name, model in (("shipped", toy / "pipeline"), ("candidate", candidate)):
        cfg = BenchConfig(
            model=str(model),
            clip=str(toy / "clip"),
            methods=["ours"],
            tasks=args.tasks,
            steps=args.steps,
            samples=args.samples,
            examples=0,
        )
        res[name] = run_bench(cfg, out / name, progress=not args.quiet, log=print)
    rows = {k: r["per_task"]["ours"] for k, r in res.items()}
    return dict(
        success={k: r["methods"]["ours"]["success"] for k, r in res.items()},
        paired=paired(rows["candidate"], rows["shipped"]),
    )


def ship(unet: Path, work: Path, f4: bool, toy: Path) -> None:
    """``train-toy assemble --only unet`` (with the VAE for a 32x32 UNet) from run folders laid
    out as the trainer's: model/ beside card.md, loss.csv and commands.log."""
    runs = work / "runs"
    shutil.rmtree(runs, ignore_errors=True)

    def as_run(folder: Path, name: str) -> None:
        shutil.copytree(folder, runs / name / "model", ignore=NOT_MODEL)
        for f in RUN_FILES:
            if (folder / f).exists():
                shutil.copy(folder / f, runs / name / f)

    as_run(unet, "gpu-unet")
    cmd = [sys.executable, "-m", "blendedit.toy.train", "assemble", "--work", str(runs)]
    cmd += ["--unet", "gpu-unet", "--dest", str(toy), "--only", "unet"]
    if f4:
        as_run(PILOT_VAE, "vae4")
        cmd += ["vae", "--vae", "vae4"]
    subprocess.run(cmd, check=True, cwd=ROOT)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("parts", help="folder holding a gpu_run.py output (unet.tar.part*)")
    p.add_argument("--out", default=None, help="report folder (default: PARTS/adopt)")
    p.add_argument("--tasks", type=int, default=120)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--alpha", type=float, default=0.05, help="the sign test's bound to ship")
    p.add_argument("--dry-run", action="store_true", help="bench and report; never ship")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--dest", default=str(TOY), help="the shipped folder (default: the package's)")
    args = p.parse_args(argv)
    parts = Path(args.parts)
    out = Path(args.out) if args.out else parts / "adopt"
    out.mkdir(parents=True, exist_ok=True)
    unet = reassemble(parts, out)
    pipe, f4 = candidate_pipeline(unet, out, Path(args.dest))
    figures = bench_both(pipe, args, out)
    pr = figures["paired"]
    wins = pr["only_a"] > pr["only_b"] and pr["p"] < args.alpha
    shipped = wins and not args.dry_run
    result = dict(
        parts=sorted(p.name for p in parts.glob("unet.tar.part*")),
        f4_vae=f4,
        tasks=args.tasks,
        **figures,
        wins=wins,
        shipped=shipped,
    )
    (out / "adopt.json").write_text(json.dumps(result, indent=1))
    s = figures["success"]
    verdict = "shipped" if shipped else ("wins; not shipped (--dry-run)" if wins else "not shipped")
    text = (
        f"# GPU candidate against the shipped model\n\n{args.tasks} bench tasks, ours, "
        f"{args.samples} samples, {args.steps} steps: candidate {s['candidate']:.1%}, shipped "
        f"{s['shipped']:.1%}; only the candidate {pr['only_a']}, only the shipped "
        f"{pr['only_b']}, sign test p = {pr['p']:.3g}. **{verdict}**.\n"
    )
    (out / "report.md").write_text(text)
    print(text)
    if shipped:
        ship(unet, out, f4, Path(args.dest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
