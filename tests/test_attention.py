"""Cross-attention keys and values projected once per edit (blendedit.attention)."""

import copy

import numpy as np
import pytest
import torch
from conftest import gen
from diffusers.models.attention_processor import AttnProcessor2_0

from blendedit import BlendedLatentDiffusionPipeline, attention
from blendedit.tiny import (
    build_tiny_flux_components,
    build_tiny_inpaint_components,
    build_tiny_sd3_components,
    save_tiny_sdxl,
    save_tiny_sdxl_refiner,
)

STEPS = 4


def cross_modules(unet):
    return [m for m in unet.modules() if getattr(m, "is_cross_attention", False)]


def count_projections(unet) -> list:
    """Append 1 to the returned list at every to_k / to_v call of a cross-attention module."""
    calls = []
    for m in cross_modules(unet):
        for p in (m.to_k, m.to_v):
            p.register_forward_hook(lambda *_: calls.append(1))
    return calls


def default_processors(pipe):
    """``pipe`` with diffusers' default attention processor in every UNet (as it loads)."""
    for u in (pipe.unet, pipe.refiner["unet"] if pipe.refiner else None):
        if u is not None:
            u.set_attn_processor(AttnProcessor2_0())
    return pipe


def edit(pipe, image, mask, **kw):
    return pipe("a red circle", image, mask, num_inference_steps=STEPS, generator=gen(0), **kw)


@pytest.mark.parametrize("kind", ["sd", "sd-inpaint"])
def test_keys_and_values_are_projected_once_per_edit_and_the_edit_is_unchanged(
    kind, tiny_components, image, box_mask
):
    """Each cross-attention module projects the text once per edit (diffusers' processor: at
    every step), and the edit is bit for bit the one diffusers' processor gives."""
    if kind == "sd":
        c = tiny_components
        parts = [c["unet"], c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler"]]
    else:  # a 9-channel inpainting UNet: the same, its conditioning beside the latents
        c = build_tiny_inpaint_components("sd")["components"]
        parts = [c[k] for k in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")]
    ours = BlendedLatentDiffusionPipeline(copy.deepcopy(parts[0]), *parts[1:])
    theirs = default_processors(BlendedLatentDiffusionPipeline(copy.deepcopy(parts[0]), *parts[1:]))
    modules = cross_modules(ours.unet)
    assert modules and attention.install(ours.unet) == len(modules)  # idempotent
    assert all(type(m.processor.fallback) is AttnProcessor2_0 for m in modules)
    ours_calls, theirs_calls = count_projections(ours.unet), count_projections(theirs.unet)
    a, b = (edit(p, image, box_mask, background="none") for p in (ours, theirs))
    assert len(ours_calls) == 2 * len(modules)  # K and V, once
    assert len(theirs_calls) == 2 * len(modules) * STEPS
    assert torch.equal(a.latents, b.latents)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    # a second edit with other text projects afresh (the cache lives for one loop)
    again = ours("a blue square", image, box_mask, num_inference_steps=STEPS, generator=gen(0))
    assert len(ours_calls) == 4 * len(modules)
    assert not torch.equal(again.latents, a.latents)


def test_sdxl_and_its_refiner_cache_each_their_own_keys(tmp_path, image, box_mask):
    """Base and refiner UNets (other text states, other widths) each keep their own keys and
    values, and the edit is the one diffusers' processors give."""
    base, ref = save_tiny_sdxl(tmp_path / "base"), save_tiny_sdxl_refiner(tmp_path / "ref")
    ours, theirs = (
        BlendedLatentDiffusionPipeline.from_pretrained(str(base), refiner=str(ref))
        for _ in range(2)
    )
    default_processors(theirs)
    calls = {
        u: count_projections(p.refiner["unet"] if u == "refiner" else p.unet)
        for u, p in (("base", ours), ("refiner", ours))
    }
    kw = dict(refiner_fraction=0.5, guidance_scale=5.0, background="none")
    a, b = edit(ours, image, box_mask, **kw), edit(theirs, image, box_mask, **kw)
    for name, unet in (("base", ours.unet), ("refiner", ours.refiner["unet"])):
        assert len(calls[name]) == 2 * len(cross_modules(unet)) > 0, name
    assert torch.equal(a.latents, b.latents)


def test_outside_an_edit_the_replaced_processor_runs(tiny_components):
    """A call outside :func:`cross_attention_cache` (or with an attention mask) projects
    every time, as diffusers' processor, and gives its output."""
    unet = copy.deepcopy(tiny_components["unet"])
    plain = copy.deepcopy(unet)
    attention.install(unet)
    calls = count_projections(unet)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor(10)
    states = torch.randn(2, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        want = plain(x, t, encoder_hidden_states=states).sample
        for _ in range(2):
            assert torch.equal(unet(x, t, encoder_hidden_states=states).sample, want)
        assert len(calls) == 2 * 2 * len(cross_modules(unet))
        with attention.cross_attention_cache():
            for _ in range(2):
                assert torch.equal(unet(x, t, encoder_hidden_states=states).sample, want)
            assert len(calls) == 2 * 3 * len(cross_modules(unet))  # one projection more
            other = torch.randn_like(states)  # other states: projected afresh
            got = unet(x, t, encoder_hidden_states=other).sample
            assert torch.equal(got, plain(x, t, encoder_hidden_states=other).sample)
            assert len(calls) == 2 * 4 * len(cross_modules(unet))


@pytest.mark.parametrize("build", [build_tiny_sd3_components, build_tiny_flux_components])
def test_transformers_are_left_as_they_are(build):
    """SD3's and Flux's joint attention mixes text and image tokens in every block: nothing
    to cache, and no processor is replaced."""
    model = build()["transformer"]
    before = [type(m.processor) for m in model.modules() if hasattr(m, "processor")]
    assert attention.install(model) == 0
    assert before == [type(m.processor) for m in model.modules() if hasattr(m, "processor")]
