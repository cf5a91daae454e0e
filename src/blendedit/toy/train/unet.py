"""The text-to-image UNet on the VAE's latents."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from ..common import TEXT_MAX_LENGTH, image_batch, tokenize
from ..data import SceneData, train_caption
from .arch import (
    SAMPLING_FILE,
    TEXT_ENCODER,
    UNET_RUN_CONFIG,
    ZERO_SNR_SAMPLING,
    _latent_ddpm,
    _unet_config,
)
from .loop import Run, _data_folders, _model_dir, _rng, train_device, write_card
from .vae import _per_image_mean, band_cache


def _encode_latents(
    vae_folder: Path,
    data: SceneData,
    cache: Path,
    batch: int = 100,
    limit: int | None = None,
    device: torch.device | str = "cpu",
):
    """Posterior means x scaling factor of every training image, or of the first ``limit``
    (cached to ``cache``, on the CPU; encoded on ``device``)."""
    from diffusers import AutoencoderKL
    from tqdm.auto import tqdm

    if cache.exists():
        return torch.load(cache, weights_only=True)
    vae = AutoencoderKL.from_pretrained(vae_folder).float().eval().to(device)  # float16 if shipped
    zs = []
    n = min(len(data), limit or len(data))
    with torch.no_grad():
        for a in tqdm(range(0, n, batch), desc="encode latents", unit="batch"):
            x = image_batch(data, range(a, min(a + batch, n))).to(device)
            zs.append((vae.encode(x).latent_dist.mode() * vae.config.scaling_factor).cpu())
    z = torch.cat(zs).contiguous()
    torch.save(z, str(cache) + ".tmp")
    os.replace(str(cache) + ".tmp", cache)
    return z


class _Concat:
    """Several built data sets read as one: ``scenes`` in order, for captions."""

    def __init__(self, sets, counts=None):
        counts = counts or [len(d) for d in sets]
        self.scenes = [s for d, n in zip(sets, counts) for s in d.scenes[:n]]

    def __len__(self) -> int:
        return len(self.scenes)


def _noise_and_steps(
    rng, shape, scheduler, device, max_t: int | None = None, on_device: bool = False
):
    """A batch's noise and timesteps (below ``max_t``, default all) for a diffusion loss, drawn
    on the CPU from the step's ``rng`` (so a run sees the same draws on any device), then moved
    to ``device``; with ``on_device`` drawn there (`unet --noise-on-device`: a GPU draws a large
    batch's noise far faster than the CPU, but the draws then depend on the device)."""
    where = device if on_device else "cpu"
    g = torch.Generator(device=where).manual_seed(int(rng.randint(2**31)))
    noise = torch.randn(shape, generator=g, device=where)
    high = max_t or scheduler.config.num_train_timesteps
    t = torch.randint(0, high, (shape[0],), generator=g, device=where)
    return noise.to(device), t.to(device)


class CaptionIds:
    """Token ids of captions, each distinct caption tokenized once and kept on ``device``: a
    data set has far fewer distinct captions than a run draws, and tokenizing a large batch
    afresh every step costs more than a GPU's training step. The ids are tokenize()'s."""

    def __init__(self, tokenizer, device):
        self.tokenizer, self.device, self.row = tokenizer, device, {}
        self.table = torch.zeros(0, TEXT_MAX_LENGTH, dtype=torch.long, device=device)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        new = [t for t in dict.fromkeys(texts) if t not in self.row]
        if new:
            self.row.update({t: len(self.row) + k for k, t in enumerate(new)})
            self.table = torch.cat([self.table, tokenize(self.tokenizer, new).to(self.device)])
        return self.table[torch.tensor([self.row[t] for t in texts], device=self.device)]


def _min_snr_weight(scheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    ac = scheduler.alphas_cumprod.to(t.device)[t]
    snr = ac / (1 - ac)
    return torch.clamp(snr, max=gamma) / snr


def train_unet(args) -> None:
    from diffusers import UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folders = _data_folders(args.data)
    vae_folder = _model_dir(args.vae, "--vae")
    sets = [SceneData(d) for d in folders]
    if args.limit is not None and args.limit < 1:
        raise SystemExit(
            f"--limit: the images to take from each data set, at least 1; got {args.limit}"
        )
    # one latent cache per data set, named by its folder: a run can add a set and keep the rest
    suffix = f"-first{args.limit}" if args.limit else ""
    device = train_device(args)
    z_sets = [
        _encode_latents(
            vae_folder,
            d,
            out / f"latents-{Path(f).name}{suffix}.pt",
            limit=args.limit,
            device=device,
        )
        for d, f in zip(sets, folders)
    ]
    z_all = torch.cat(z_sets).to(device)
    data = _Concat(sets, [len(z) for z in z_sets])
    size = sets[0].images.shape[1]
    factor = size // z_all.shape[-1]  # the VAE's downscale
    cells = None
    if args.object_weight:  # latent cells under an object, from each set's cached object bands
        bands = [band_cache(d, Path(f) / "bands.pt") for d, f in zip(sets, folders)]
        cells = torch.cat(
            [F.max_pool2d(b[: len(z)].float(), factor) / 255 for b, z in zip(bands, z_sets)]
        ).to(device)
    clip_folder = _model_dir(args.clip, "--clip")
    tok = AutoTokenizer.from_pretrained(clip_folder)
    joint = args.train_text_encoder
    text = CLIPTextModel.from_pretrained(clip_folder).float().requires_grad_(joint).to(device)
    sched = _latent_ddpm(args.zero_snr)
    torch.manual_seed(args.seed)
    if args.max_t is not None and not 1 <= args.max_t <= sched.config.num_train_timesteps:
        raise SystemExit(
            f"--max-t: a timestep bound from 1 to {sched.config.num_train_timesteps}; "
            f"got {args.max_t}"
        )
    if args.channels and any(c < 32 or c % 32 for c in args.channels):  # GroupNorm: 32 groups
        raise SystemExit(f"--channels: each width a multiple of 32; got {args.channels}")
    grid = z_all.shape[-1] * 128 // size  # the latents' side at 128 px
    model = UNet2DConditionModel(
        **_unet_config(args.pooled_text, args.channels, args.layers, grid=grid)
    )
    out.joinpath(UNET_RUN_CONFIG).write_text(json.dumps(dict(model.config), indent=2, default=list))
    if args.zero_snr:
        out.joinpath(SAMPLING_FILE).write_text(json.dumps(ZERO_SNR_SAMPLING, indent=2))
    if args.pooled_text:  # the pooled text starts silent: a UNet it is added to keeps its output
        torch.nn.init.zeros_(model.add_embedding.norm2.weight)
        torch.nn.init.zeros_(model.add_embedding.norm2.bias)
    if args.init_from:  # e.g. a UNet trained on another text encoder: its cross-attention re-learns
        start = UNet2DConditionModel.from_pretrained(_model_dir(args.init_from, "--init-from"))
        try:
            missing, unexpected = model.load_state_dict(start.state_dict(), strict=False)
        except RuntimeError:  # same names, other shapes
            raise SystemExit(
                f"--init-from {args.init_from}: its UNet's widths "
                f"{list(start.config.block_out_channels)} x {start.config.layers_per_block} "
                f"layers are not this one's {list(model.config.block_out_channels)} x "
                f"{model.config.layers_per_block} (--channels, --layers); a UNet of other widths "
                "starts from scratch"
            ) from None
        if unexpected or any(not k.startswith("add_embedding.") for k in missing):
            raise SystemExit(
                f"--init-from {args.init_from}: its UNet does not fit this one (missing "
                f"{missing[:3]}, unexpected {unexpected[:3]}); --pooled-text can be added to "
                "a UNet without it, not taken away"
            )
    # jointly: one optimiser, EMA and checkpoint over both (their keys prefixed by their names)
    net = torch.nn.ModuleDict({"unet": model, TEXT_ENCODER: text}) if joint else model
    run = Run(out, net, args, ema=True)
    if joint:  # its config and tokenizer, for snapshots of the checkpoint
        text.config.save_pretrained(out / TEXT_ENCODER)
        tok.save_pretrained(out / TEXT_ENCODER)
    else:
        text.eval()

    caption_ids = CaptionIds(tok, device)

    def loss_fn(step):
        rng = _rng(args, step)
        idx = rng.randint(len(data), size=args.batch_size)
        z0 = z_all[torch.from_numpy(idx).to(device)]
        texts = [train_caption(data.scenes[i], rng, name_small=args.name_small) for i in idx]
        with torch.set_grad_enabled(joint):
            cond = text(caption_ids(texts))[0]
        noise, t = _noise_and_steps(rng, z0.shape, sched, device, args.max_t, args.noise_on_device)
        zt = sched.add_noise(z0, noise, t)
        pred = model(zt, t, cond).sample
        target = sched.get_velocity(z0, noise, t) if args.zero_snr else noise
        err = (pred.float() - target).pow(2)
        if cells is not None:  # latent cells under an object (or its 2 px band) weigh more
            w = 1 + args.object_weight * cells[torch.from_numpy(idx).to(device)]
            per_image = _per_image_mean(err, w)
        else:
            per_image = _per_image_mean(err)
        # zero SNR: a plain v loss (min-SNR's v form would leave the pure-noise end unweighted)
        if args.zero_snr:
            return per_image.mean()
        return (_min_snr_weight(sched, t, args.min_snr) * per_image).mean()

    if not run.train(loss_fn):
        return
    net.load_state_dict(run.final_state())
    model.save_pretrained(out / "model")
    if (out / SAMPLING_FILE).is_file():
        shutil.copy(out / SAMPLING_FILE, out / "model" / SAMPLING_FILE)
    if joint:  # the UNet only works with its own text encoder: it goes inside its model folder
        text.save_pretrained(out / "model" / TEXT_ENCODER)
        tok.save_pretrained(out / "model" / TEXT_ENCODER)
    params = sum(p.numel() for p in model.parameters())
    write_card(
        out,
        "Shapes World text-to-image UNet",
        args,
        run,
        params,
        {},
        f"`diffusers.UNet2DConditionModel` on {grid}x{grid}x4 VAE latents, cross-attention on "
        "the toy "
        "CLIP's text encoder ("
        + (
            f"trained with the UNet from {args.clip}'s, saved in model/{TEXT_ENCODER}/"
            if joint
            else f"{args.clip}'s, frozen"
        )
        + "; last hidden state, as Stable Diffusion), epsilon "
        "prediction, Stable Diffusion 1.x's noise schedule, min-SNR loss weighting "
        f"(gamma {args.min_snr}), captions drawn afresh every step, {int(100 * 0.1)}% empty "
        "(for classifier-free guidance). Weights are the EMA."
        + (f" Only the first {args.limit} images of each data set." if args.limit else "")
        + (
            " Latent cells under an object or within 2 px of one weigh "
            f"{1 + args.object_weight:g}x in the loss (averaged per image under those weights)."
            if args.object_weight
            else ""
        )
        + (
            " Zero terminal SNR (betas rescaled so that the last step is pure noise) with "
            "v-prediction and a plain v loss: the pipeline's scheduler needs "
            f"{ZERO_SNR_SAMPLING}."
            if args.zero_snr
            else ""
        )
        + (
            f" Trained only on timesteps below {args.max_t} (the low-noise steps)."
            if args.max_t
            else ""
        )
        + (
            " Small objects are always called small in the captions (a caption without a size "
            "word then means a medium or big object)."
            if args.name_small
            else ""
        ),
        started_from=args.init_from,
    )
