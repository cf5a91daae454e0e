"""LoRA files and textual-inversion embeddings (issue 41): loaded with diffusers' own loaders
and converters (its layout and the A1111 / kohya-ss one, UNet or transformer and text-encoder
parts, with peft) into a pipeline's modules; LoRAs for every family and its inpainting
checkpoints, embeddings for SD 1.x/2.x and SDXL.

By default a LoRA is fused: its low-rank product, times its scale, is added to the weights it
adapts and the adapter layers are removed, so a step costs what it costs on a model with the LoRA
merged in (benchmarks/lora_speed.py measures the unfused alternative). A file that loads nothing
into this model, or fails half-way, is taken out again before the error: the model is as it was.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .io import file_sha256
from .sources import ModelNotFoundError


@dataclass(frozen=True)
class LoraSpec:
    """One ``--lora FILE[:SCALE]``: a file (or a cached hub repository) and its scale."""

    path: str
    scale: float = 1.0


def parse_lora(text: str) -> LoraSpec:
    """``FILE[:SCALE]`` -> :class:`LoraSpec`; the scale defaults to 1. A ``:`` whose tail is a
    number is the scale (unless the whole text names an existing file); any other tail is an
    error naming it, but a tail with a path separator (``C:\\...``) belongs to the path."""
    split = _suffix(text)
    if split is None:
        return LoraSpec(str(text))
    head, tail = split
    try:
        scale = float(tail)
    except ValueError:
        raise ValueError(
            f"lora: {tail!r} after the last ':' in {text!r} is not a scale (a number); write "
            "FILE[:SCALE], e.g. style.safetensors:0.8"
        ) from None
    if not math.isfinite(scale):
        raise ValueError(f"lora: the scale of {text!r} is not a finite number")
    return LoraSpec(head, scale)


def _looks_like_hub_id(spec: str) -> bool:
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not Path(spec).suffix


def _cached_lora_file(repo: str) -> Path:
    """The LoRA file of a hub repository in the local cache (no network): its
    ``pytorch_lora_weights.safetensors``, or its one ``.safetensors`` file."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo, local_files_only=True))
    except Exception as e:
        raise ModelNotFoundError(
            f"lora: {repo!r} is neither a file nor a LoRA repository in the local Hugging Face "
            f"cache ({_first_line(e)}); `hf download {repo}` on a connected machine"
        ) from e
    files = sorted(folder.rglob("*.safetensors"))
    named = [f for f in files if f.name == "pytorch_lora_weights.safetensors"]
    if len(named or files) != 1:
        raise ValueError(
            f"lora: the cached repository {repo!r} holds {len(files)} .safetensors files; pass "
            "the one to load as a file path"
        )
    return (named or files)[0]


def _loader(pipe):
    """A diffusers pipeline over ``pipe``'s own modules (nothing is copied): its LoRA loader
    mixin is the family's (SD, SDXL, SD3, Flux; the inpainting pipelines carry the same)."""
    import diffusers

    from .models import quiet_transformers

    fam = pipe.adapter
    with quiet_transformers():
        return getattr(diffusers, fam.baselines[0])(**fam.baseline_parts(pipe))


def _modules(pipe) -> list:
    """The modules a LoRA may adapt: the denoiser and the text encoders."""
    parts = (pipe.unet, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3)
    return [m for m in parts if m is not None]


def adapter_layers(pipe, name: str) -> int:
    """How many layers of ``pipe``'s modules carry the LoRA adapter ``name``."""
    return sum(
        1
        for m in _modules(pipe)
        for sub in m.modules()
        if name in (getattr(sub, "lora_A", None) or {})
    )


def load_lora(pipe, spec: LoraSpec, *, fuse: bool = True) -> dict:
    """Load one LoRA into ``pipe`` (a :class:`~blendedit.latent.BlendedLatentDiffusionPipeline`)
    at ``spec.scale``; appends and returns its record (file name, path, SHA-256, scale, fused).

    Raises ``ValueError`` naming the file for a missing file, a file that is not a LoRA or one
    made for another model family (nothing of it stays loaded), ``ModelNotFoundError`` for a hub
    id that is not in the local cache."""
    from .models import quiet_transformers

    path, local = spec.path, Path(spec.path).expanduser()
    if not local.is_file() and not _looks_like_hub_id(path):
        raise ValueError(f"lora: no such file: {path!r}")
    hub_file = None if local.is_file() else _cached_lora_file(path)
    fam, unfused = pipe.adapter, [r for r in pipe.loras if not r["fused"]]
    name = f"blendedit_lora_{len(pipe.loras)}"
    loader = _loader(pipe)
    try:
        with quiet_transformers(), _diffusers_silent():
            loader.load_lora_weights(str(hub_file or local), adapter_name=name)
        if not adapter_layers(pipe, name):
            raise ValueError("it adapts no layer of this model")
    except Exception as e:
        _take_out(loader, name, keep_layers=bool(unfused))
        raise ValueError(
            f"lora: {path!r} is not a LoRA for {fam.label} ({_first_line(e)}); a LoRA of "
            "another model family, or not a LoRA file"
        ) from e
    if fuse:
        loader.fuse_lora(lora_scale=spec.scale, adapter_names=[name])
        if unfused:  # keep the others' layers: only this adapter goes
            loader.delete_adapters([name])
        else:
            loader.unload_lora_weights()  # the fused weights stay, the adapter layers go
    else:
        names = [r["adapter"] for r in unfused] + [name]
        loader.set_adapters(names, adapter_weights=[r["scale"] for r in unfused] + [spec.scale])
    record = dict(
        file=local.name if local.is_file() else path,
        path=path,
        sha256=file_sha256(hub_file or local),
        scale=spec.scale,
        fused=fuse,
        adapter=name,
    )
    pipe.loras.append(record)
    return record


@contextmanager
def loras_for_a_while(pipe, specs):
    """LoRAs on ``pipe`` for the ``with`` block only (a batch row's own): loaded unfused, then
    taken out again, whatever happens; the pipeline's own LoRAs stay as they were."""
    records = []
    try:
        for spec in specs:
            records.append(load_lora(pipe, spec, fuse=False))
        yield records
    finally:
        if records:
            names = {r["adapter"] for r in records}
            pipe.loras = [r for r in pipe.loras if r["adapter"] not in names]
            others = [r for r in pipe.loras if not r["fused"]]
            loader = _loader(pipe)
            for name in names:
                _take_out(loader, name, keep_layers=bool(others))
            if others:
                loader.set_adapters([r["adapter"] for r in others], [r["scale"] for r in others])


def _take_out(loader, name: str, keep_layers: bool) -> None:
    """Remove adapter ``name`` wherever it got to; with no other unfused adapter, every adapter
    layer goes (the modules are their plain selves again)."""
    try:
        if keep_layers:
            loader.delete_adapters([name])
        else:
            loader.unload_lora_weights()
    except Exception:  # it never got into any module
        pass


def _first_line(e: Exception) -> str:
    """The line of ``e``'s message that says what is wrong (a shape mismatch, when there is
    one), shortened: error messages stay one line."""
    text = [t.strip() for t in str(e).strip().splitlines() if t.strip()]
    shapes = [t for t in text if t.startswith("size mismatch")]
    return ((shapes or text or [type(e).__name__])[0])[:300]


@contextmanager
def _diffusers_silent():
    """diffusers' own log off while a LoRA loads: a file that does not fit is reported once,
    on one line, by the error raised here (diffusers logs the whole state-dict report)."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity(dlog.CRITICAL + 10)
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def sidecar_records(pipe) -> list[dict]:
    """What a sidecar records of the loaded LoRAs: each file's name, SHA-256 and scale (and
    its path, for ``reconstruct``)."""
    keys = ("file", "path", "sha256", "scale")
    return [{k: r[k] for k in keys} for r in getattr(pipe, "loras", [])]


def check_recorded(pipe, recorded: list[dict]) -> None:
    """``reconstruct``: the LoRAs loaded must be the files the edit used (SHA-256)."""
    loaded = sidecar_records(pipe)
    if len(loaded) != len(recorded):
        raise ValueError(
            f"lora: this edit used {len(recorded)} LoRA(s) "
            f"({', '.join(r['file'] for r in recorded) or 'none'}), the model has {len(loaded)}"
        )
    for want, got in zip(recorded, loaded):
        if want.get("sha256") and want["sha256"] != got["sha256"]:
            raise ValueError(
                f"lora: {want['path']!r} is not the file this edit used (its SHA-256 differs: "
                f"{got['sha256'][:12]}... against {want['sha256'][:12]}...); pass the same file"
            )


def parse_embedding(text: str) -> tuple[str, str | None]:
    """``FILE[:TOKEN]`` -> (file, token or None: the file's own)."""
    split = _suffix(text)
    return split if split is not None and split[1] else (str(text), None)


def _suffix(text) -> tuple[str, str] | None:
    """(head, tail) of ``HEAD:TAIL``; None where there is no ``:`` after some text, the whole
    text names an existing file, or the tail holds a path separator (``C:\\...``)."""
    head, sep, tail = str(text).rpartition(":")
    if not sep or not head or Path(text).exists() or "/" in tail or "\\" in tail:
        return None
    return head, tail


def _embedding_state(path: Path) -> dict:
    """The tensors of an embedding file (safetensors, or a ``.pt`` / ``.bin`` read with
    ``weights_only=True``: no code in it runs)."""
    import torch
    from safetensors.torch import load_file

    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"embedding: {str(path)!r} cannot be read ({_first_line(e)})") from e
    if not isinstance(state, dict):
        raise ValueError(f"embedding: {str(path)!r} holds no embedding (a {type(state).__name__})")
    return state


def load_embedding(pipe, path: str, token: str | None = None) -> dict:
    """Load a textual-inversion embedding into ``pipe``'s tokenizers and text encoders with
    diffusers' ``load_textual_inversion``: SD 1.x/2.x files of diffusers' layout
    (``learned_embeds``: the token is its key) or A1111's (``.pt`` / ``.safetensors``; the token
    defaults to the file's name), SDXL files with ``clip_l`` and ``clip_g`` vectors. A prompt
    that says the token gets all its vectors. Returns its record (file, SHA-256, token)."""
    local = Path(path).expanduser()
    if pipe.family not in ("sd", "sdxl"):
        raise ValueError(
            f"embedding: textual inversions are for Stable Diffusion 1.x/2.x and SDXL; this is "
            f"{pipe.adapter.label}"
        )
    if not local.is_file():
        raise ValueError(f"embedding: no such file: {path!r}")
    state = _embedding_state(local)
    ranker = pipe.ranker
    if ranker is not None and any(
        ranker.tokenizer is t for t in (pipe.tokenizer, pipe.tokenizer_2)
    ):
        import copy  # a built-in ranker shares the tokenizer: it keeps its own vocabulary

        ranker.tokenizer = copy.deepcopy(ranker.tokenizer)
    own = len(state) == 1 and not {"emb_params", "string_to_param", "clip_l"} & set(state)
    token = token or (None if own else local.stem)
    loader = _loader(pipe)
    try:
        if pipe.family == "sdxl":
            if not {"clip_l", "clip_g"} <= set(state):
                raise ValueError("an SDXL embedding holds clip_l and clip_g vectors")
            for key, enc, tok in (
                ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2),
                ("clip_l", pipe.text_encoder, pipe.tokenizer),
            ):
                loader.load_textual_inversion(
                    state[key], token=token, text_encoder=enc, tokenizer=tok
                )
        else:
            loader.load_textual_inversion(state, token=token)  # the file is read once
    except ValueError as e:
        raise ValueError(
            f"embedding: {str(path)!r} is not a textual inversion for {pipe.adapter.label} "
            f"({_first_line(e)})"
        ) from e
    record = dict(file=local.name, sha256=file_sha256(local), token=token or next(iter(state)))
    pipe.embeddings.append(record)
    return record


def expand_prompt(pipe, prompt: str) -> str:
    """``prompt`` with every multi-vector embedding's token spelled as all its tokens
    (diffusers' pipelines do the same before tokenizing)."""
    from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin

    return TextualInversionLoaderMixin._maybe_convert_prompt(None, prompt, pipe.tokenizer)
