"""Random LoRA files for a pipeline's own modules, for tests and benchmarks (issue 41): made
with peft on the denoiser's attention projections (and, for SD and SDXL, the CLIP text
encoders'), saved with diffusers' ``save_lora_weights`` in its layout, or renamed into the
A1111 / kohya-ss layout that LoRA sites distribute. Their effect is noise, as the tiny models'."""

from __future__ import annotations

from pathlib import Path

import torch

DENOISER_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
#: the diffusers pipeline whose save_lora_weights writes each family's layout, and the
#: keyword of each component's layers
SAVERS = {
    "sd": ("StableDiffusionPipeline", "unet", ("text_encoder",)),
    "sdxl": ("StableDiffusionXLPipeline", "unet", ("text_encoder", "text_encoder_2")),
    "sd3": ("StableDiffusion3Pipeline", "transformer", ()),
    "flux": ("FluxPipeline", "transformer", ()),
}


def save_random_lora(
    pipe, folder: str | Path, *, seed: int = 0, rank: int = 4, text: bool = True, std=0.2
) -> Path:
    """A LoRA of ``rank`` with random A and B (normal, ``std``) for ``pipe``'s denoiser (and its
    text encoders with ``text``, SD and SDXL), in diffusers' layout; returns the file. ``pipe``
    itself is left as it was (the layers are made on copies)."""
    import copy

    import diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    cls, denoiser_key, text_keys = SAVERS[pipe.family]
    g = torch.Generator().manual_seed(seed)
    layers = {}
    parts = [(denoiser_key, pipe.unet, DENOISER_TARGETS)]
    parts += [(k, getattr(pipe, k), TEXT_TARGETS) for k in text_keys if text]
    for key, module, targets in parts:
        module = copy.deepcopy(module)
        cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets)
        inject_adapter_in_model(cfg, module)
        state = get_peft_model_state_dict(module)
        for v in state.values():
            v.copy_(torch.randn(v.shape, generator=g) * std)
        layers[f"{key}_lora_layers"] = state
    folder = Path(folder)
    getattr(diffusers, cls).save_lora_weights(folder, safe_serialization=True, **layers)
    return folder / "pytorch_lora_weights.safetensors"


def to_kohya(diffusers_file: str | Path, out: str | Path) -> Path:
    """The same LoRA in the A1111 / kohya-ss layout of SD 1.x files: ``lora_unet_<module>`` and
    ``lora_te_text_model_<module>`` names with ``_`` for ``.``, ``lora_down`` / ``lora_up``
    weights and an ``alpha`` per module (= the rank: scale 1)."""
    from safetensors.torch import load_file, save_file

    tensors = {}
    for key, v in load_file(str(diffusers_file)).items():
        part, rest = key.split(".", 1)
        module, ab = rest.rsplit(".lora_", 1)
        if part == "unet":
            name = "lora_unet_" + module.replace(".", "_")
        elif part == "text_encoder":
            module = module if module.startswith("text_model.") else "text_model." + module
            name = "lora_te_" + module.replace(".", "_")
        else:
            raise ValueError(f"to_kohya: SD 1.x LoRAs only, got a {part!r} key")
        tensors[f"{name}.lora_{'down' if ab.startswith('A') else 'up'}.weight"] = v.contiguous()
        if ab.startswith("A"):
            tensors[f"{name}.alpha"] = torch.tensor(float(v.shape[0]))
    save_file(tensors, str(out))
    return Path(out)
