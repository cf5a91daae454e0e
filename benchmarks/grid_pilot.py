"""Issue 27's pilot: the latent model on a 16x16 grid (today's f=8 VAE) against a 32x32 grid (an
f=4 VAE), each UNet trained from scratch for the same wall-clock budget on the same data,
captions, text encoder and recipe, and measured at three checkpoints.

    python benchmarks/grid_pilot.py --work runs/pilot --out benchmarks/results/grid_pilot \\
        --deadline 540            # one prepared run for a lent GPU machine (~9 minutes)
    python benchmarks/grid_pilot.py --smoke --work /tmp/pilot --out /tmp/pilot-out   # CPU check
    python benchmarks/grid_pilot.py --designs b --vae benchmarks/results/grid_pilot/vae4 \
        --batch-size 1024 --lr 1e-3 --noise-on-device --work runs/pilot --out OUT  # (b), long

Steps, each logged with its seconds (the whole run keeps inside ``--deadline``):
1. render the data: 20,000 scenes of 0-3 objects, 40,000 one-object scenes, 1,000 held out;
2. train the f=4 VAE (whole 128 px frames, object pixels weighted) for ``--vae-seconds``;
3. train UNet (a) on the shipped f=8 VAE's 16x16 latents and UNet (b) on the f=4 VAE's 32x32
   latents, each for the same budget (what is left, halved), snapshots at 1/3, 2/3 and 3/3;
4. for each snapshot: the one-step denoise figure (150 renders) and text-to-image (30 prompts
   x 4 seeds, 25 DDIM steps, guidance 5, judged); each VAE's PSNR and shape round trip;
5. write ``pilot.json`` and pack the final UNets and the f=4 VAE (float16) into ``models.tar``
   split in parts of at most 15 MB (what a GPU machine may send back).

The pilot's report, with its table and decision, is benchmarks/results/grid_pilot/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from blendedit.toy import evaluate as E  # noqa: E402
from blendedit.toy import train as T  # noqa: E402
from blendedit.toy.data import build_dataset  # noqa: E402

TOY = ROOT / "src" / "blendedit" / "assets" / "toy"
SIZES = dict(multi=20000, single=40000, heldout=1000)
SMOKE_SIZES = dict(multi=200, single=300, heldout=60)


def log(msg: str) -> None:
    print(f"[pilot {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def train(argv: list[str]) -> None:
    log("train " + " ".join(argv))
    sys.argv = ["blendedit.toy.train", *argv]  # the runs' command logs record it
    T.main(argv)


def pipeline_with(folder: Path, unet: Path, vae: Path | None) -> Path:
    """The shipped pipeline with ``unet`` (and ``vae``) in place of its own."""
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(TOY / "pipeline", folder)
    for name, src in (("unet", unet), ("vae", vae)):
        if src is not None:
            shutil.rmtree(folder / name)
            shutil.copytree(src, folder / name, ignore=shutil.ignore_patterns("STEP"))
    return folder


def measure(pipe: Path, device: str, quick: bool) -> dict:
    from blendedit.models import load_sd_components

    t0 = time.time()
    parts = load_sd_components(str(pipe), torch_dtype=torch.float32, local_files_only=True)
    den, noisy = E.denoise_shapes_kept(parts, n=30 if quick else 150, device=device)
    seeds = (0,) if quick else (0, 1, 2, 3)
    rate, rows, _ = E.t2i_success(pipe, seeds=seeds, steps=5 if quick else 25, device=device)
    return dict(
        t2i=round(rate, 4),
        denoise=round(den, 4),
        noisy=round(noisy, 4),
        t2i_samples=len(rows),
        seconds=round(time.time() - t0, 1),
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--work", default="runs/pilot")
    p.add_argument("--out", required=True)
    p.add_argument("--deadline", type=float, default=540, help="seconds for the whole run")
    p.add_argument("--vae-seconds", type=float, default=90)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--eval-reserve", type=float, default=70, help="seconds kept for steps 4-5")
    p.add_argument("--smoke", action="store_true", help="tiny data and budgets (a CPU check)")
    p.add_argument(
        "--designs", default="ab", help="which UNets to train: a (16x16), b (32x32) or ab"
    )
    p.add_argument(
        "--noise-on-device",
        action="store_true",
        help="the UNets draw their noise on the GPU (`unet --noise-on-device`; the pilot did not)",
    )
    p.add_argument(
        "--vae",
        default=None,
        help="an f=4 VAE folder to use instead of training one (with its card.md, loss.csv, "
        "commands.log and metrics.json), e.g. benchmarks/results/grid_pilot/vae4",
    )
    args = p.parse_args(argv)
    start = time.time()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    cores = os.cpu_count() or 2
    E.judge_workers(max(1, cores - 2))
    report = dict(
        device=torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        cores=cores,
        torch=torch.__version__,
        phases={},
    )

    def phase(name, t0):
        report["phases"][name] = round(time.time() - t0, 1)
        (out / "pilot.json").write_text(json.dumps(report, indent=2))
        log(f"{name}: {report['phases'][name]} s (total {time.time() - start:.0f} s)")

    sizes = SMOKE_SIZES if args.smoke else SIZES
    d_multi, d_single, d_held = work / "data", work / "data-single", work / "heldout"
    t0 = time.time()
    workers = max(1, cores - 1)
    build_dataset(d_multi, sizes["multi"], seed=0, workers=workers)
    build_dataset(d_held, sizes["heldout"], seed=1, workers=workers)
    phase("render multi + heldout", t0)
    # the one-object set renders in another process while the VAE trains (it needs no GPU)
    single = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "blendedit.toy.train",
            "data",
            "--objects",
            "1",
            "--out",
            str(d_single),
            "-n",
            str(sizes["single"]),
            "--workers",
            str(max(1, cores - 4)),
        ],
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), *sys.path[1:]])),
    )
    t0 = time.time()
    vae_seconds = 4 if args.smoke else args.vae_seconds
    common = ["--device", "auto", "--ckpt-every", "1000000", "--log-every", "50"]
    common += ["--bf16"] if device == "cuda" else []  # bf16 convolutions crawl on a CPU
    vae_args = ["vae", "--factor", "4", "--data", str(d_multi), "--heldout", str(d_held)]
    vae_args += ["--out", str(work / "vae4"), "--crop", "128"]
    vae_args += ["--batch-size", "2" if args.smoke else "32"]
    vae_args += ["--lr", "5e-4", "--warmup", "100", "--object-weight", "10", "--steps", "10000000"]
    vae_args += ["--time-budget", str(vae_seconds), *common]
    if args.vae:  # an f=4 VAE trained before (the pilot's is committed beside its report)
        shutil.rmtree(work / "vae4", ignore_errors=True)
        shutil.copytree(args.vae, work / "vae4" / "model")
        for f in ("card.md", "loss.csv", "commands.log", "metrics.json"):
            shutil.move(work / "vae4" / "model" / f, work / "vae4" / f)
    else:
        train(vae_args)
    phase("vae f=4", t0)
    t0 = time.time()
    if single.wait() != 0:
        raise SystemExit("rendering the one-object data failed")
    phase("wait for one-object data", t0)

    left = args.deadline - (time.time() - start) - args.eval_reserve
    n_designs = len(args.designs)
    # 20 s a run: encoding the latents, loading, snapshots
    unet_seconds = 6.0 if args.smoke else max(30.0, left / n_designs - 20)
    report["unet_seconds_each"] = round(unet_seconds, 1)
    designs = {
        "a_f8_16x16": TOY / "pipeline" / "vae",
        "b_f4_32x32": work / "vae4" / "model",
    }
    designs = {k: v for k, v in designs.items() if k[0] in args.designs}
    for name, vae in designs.items():
        t0 = time.time()
        u = ["unet", "--data", str(d_single), str(d_multi), "--clip", str(TOY / "clip")]
        u += ["--vae", str(vae), "--out", str(work / name), "--name-small", "--object-weight", "4"]
        u += ["--batch-size", str(8 if args.smoke else args.batch_size), "--lr", str(args.lr)]
        u += ["--warmup", "200", "--steps", "100000000", "--time-budget", str(unet_seconds)]
        u += ["--snapshots", "3", *common]
        u += ["--noise-on-device"] if args.noise_on_device else []
        train(u)
        loss = (work / name / "loss.csv").read_text().splitlines()
        report.setdefault("runs", {})[name] = dict(
            steps=int((work / name / "snapshot-3" / "STEP").read_text()),
            batch_size=8 if args.smoke else args.batch_size,
            last_log=loss[-1],
            commands=(work / name / "commands.log").read_text().splitlines(),
        )
        phase(f"unet {name}", t0)
        torch.cuda.empty_cache() if device == "cuda" else None

    t0 = time.time()
    for label, folder in (
        ("f8 (shipped)", TOY / "pipeline" / "vae"),
        ("f4", work / "vae4" / "model"),
    ):
        try:  # a failure here must not cost the trained models
            vae = E._vae(folder).to(device)
            report.setdefault("vae", {})[label] = dict(
                psnr=E.vae_psnr(vae, d_held, n=200), shapes_kept=round(E.vae_shapes_kept(vae), 4)
            )
        except Exception as e:  # noqa: BLE001
            report.setdefault("errors", []).append(f"vae {label}: {e!r}")
    phase("vae figures", t0)
    table = []
    for name, vae in designs.items():
        for k in (1, 2, 3):
            t0 = time.time()
            snap = work / name / f"snapshot-{k}"
            step = int((snap / "STEP").read_text())
            pipe = pipeline_with(
                work / "pipes" / f"{name}-{k}", snap, vae if "f4" in name else None
            )
            try:
                figures = measure(pipe, device, args.smoke)
                row = dict(design=name, checkpoint=k, step=step, **figures)
            except Exception as e:  # noqa: BLE001
                report.setdefault("errors", []).append(f"measure {name} {k}: {e!r}")
                row = dict(design=name, checkpoint=k, step=step, t2i=-1, denoise=-1)
            table.append(row)
            report["table"] = table
            phase(f"measure {name} {k}", t0)
            log(json.dumps(row))

    # the decision: text-to-image first, the denoise figure as the tie-break
    final = {r["design"]: r for r in table if r["checkpoint"] == 3}
    best = max(final, key=lambda d: (final[d]["t2i"], final[d]["denoise"]))
    report["leader"] = best
    (out / "pilot.json").write_text(json.dumps(report, indent=2))

    # pack the final UNets (float16) and the f=4 VAE for the trip back
    t0 = time.time()
    pack = work / "pack"
    shutil.rmtree(pack, ignore_errors=True)
    from diffusers import AutoencoderKL, UNet2DConditionModel

    for name in designs:
        unet = UNet2DConditionModel.from_pretrained(work / name / "model").half()
        unet.save_pretrained(pack / name)
        for f in ("card.md", "loss.csv", "commands.log"):
            shutil.copy(work / name / f, pack / name / f)
    AutoencoderKL.from_pretrained(work / "vae4" / "model").half().save_pretrained(pack / "vae4")
    for f in ("card.md", "loss.csv", "commands.log", "metrics.json"):
        shutil.copy(work / "vae4" / f, pack / "vae4" / f)
    shutil.copy(out / "pilot.json", pack / "pilot.json")
    tar = work / "models.tar"
    subprocess.run(["tar", "cf", str(tar), "-C", str(pack), "."], check=True)
    subprocess.run(["split", "-b", "15M", "-d", str(tar), str(out / "models.tar.part")], check=True)
    phase("pack", t0)
    log(f"leader {best}; {json.dumps(final)}")
    print(json.dumps({k: report.get(k) for k in ("table", "vae", "phases", "errors")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
