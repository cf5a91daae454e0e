"""The VAE in tiles (issue 44): a region of more than ``VAE_TILE_AREA`` x the native area goes
through the VAE (encode, then decode) in native-size tiles. On the SD-shaped random model
(``blendedit.tiny``'s ``sd-shaped`` preset, 512 px native, channels / 4), for square regions of
each ``--sizes``: seconds and peak resident memory of one encode and decode, tiled against
untiled, each in a process of its own (the high-water mark of its resident set), and how far the
tiled decode lies from the untiled one (the tiles' blended seams; a random VAE exaggerates
them). Then the fidelity on a trained VAE, the shipped toy model's (128 px native): PSNR of the
round trip of a 768 px Shapes World frame against the frame, tiled and untiled.

    python benchmarks/vae_tiles.py [--sizes 1536 2048] [--out benchmarks/results/vae_tiles]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from blendedit import BlendedLatentDiffusionPipeline, latent_model
from blendedit.bench import rss_mb
from blendedit.io import save_json
from blendedit.tiny import SD_SCHEDULER, build_tiny_components


def pipeline() -> BlendedLatentDiffusionPipeline:
    from diffusers import DDIMScheduler

    c = build_tiny_components("sd-shaped", width_div=4, sample_size=64)  # 512 px native
    parts = {k: c[k] for k in ("unet", "vae", "text_encoder", "tokenizer")}
    return BlendedLatentDiffusionPipeline(scheduler=DDIMScheduler(**SD_SCHEDULER), **parts)


def round_trip(pipe, side: int, tiled: bool):
    """(seconds, decoded image) of E then D on a smooth ``side`` px square."""
    if not tiled:
        latent_model.VAE_TILE_AREA = float("inf")
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    x = torch.stack([0.5 + 0.4 * torch.sin((xx + k * yy) / (60 + 20 * k)) for k in range(3)])
    t0 = time.perf_counter()
    out = pipe.decode_latents(pipe.encode_image(x[None].float()))
    return time.perf_counter() - t0, out


def fidelity(scale: int = 6) -> dict:
    """PSNR (dB) of the shipped toy VAE's round trip of a Shapes World frame ``scale`` x its
    native size, tiled and untiled."""
    from blendedit.io import pil_to_tensor
    from blendedit.toy.tasks import make_task

    pipe = BlendedLatentDiffusionPipeline.from_pretrained("toy")
    x = pil_to_tensor(make_task(0, "replace", pipe.native_size * scale, False).image)
    res, keep = {}, latent_model.VAE_TILE_AREA
    for mode, area in (("untiled", float("inf")), ("tiled", keep)):
        latent_model.VAE_TILE_AREA = area
        y = pipe.decode_latents(pipe.encode_image(x))
        res[mode] = float(10 * torch.log10(1 / ((y - x) ** 2).mean()))
    latent_model.VAE_TILE_AREA = keep
    return res | dict(side=x.shape[-1])


def child(side: int, tiled: bool, save: str | None) -> int:
    torch.manual_seed(0)
    dt, out = round_trip(pipeline(), side, tiled)
    if save:
        torch.save(out, save)
    print(json.dumps(dict(seconds=dt, peak_mb=rss_mb("VmHWM"))))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1536, 2048])
    p.add_argument("--out", default="benchmarks/results/vae_tiles")
    p.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        side, tiled, save = args.child
        return child(int(side), tiled == "tiled", save if save != "-" else None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, tmp = [], tempfile.mkdtemp(prefix="vae_tiles-")  # the decodes to compare
    for side in args.sizes:
        row = dict(side=side)
        for mode in ("untiled", "tiled"):
            save = str(Path(tmp) / f"{mode}.pt")
            cmd = [sys.executable, __file__, "--child", str(side), mode, save]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            row[mode] = json.loads(res.strip().splitlines()[-1])
        a = torch.load(Path(tmp) / "untiled.pt", weights_only=True)
        b = torch.load(Path(tmp) / "tiled.pt", weights_only=True)
        row["max_abs_diff_255"] = float((a - b).abs().max()) * 255
        row["mean_abs_diff_255"] = float((a - b).abs().mean()) * 255
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    shutil.rmtree(tmp)
    fid = fidelity()
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    save_json(
        dict(rows=rows, fidelity=fid, machine=machine, tile_area=latent_model.VAE_TILE_AREA),
        out / "results.json",
    )
    lines = [
        "# The VAE in tiles (issue 44)",
        "",
        f"`python benchmarks/vae_tiles.py {' '.join(argv if argv is not None else sys.argv[1:])}`:"
        " one encode and decode of a square region on the SD-shaped random model (512 px "
        f"native, channels / 4), tiled in 512 px tiles or not, each in a process of its own; "
        f"{machine}. A region is tiled when it holds more than {latent_model.VAE_TILE_AREA}x "
        "the native area.",
        "",
        "| region | untiled s | tiled s | untiled peak MB | tiled peak MB | tiled vs untiled, "
        "mean / max abs (8-bit levels) |",
        "|---|---|---|---|---|---|",
        *[
            f"| {r['side']} px | {r['untiled']['seconds']:.2f} | {r['tiled']['seconds']:.2f} | "
            f"{r['untiled']['peak_mb']:.0f} | {r['tiled']['peak_mb']:.0f} | "
            f"{r['mean_abs_diff_255']:.2f} / {r['max_abs_diff_255']:.1f} |"
            for r in rows
        ],
        "",
        f"The shipped toy VAE (trained; 128 px native), a {fid['side']} px Shapes World frame, "
        f"round trip against the frame: untiled {fid['untiled']:.2f} dB, tiled "
        f"{fid['tiled']:.2f} dB.",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
