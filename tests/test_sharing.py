"""Work shared between denoiser calls (blendedit.sharing): cross-attention keys and values once
per edit, the guidance rows' first layers once per step, a transformer's per-edit inputs
embedded once per edit."""

import copy
import pickle

import numpy as np
import pytest
import torch
from conftest import gen
from diffusers.models.attention_processor import AttnProcessor2_0

from blendedit import BlendedLatentDiffusionPipeline, sharing
from blendedit.tiny import (
    build_tiny_flux_components,
    build_tiny_inpaint_components,
    build_tiny_sd3_components,
    save_tiny_flux,
    save_tiny_inpaint,
    save_tiny_sd3,
    save_tiny_sdxl,
    save_tiny_sdxl_refiner,
)

STEPS = 4


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """The tiny SD components as built (the session's shared ones may carry the sharing
    already, given by the pipelines other tests built over them)."""
    from blendedit.tiny import build_tiny_components

    return build_tiny_components("tiny", seed=0, tokenizer_dir=tmp_path_factory.mktemp("tok"))


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
    kind, fresh, image, box_mask, monkeypatch
):
    """Each cross-attention module projects the text once per edit (diffusers' processor: at
    every step), and the edit is the one without any sharing, up to float rounding (the
    guidance rows' first layers run as a batch of one)."""
    if kind == "sd":
        c = fresh
        parts = [c["unet"], c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler"]]
    else:  # a 9-channel inpainting UNet: the same, its conditioning beside the latents
        c = build_tiny_inpaint_components("sd")["components"]
        parts = [c[k] for k in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")]
    ours = BlendedLatentDiffusionPipeline(copy.deepcopy(parts[0]), *parts[1:])
    with monkeypatch.context() as m:
        m.setattr(sharing, "install", lambda model: 0)
        plain = BlendedLatentDiffusionPipeline(copy.deepcopy(parts[0]), *parts[1:])
    modules = cross_modules(ours.unet)
    assert modules and sharing.install(ours.unet) == len(modules)  # idempotent
    assert all(type(m.processor.fallback) is AttnProcessor2_0 for m in modules)
    assert all(type(m.processor) is AttnProcessor2_0 for m in cross_modules(plain.unet))
    ours_calls, plain_calls = count_projections(ours.unet), count_projections(plain.unet)
    a, b = (edit(p, image, box_mask, background="none") for p in (ours, plain))
    assert len(ours_calls) == 2 * len(modules)  # K and V, once
    assert len(plain_calls) == 2 * len(modules) * STEPS
    assert torch.allclose(a.latents, b.latents, atol=1e-4)
    assert np.abs(px(a.images[0]) - px(b.images[0])).max() <= 1
    # a second edit with other text projects afresh (the cache lives for one loop)
    again = ours("a blue square", image, box_mask, num_inference_steps=STEPS, generator=gen(0))
    assert len(ours_calls) == 4 * len(modules)
    assert not torch.allclose(again.latents, a.latents, atol=1e-2)


def px(img):
    return np.asarray(img).astype(np.int32)


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


def test_outside_an_edit_the_replaced_processor_runs(fresh):
    """A call outside :func:`edit_cache` (or with an attention mask) projects
    every time, as diffusers' processor, and gives its output."""
    unet = copy.deepcopy(fresh["unet"])
    plain = copy.deepcopy(unet)
    assert not sharing.twin_layers(plain)[0]._forward_hooks  # as diffusers builds it
    sharing.install(unet)
    calls = count_projections(unet)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor(10)
    states = torch.randn(2, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        want = plain(x, t, encoder_hidden_states=states).sample
        for _ in range(2):
            assert torch.equal(unet(x, t, encoder_hidden_states=states).sample, want)
        assert len(calls) == 2 * 2 * len(cross_modules(unet))
        with sharing.edit_cache():
            for _ in range(2):
                assert torch.equal(unet(x, t, encoder_hidden_states=states).sample, want)
            assert len(calls) == 2 * 3 * len(cross_modules(unet))  # one projection more
            other = torch.randn_like(states)  # other states: projected afresh
            got = unet(x, t, encoder_hidden_states=other).sample
            assert torch.equal(got, plain(x, t, encoder_hidden_states=other).sample)
            assert len(calls) == 2 * 4 * len(cross_modules(unet))


@pytest.mark.parametrize("build", [build_tiny_sd3_components, build_tiny_flux_components])
def test_transformers_keep_their_processors_weights_and_names(build):
    """SD3's and Flux's joint attention mixes text and image tokens in every block: no
    processor is replaced. The modules that embed per-edit inputs keep their class's name,
    their weights' names, and copy, pickle and compute as before."""
    model = build()["transformer"]
    plain = copy.deepcopy(model)
    before = [type(m.processor) for m in model.modules() if hasattr(m, "processor")]
    assert sharing.install(model) == 0
    assert before == [type(m.processor) for m in model.modules() if hasattr(m, "processor")]
    assert model.state_dict().keys() == plain.state_dict().keys()
    assert repr(model) == repr(plain)
    states = torch.randn(1, 5, model.config.joint_attention_dim)
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        embed = copied.context_embedder
        assert type(embed) is type(model.context_embedder) is not type(plain.context_embedder)
        with torch.no_grad(), sharing.edit_cache():
            want = plain.context_embedder(states)
            assert torch.equal(embed(states), want) and embed(states) is embed(states)


def per_edit_names(model) -> list[str]:
    names = {id(m): n for n, m in model.named_modules()}
    return sorted(names[id(m)] for m in sharing.per_edit_modules(model))


@pytest.mark.parametrize("kind", ["sd3", "flux", "flux-fill"])
def test_a_transformers_per_edit_inputs_are_embedded_once_per_edit(
    kind, tmp_path, image, box_mask, monkeypatch
):
    """The text's projection, the pooled text's and guidance scale's embeddings and Flux's
    rotary embedding are computed at the first step of an edit and reused after (the same
    output object at every step; diffusers' modules compute them at every step); the edit is
    bit for bit the one without the sharing; the next edit computes them afresh."""
    save = {"sd3": save_tiny_sd3, "flux": save_tiny_flux}.get(kind)
    folder = save(tmp_path / kind) if save else save_tiny_inpaint(tmp_path / kind, "flux")
    ours = BlendedLatentDiffusionPipeline.from_pretrained(str(folder))
    with monkeypatch.context() as m:
        m.setattr(sharing, "install", lambda model: 0)
        plain = BlendedLatentDiffusionPipeline.from_pretrained(str(folder))
    want = ["context_embedder", "time_text_embed.text_embedder"]
    if kind != "sd3":
        want += ["pos_embed", "time_text_embed.guidance_embedder"]
    assert per_edit_names(ours.unet) == sorted(want) == per_edit_names(plain.unet)
    outputs, per_edit = {}, sharing.per_edit_modules(ours.unet)
    for name, module in ours.unet.named_modules():
        if module in per_edit:
            outputs[name] = []
            module.register_forward_hook(lambda m, a, out, k=name: outputs[k].append(out))
    a, b = (edit(p, image, box_mask, guidance_scale=4.0) for p in (ours, plain))
    assert torch.equal(a.latents, b.latents)
    assert np.array_equal(px(a.images[0]), px(b.images[0]))
    for name, outs in outputs.items():
        assert len(outs) == STEPS and all(o is outs[0] for o in outs), name
    first = {name: outs[0] for name, outs in outputs.items()}
    edit(ours, image, box_mask, guidance_scale=4.0)
    for name, outs in outputs.items():
        assert len(outs) == 2 * STEPS and outs[STEPS] is not first[name], name
        assert all(o is outs[STEPS] for o in outs[STEPS:]), name


def test_per_edit_outputs_are_reused_only_for_the_same_inputs_in_a_scope():
    """Outside a scope, or with autograd on, a module computes at every call; inside one a
    call with equal inputs (on the CPU: by value) gets the last output, other inputs a new
    one, equal to what the module computes."""
    model = build_tiny_flux_components()["transformer"]
    sharing.install(model)
    embed = model.context_embedder
    states = torch.randn(1, 5, model.config.joint_attention_dim)
    with torch.no_grad():
        assert embed(states) is not embed(states)
        with sharing.edit_cache():
            out = embed(states)
            assert embed(states.clone()) is out  # equal values
            other = states + 1
            new = embed(other)
            assert new is not out and torch.equal(
                new, torch.nn.functional.linear(other, embed.weight, embed.bias)
            )
            assert embed(other) is new
    with sharing.edit_cache():
        grad = embed(states)
        assert grad.requires_grad and embed(states) is not grad
    # on another device inputs are the same only when they are the same tensor: a comparison
    # by value would wait for the device at every step
    meta = torch.empty(3, device="meta")
    assert sharing._same(meta, meta) and not sharing._same(meta, torch.empty(3, device="meta"))
    assert sharing._same(2.0, 2.0) and not sharing._same(2.0, torch.tensor(2.0))


def test_the_guidance_rows_share_the_layers_before_the_text(fresh):
    """On [z; z] inside twin_rows the layers before the first cross-attention run on one half
    (a batch of N for 2N rows), those after on both, and the output is the unshared one up to
    float rounding; outside the scope every layer sees the whole batch."""
    unet = copy.deepcopy(fresh["unet"])
    plain = copy.deepcopy(unet)
    assert not sharing.twin_layers(plain)[0]._forward_hooks  # as diffusers builds it
    sharing.install(unet)
    shared = sharing.twin_layers(unet)
    first = unet.down_blocks[0]
    assert shared[:2] == [unet.conv_in, first.resnets[0]]
    assert shared[-1] is first.attentions[0].transformer_blocks[0].attn1
    seen = {}
    for name, layer in (
        ("resnet", first.resnets[0].conv1),
        ("self-attention", first.attentions[0].transformer_blocks[0].attn1.to_q),
        ("cross-attention", first.attentions[0].transformer_blocks[0].attn2.to_q),
        ("next block", unet.down_blocks[1].resnets[0].conv1),
    ):
        layer.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, len(a[0])))
    z = torch.randn(2, 4, 8, 8)
    x, t = torch.cat([z, z]), torch.tensor(10)
    states = torch.randn(4, 77, unet.config.cross_attention_dim)  # [uncond; cond] text rows
    with torch.no_grad():
        want = plain(x, t, encoder_hidden_states=states).sample
        with sharing.twin_rows():
            got = unet(x, t, encoder_hidden_states=states).sample
        assert seen == {"resnet": 2, "self-attention": 2, "cross-attention": 4, "next block": 4}
        assert torch.allclose(got, want, atol=1e-5)
        assert not torch.allclose(got[:2], got[2:], atol=1e-3)  # the text still tells them apart
        assert torch.equal(unet(x, t, encoder_hidden_states=states).sample, want)
        assert seen["resnet"] == 4  # outside the scope: the whole batch
        with sharing.twin_rows(), pytest.raises(RuntimeError, match="no two halves"):
            unet(x[:3], t, encoder_hidden_states=states[:3])


def test_sdxl_unets_share_no_rows():
    """An SDXL UNet's time embedding takes the pooled text, different in the two rows: its
    first layers are not shared (its cross-attention keys and values are)."""
    from blendedit.tiny import build_tiny_sdxl_components

    unet = build_tiny_sdxl_components()["unet"]
    assert sharing.twin_layers(unet) == []
    assert sharing.install(unet) == len(cross_modules(unet)) > 0
