"""Background reconstruction: paste, poisson, decoder fine-tuning (weights and latents), and
reconstructing an earlier edit again without sampling."""

import copy

import numpy as np
import pytest
import torch
from conftest import gen

from blendedit import background as B

FAST = dict(num_inference_steps=3, guidance_scale=1.0)


def outside_mse(out, image, mask) -> float:
    keep = np.asarray(mask) == 0
    a = np.stack([np.asarray(im, dtype=np.float64) for im in out.images])
    return float(((a - np.asarray(image, dtype=np.float64)) ** 2)[:, keep].mean())


def test_decoder_leaves_the_loaded_vae_unchanged_and_its_loss_falls(pipe, image, box_mask):
    before = {k: v.clone() for k, v in pipe.vae.state_dict().items()}
    out = pipe("a red circle", image, box_mask, background="decoder", generator=gen(0), **FAST)
    after = pipe.vae.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in pipe.vae.parameters())
    losses = out.reconstruction.losses
    assert len(losses) == 1 and len(losses[0]) == 76  # before each of 75 steps, and after
    assert losses[0][-1] < 0.9 * losses[0][0]  # a random tiny VAE: a real one falls further
    assert sum(b < a for a, b in zip(losses[0], losses[0][1:])) > 0.9 * 75  # nearly monotone


@pytest.mark.parametrize("mode", ["weights", "latents"])
def test_decoder_brings_the_background_closer_than_the_raw_decode(pipe, image, box_mask, mode):
    raw = pipe("a red circle", image, box_mask, background="none", generator=gen(1), **FAST)
    tuned = pipe(
        "a red circle",
        image,
        box_mask,
        background="decoder",
        decoder_mode=mode,
        decoder_layers="all",  # the latents mode optimizes z through the whole decoder
        decoder_lr=1e-3 if mode == "weights" else 5e-2,
        generator=gen(1),
        **FAST,
    )
    mask = (box_mask * 255).astype(np.uint8)
    # a random tiny decoder cannot represent the image well: weights gain more than latents
    gain = 0.6 if mode == "weights" else 0.95
    assert outside_mse(tuned, image, mask) < gain * outside_mse(raw, image, mask)
    assert torch.equal(raw.latents, tuned.latents)  # only the decoding differs


def test_decoder_layers_split_the_decoder_exactly_and_tune_only_their_part(pipe, image, box_mask):
    def kw():
        return dict(background="decoder", generator=gen(2), **FAST)

    untuned = [
        pipe(
            "a",
            image,
            box_mask,
            decoder_steps=0,
            decoder_layers=layers,
            decoder_crop_margin=-1,
            **kw(),
        ).images[0]
        for layers in B.DECODER_LAYERS
    ]
    # frozen prefix + tuned part = the whole decoder: with no step, all three decode alike
    a = [np.asarray(im, dtype=int) for im in untuned]
    assert all(np.array_equal(x, a[0]) for x in a[1:])
    raw = pipe("a", image, box_mask, background="none", generator=gen(2), **FAST)
    mask = (box_mask * 255).astype(np.uint8)
    before = {k: v.clone() for k, v in pipe.vae.state_dict().items()}
    for layers in ("last", "head"):
        out = pipe("a", image, box_mask, decoder_layers=layers, decoder_lr=1e-2, **kw())
        losses = out.reconstruction.losses[0]
        assert losses[-1] < 0.9 * losses[0], layers
        assert outside_mse(out, image, mask) < 0.9 * outside_mse(raw, image, mask)
    assert all(torch.equal(before[k], v) for k, v in pipe.vae.state_dict().items())
    with pytest.raises(ValueError, match="decoder_layers: the latents mode"):
        pipe("a", image, box_mask, decoder_mode="latents", decoder_layers="head", **kw())


def test_decoder_on_a_crop_leaves_pixels_outside_the_crop_as_the_source(pipe, image):
    m = np.zeros((64, 64), np.float32)
    m[8:16, 8:16] = 1  # one latent cell; with margin 1 the crop is 3x3 cells = 24 px
    out = pipe(
        "a",
        image,
        m,
        background="decoder",
        decoder_crop_margin=1,
        decoder_steps=5,
        generator=gen(0),
        **FAST,
    )
    assert out.reconstruction.latent_box == (0, 0, 3, 3)
    a, src = np.asarray(out.images[0]), np.asarray(image)
    assert np.array_equal(a[24:, :], src[24:, :]) and np.array_equal(a[:, 24:], src[:, 24:])


@pytest.mark.parametrize("layers", ["last", "head"])
def test_decoder_on_a_crop_decodes_the_mask_as_the_whole_frame_does(pipe, image, layers):
    m = np.zeros((64, 64), np.float32)
    m[24:32, 24:32] = 1  # latent cell (3, 3); the default margin 1: a 3x3-cell crop
    raw = pipe("a", image, m, background="none", generator=gen(3), **FAST)
    out = pipe(
        "a",
        image,
        m,
        background="decoder",
        decoder_layers=layers,
        decoder_steps=0,
        generator=gen(3),
        **FAST,
    )
    assert out.reconstruction.latent_box == (2, 2, 5, 5)
    inside = m > 0
    a = np.asarray(out.images[0], dtype=int)[inside]
    b = np.asarray(raw.images[0], dtype=int)[inside]
    # the layers before the tuned ones run on the whole frame, and the tuned ones normalize by
    # the whole frame's statistics: before any step, the crop is the frame's decode
    assert np.abs(a - b).max() <= 1
    # a GroupNorm over the crop alone would not be (the check that the test can fail)
    prefix, head, up = B._split_decoder(pipe.vae, layers)
    z = prefix(raw.latents[:1] / pipe.vae.config.scaling_factor)
    crop = z[..., 2 * up : 5 * up, 2 * up : 5 * up]
    with torch.no_grad():
        own = head(crop)
        fixed = B.fix_group_norms(copy.deepcopy(head), z)(crop)
        whole = head(z)[..., 16:40, 16:40]
    inner = (slice(None), slice(None), slice(8, 16), slice(8, 16))  # the mask in the crop
    assert torch.allclose(fixed[inner], whole[inner], atol=1e-4)
    assert not torch.allclose(own[inner], whole[inner], atol=1e-2)


def test_poisson_keeps_the_outside_and_clones_gradients():
    rng = np.random.RandomState(0)
    source = torch.from_numpy(rng.rand(1, 3, 40, 48)).float() * 0.6 + 0.2
    mask = torch.zeros(1, 1, 40, 48)
    mask[..., 10:30, 12:40] = 1
    # an edit whose gradients are the source's (a constant shift): cloning gives the source
    shifted = (source + 0.15).expand(2, -1, -1, -1)
    out = B.poisson(shifted, source, mask)
    assert torch.equal(
        out[:, :, mask[0, 0] == 0], source.expand(2, -1, -1, -1)[:, :, mask[0, 0] == 0]
    )
    assert (out - source).abs().max() < 1e-4
    # a texture keeps its Laplacian inside the region (the values stay inside [0, 1] here)
    texture = torch.from_numpy(rng.rand(1, 3, 40, 48)).float() * 0.2 + 0.4
    cloned = B.poisson(texture, source, mask)

    def laplacian(x):
        c = x[..., 1:-1, 1:-1]
        return 4 * c - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]

    inside = (..., slice(9, 29), slice(11, 39))  # pixels 10..29 x 12..39 in Laplacian indices
    assert (laplacian(cloned)[inside] - laplacian(texture)[inside]).abs().max() < 1e-4
    assert not torch.allclose(cloned, texture.expand_as(cloned), atol=1e-2)  # it moved to fit


def test_poisson_edit_through_the_pipeline_keeps_pixels_outside(pipe, image, box_mask):
    out = pipe("a", image, box_mask, background="poisson", generator=gen(0), **FAST)
    keep = box_mask == 0
    assert np.array_equal(np.asarray(out.images[0])[keep], np.asarray(image)[keep])


def test_reconstruct_again_without_sampling_equals_a_direct_edit(pipe, image, box_mask):
    pasted = pipe("a", image, box_mask, num_images_per_prompt=2, generator=[gen(3), gen(4)], **FAST)
    direct = pipe(
        "a",
        image,
        box_mask,
        num_images_per_prompt=2,
        generator=[gen(3), gen(4)],
        background="decoder",
        decoder_steps=10,
        **FAST,
    )
    again = pipe.reconstruct_background(pasted, image, "a", background="decoder", decoder_steps=10)
    by_sample = {s: np.asarray(im) for s, im in zip(direct.order, direct.images)}
    for s, im in zip(again.order, again.images):
        assert np.array_equal(np.asarray(im), by_sample[s])
    with pytest.raises(ValueError, match="not background options: strength"):
        pipe.reconstruct_background(pasted, image, strength=0.5)
    with pytest.raises(ValueError, match="^image: size 32x32 differs"):
        pipe.reconstruct_background(pasted, image.resize((32, 32)))
