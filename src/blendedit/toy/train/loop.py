"""The training loop shared by every model: checkpoints, resume, EMA, LR schedule, cards."""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .snapshots import snapshot


@dataclass
class RunInfo:
    step: int
    wall: float  # seconds of training, summed over resumed runs


class Run:
    """Checkpointing, resuming, EMA, LR schedule, loss log and progress bar for one model."""

    def __init__(self, out: Path, model: torch.nn.Module, args, ema: bool):
        self.out, self.model, self.args = Path(out), model, args
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = train_device(args)
        model.to(self.device)
        self.opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
        self.ema = None
        if ema:
            self.ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.bf16 = bool(getattr(args, "bf16", False))
        self.info = RunInfo(0, 0.0)
        self._ema_pairs = None
        self.smooth = None  # running loss shown and logged
        if args.fresh:
            (self.out / "commands.log").unlink(missing_ok=True)
        ckpt = self.out / "checkpoint.pt"
        if ckpt.exists() and not args.fresh:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["opt"])
            if self.ema is not None:
                self.ema = {k: v.to(self.device) for k, v in state["ema"].items()}
            self.info = RunInfo(int(state["step"]), float(state["wall"]))
            self.smooth = state.get("smooth")
            print(f"resumed {ckpt} at step {self.info.step}", file=sys.stderr)
        with (self.out / "commands.log").open("a") as f:  # the recipe, invocation by invocation
            f.write(f"from step {self.info.step}: {command_line()}\n")

    def budget(self) -> float | None:
        """``--time-budget``: seconds of training (summed over resumed runs) that replace
        ``--steps`` as the run's length, so that two designs can be given equal compute."""
        return getattr(self.args, "time_budget", None)

    def progress(self, step: int) -> float:
        """How far the run is, 0 to 1: by its steps, or by its wall time under a budget."""
        if self.budget():
            return self.info.wall / self.budget()
        return step / max(1, self.args.steps)

    def lr(self, step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, self.args.warmup))
        progress = self.progress(step)
        return self.args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1, progress))))

    def _update_ema(self, step: int) -> None:
        decay = min(self.args.ema, (1 + step) / (10 + step))
        if self._ema_pairs is None:  # the float tensors once; the optimiser updates them in place
            state = self.model.state_dict()
            self._ema_pairs = [
                [self.ema[k] for k, v in state.items() if v.dtype.is_floating_point],
                [v.detach() for v in state.values() if v.dtype.is_floating_point],
                [(self.ema[k], v) for k, v in state.items() if not v.dtype.is_floating_point],
            ]
        ema, cur, other = self._ema_pairs
        with torch.no_grad():
            torch._foreach_mul_(ema, decay)
            torch._foreach_add_(ema, cur, alpha=1 - decay)
            for e, v in other:
                e.copy_(v)

    def save(self) -> None:
        state = dict(
            model=self.model.state_dict(),
            opt=self.opt.state_dict(),
            step=self.info.step,
            wall=self.info.wall,
        )
        if self.smooth is not None:
            state["smooth"] = self.smooth
        if self.ema is not None:
            state["ema"] = self.ema
        tmp = self.out / "checkpoint.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.out / "checkpoint.pt")

    def train(self, loss_fn) -> bool:
        """Run ``loss_fn(step) -> loss`` until ``args.steps`` (or ``args.stop_at``), saving
        checkpoints; returns whether the run reached ``args.steps``."""
        from tqdm.auto import tqdm

        args = self.args
        log = self.out / "loss.csv"
        if not log.exists() or self.info.step == 0:
            log.write_text("step,loss,lr,samples_per_s,wall_s\n")
        self.model.train()
        budget, shots = self.budget(), max(0, getattr(args, "snapshots", 0) or 0)
        bar = tqdm(
            total=None if budget else args.steps,
            initial=self.info.step,
            desc=self.out.name,
            unit="step",
            smoothing=0,
        )
        t_last, smooth = time.time(), self.smooth
        stop = min(args.steps, args.stop_at or args.steps)
        shot = int(self.info.wall * shots / budget) if budget and shots else 0  # ones written
        while (self.info.wall < budget) if budget else (self.info.step < stop):
            t0 = time.time()
            step = self.info.step
            for g in self.opt.param_groups:
                g["lr"] = self.lr(step)
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
                loss = loss_fn(step)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            if self.ema is not None:
                self._update_ema(step)
            self.info.step += 1
            self.info.wall += time.time() - t0
            v = float(loss.detach())
            smooth = v if smooth is None else 0.98 * smooth + 0.02 * v
            bar.update(1)
            bar.set_postfix(loss=f"{smooth:.4f}")
            if self.info.step % args.log_every == 0 or self.info.step == args.steps:
                rate = args.batch_size * args.log_every / max(1e-9, time.time() - t_last)
                t_last = time.time()
                with log.open("a") as f:
                    f.write(
                        f"{self.info.step},{smooth:.6f},{self.lr(step):.3g},{rate:.1f},"
                        f"{self.info.wall:.1f}\n"
                    )
            self.smooth = smooth
            if self.info.step % args.ckpt_every == 0:
                self.save()
            passed = min(shots, int(self.info.wall * shots / budget)) if budget and shots else 0
            if passed > shot:  # `--snapshots K`: the weights at each K-th of the budget, kept
                self.save()
                done = snapshot(self.out)
                for k in range(shot + 1, passed + 1):  # a slow step may pass several marks
                    keep = self.out / f"snapshot-{k}"
                    shutil.rmtree(keep, ignore_errors=True)
                    shutil.copytree(done, keep)
                shutil.rmtree(done)
                shot = passed
        bar.close()
        self.save()
        self.model.eval()
        if budget:
            return self.info.wall >= budget
        return self.info.step >= args.steps

    def final_state(self) -> dict:
        """The weights to ship (the EMA where kept), on the CPU; the model is moved back too."""
        self.model.to("cpu")
        state = self.ema if self.ema is not None else self.model.state_dict()
        return {k: v.cpu() for k, v in state.items()}


def train_device(args) -> torch.device:
    """``--device``: ``auto`` is CUDA when there is a GPU, else the CPU; runs without the option
    (the CLIP trainers) train on the CPU."""
    name = getattr(args, "device", None) or "cpu"
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise SystemExit(f"--device {name}: not usable here ({str(e).splitlines()[0]})") from None
    return device


def command_line() -> str:
    argv = sys.argv[1:]
    if argv[:1] == ["train-toy"]:  # called as `blendedit train-toy ...`
        argv = argv[1:]
    return "python -m blendedit.toy.train " + " ".join(argv)


def write_card(
    out: Path,
    title: str,
    args,
    run: Run,
    params: int,
    metrics: dict,
    notes: str,
    started_from: str | None = None,
):
    """The run's card.md (and metrics.json); ``started_from``: the model a continued run
    began with, named in the title and the notes."""
    if started_from:
        title += ", continued from an earlier run"
        notes += f" Started from {started_from}."
    log = out / "commands.log"
    cmds = log.read_text().splitlines() if log.exists() else [command_line()]
    hw = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s)"
    if torch.cuda.is_available():
        hw = torch.cuda.get_device_name(0)
    lines = [
        f"# {title}",
        "",
        notes,
        "",
        *[f"- command: `{c.split(': ', 1)[-1]}` ({c.split(': ', 1)[0]})" for c in cmds],
        f"- parameters: {params / 1e6:.2f} M",
        f"- steps: {run.info.step}, batch size {args.batch_size}, samples seen "
        f"{run.info.step * args.batch_size}",
        f"- optimizer: AdamW lr {args.lr} (warm-up {args.warmup} steps, cosine to 10%), "
        f"weight decay 0.01, grad-norm clip 1"
        + (f", EMA {args.ema}" if run.ema is not None else ""),
        f"- data: {', '.join(_data_folders(args.data))} (Shapes World v1, seed {args.seed})"
        if getattr(args, "data", None)
        else f"- data: rendered by the run (Shapes World v1, seed {args.seed})",
        f"- wall time: {run.info.wall / 60:.1f} min of training on {hw}, torch {torch.__version__}",
        "- final metrics: "
        + (
            ", ".join(f"{k} {v}" for k, v in metrics.items())
            or "none in training (it needs the other models: `python -m blendedit.toy.evaluate "
            "--model-dir <assembled folder>` measures them)"
        ),
        "",
    ]
    (out / "card.md").write_text("\n".join(lines))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))


def _rng(args, step: int) -> np.random.RandomState:
    return np.random.RandomState([args.seed, step])


def _data_folders(data) -> list[str]:
    """``--data``: one folder or several (the UNet draws uniformly over their union), with
    distinct names (each names its latent cache)."""
    folders = [data] if isinstance(data, str) else list(data)
    names = [Path(f).name for f in folders]
    if len(set(names)) < len(names):
        raise SystemExit(f"--data: the folders need distinct names (their latent caches): {names}")
    return folders


def _model_dir(path: str | Path, flag: str) -> Path:
    """A finished run's ``model/``, or ``path`` itself when it is a model folder (e.g. the
    shipped ``src/blendedit/assets/toy/pipeline/vae`` or ``.../assets/toy/clip``)."""
    path = Path(path)
    for folder in (path / "model", path):
        if (folder / "config.json").is_file():
            return folder
    raise SystemExit(f"{flag}: {path} is neither a finished run (no model/) nor a model folder")
