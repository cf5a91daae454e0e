"""Blended Diffusion (the pixel method) on a tiny random pixel model and tiny CLIP."""

import numpy as np
import pytest
import torch
from conftest import gen

from blendedit import BlendedDiffusionPipeline
from blendedit import guidance as G
from blendedit.demo import example_scene

FAST = dict(num_inference_steps=10, skip_timesteps=3)


@pytest.fixture(scope="module")
def pixel_pipe():
    return BlendedDiffusionPipeline.from_pretrained("tiny-random")


@pytest.fixture
def scene():
    return example_scene(32)


def outside_max_error(out, image, mask) -> int:
    keep = np.asarray(mask) == 0
    src = np.asarray(image).astype(int)
    return max(int(np.abs(np.asarray(im).astype(int) - src)[keep].max()) for im in out.images)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_algorithm_2_keeps_every_pixel_outside_the_mask(pixel_pipe, scene, sampler):
    image, mask = scene
    out = pixel_pipe(
        "a red circle",
        image,
        mask,
        sampler=sampler,
        num_images_per_prompt=2,
        generator=gen(0),
        **FAST,
    )
    assert len(out.images) == 2 and outside_max_error(out, image, mask) == 0
    assert out.scores == sorted(out.scores, reverse=True)
    inside = np.asarray(mask) > 0
    assert np.abs(np.asarray(out.images[0]).astype(int) - np.asarray(image))[inside].mean() > 5


def test_recurrence_runs_each_step_again_from_its_result_noised_back(pixel_pipe, scene):
    image, mask = scene
    calls = []
    real = pixel_pipe.model_step_terms

    def counted(x, t, s):
        calls.append((t, s))
        return real(x, t, s)

    pixel_pipe.model_step_terms = counted
    try:
        once = pixel_pipe("a red circle", image, mask, generator=gen(0), **FAST)
        n_once, calls[:] = len(calls), []
        twice = pixel_pipe("a red circle", image, mask, generator=gen(0), recurrence=2, **FAST)
    finally:
        del pixel_pipe.model_step_terms
    assert n_once == FAST["num_inference_steps"] - FAST["skip_timesteps"]
    assert calls[0::2] == calls[1::2] and len(calls) == 2 * n_once  # each (t, s) twice in a row
    assert outside_max_error(twice, image, mask) == 0  # Algorithm 2 still blends every run
    assert np.asarray(twice.images[0]).tobytes() != np.asarray(once.images[0]).tobytes()
    # x_s noised back to t has the variance of x_t: ᾱ_t / ᾱ_s of x_s's plus the noise's rest
    x_s = torch.randn(20000)
    t, s = 600, 300
    x_t = pixel_pipe.renoise(x_s * 0 + 1, s, t, x_s)
    a = float(pixel_pipe.alphas_cumprod[t] / pixel_pipe.alphas_cumprod[s])
    assert abs(float(x_t.mean()) - a**0.5) < 0.03 and abs(float(x_t.var()) - (1 - a)) < 0.03


def test_an_image_larger_than_the_model_is_edited_in_a_box_around_the_mask(pixel_pipe):
    image, mask = example_scene(96)  # the model is 32 px: the box is resized to it and back
    out = pixel_pipe("a red circle", image, mask, generator=gen(0), **FAST)
    assert out.images[0].size == (96, 96) and outside_max_error(out, image, mask) == 0


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_one_guided_step_lowers_the_clip_loss_it_guides_on(pixel_pipe, scene, sampler):
    p = pixel_pipe
    image, mask = scene
    x_src = torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    m = torch.from_numpy((np.asarray(mask) > 0).astype(np.float32))[None, None]
    ts = p.timesteps(10)
    # DDIM: the last step (x_s is the guided estimate of the clean image); DDPM: the one before
    # (the last has posterior variance 0, so no mean shift), with the same noise both ways
    t, s = (ts[-1], -1) if sampler == "ddim" else (ts[-2], ts[-1])
    x_t = p.q_sample(x_src, t, torch.randn(x_src.shape, generator=gen(1)))
    text = p.clip.embed_text("a red circle").float()
    H = G.random_homographies(8, gen(2))
    opts = dict(
        clip_guidance_scale=1000.0,
        range_scale=50.0,
        mix_xt=False,
        algorithm=2,
        background_mse_scale=0.0,
        distance="spherical",
        augmentation_batch_size=8,
    )
    grad, before, (eps, x0, logvar) = p.guidance_grad(x_t, t, s, m, text, opts, H, x_src)
    guided = p._step(x_t, t, s, eps, x0, logvar, grad, sampler, gen(7), "cpu")
    plain = p._step(x_t, t, s, eps, x0, logvar, None, sampler, gen(7), "cpu")

    def loss(x):
        return G.clip_loss_grad(x.clamp(-1, 1), m, text, p.clip.embed_images, H)[0].item()

    assert loss(guided) < loss(plain)


def test_chunked_augmentations_give_the_same_gradient_as_all_at_once(pixel_pipe):
    x0 = torch.rand(2, 3, 32, 32, generator=gen(0)) * 2 - 1
    m = torch.zeros(1, 1, 32, 32)
    m[..., 8:24, 8:24] = 1
    text = pixel_pipe.clip.embed_text("a star").float()
    H = G.random_homographies(8, gen(3))
    l1, g1 = G.clip_loss_grad(x0, m, text, pixel_pipe.clip.embed_images, H, chunk=8)
    l2, g2 = G.clip_loss_grad(x0, m, text, pixel_pipe.clip.embed_images, H, chunk=3)
    assert torch.allclose(l1, l2, atol=1e-5) and torch.allclose(g1, g2, atol=1e-6)
    assert g1.abs().sum() > 0 and (g1[..., :8, :] == 0).all()  # no gradient outside the mask


def test_the_seed_reproduces_and_generators_per_image_match_batches(pixel_pipe, scene):
    image, mask = scene
    a = pixel_pipe("a star", image, mask, generator=gen(5), **FAST)
    b = pixel_pipe("a star", image, mask, generator=gen(5), **FAST)
    c = pixel_pipe("a star", image, mask, generator=gen(6), **FAST)
    same = [np.asarray(i).tobytes() for i in a.images] == [
        np.asarray(i).tobytes() for i in b.images
    ]
    assert same and np.asarray(a.images[0]).tobytes() != np.asarray(c.images[0]).tobytes()
    many = pixel_pipe(
        "a star",
        image,
        mask,
        num_batches=2,
        num_images_per_prompt=2,
        generator=[gen(k) for k in range(4)],
        **FAST,
    )
    assert len(many.images) == 4 and sorted(many.order) == [0, 1, 2, 3]


def test_algorithm_1_background_loss_pulls_the_background_to_the_source(pixel_pipe, scene):
    image, mask = scene
    kw = dict(algorithm=1, enforce_background=False, clip_guidance_scale=0.0, generator=gen(0))
    free = pixel_pipe("a star", image, mask, **kw, **FAST)
    held = pixel_pipe("a star", image, mask, background_mse_scale=2000.0, **kw, **FAST)
    keep = np.asarray(mask) == 0
    src = np.asarray(image).astype(float)

    def err(out):
        return float(((np.asarray(out.images[0]).astype(float) - src) ** 2)[keep].mean())

    assert err(held) < err(free) and err(free) > 0


@pytest.mark.parametrize("kind", ["v_prediction", "learned_sigma"])
def test_other_model_outputs(kind, scene):
    from blendedit.ranking import ClipRanker
    from blendedit.tiny import build_tiny_pixel_components

    c = build_tiny_pixel_components(
        prediction_type="v_prediction" if kind == "v_prediction" else "epsilon",
        learned_sigma=kind == "learned_sigma",
    )
    pipe = BlendedDiffusionPipeline(
        c["unet"], c["scheduler"], ClipRanker(c["clip"], c["clip_tokenizer"])
    )
    assert pipe.learned_sigma == (kind == "learned_sigma")
    image, mask = scene
    out = pipe("a red circle", image, mask, generator=gen(0), **FAST)
    assert outside_max_error(out, image, mask) == 0


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(num_inference_steps=1), "^num_inference_steps: "),
        (dict(skip_timesteps=10), "^skip_timesteps: "),
        (dict(strength=0.0), "^strength: "),
        (dict(clip_guidance_scale=float("nan")), "^clip_guidance_scale: "),
        (dict(num_augmentations=0), "^num_augmentations: "),
        (dict(recurrence=0), "^recurrence: "),
        (dict(algorithm=3), "^algorithm: "),
        (dict(sampler="plms"), "^sampler: "),
        (dict(distance="l2"), "^distance: "),
        (dict(background_lpips_scale=1.0), "^background_lpips_scale: LPIPS needs"),
        (dict(num_batches=2, generator=[gen(0)]), "^generator: a list must hold"),
    ],
)
def test_bad_arguments_are_named(pixel_pipe, scene, kw, match):
    image, mask = scene
    kw = dict(FAST) | kw
    with pytest.raises(ValueError, match=match):
        pixel_pipe("a star", image, mask, **kw)


def test_bad_prompt_image_and_mask_are_named(pixel_pipe, scene):
    image, mask = scene
    with pytest.raises(ValueError, match="^prompt: is empty"):
        pixel_pipe(" ", image, mask)
    with pytest.raises(ValueError, match="^mask: the mask is empty"):
        pixel_pipe("a", image, np.zeros((32, 32), np.float32))
    with pytest.raises(ValueError, match="^image: file not found"):
        pixel_pipe("a", "/no/such.png", mask)


def test_a_pixel_folders_blendedit_json_sets_its_default_clip_guidance(pixel_pipe, scene, tmp_path):
    import json

    from diffusers import DDPMPipeline

    from blendedit import ModelNotFoundError

    folder = tmp_path / "pixel"
    DDPMPipeline(unet=pixel_pipe.unet, scheduler=pixel_pipe.scheduler).save_pretrained(folder)
    defaults = folder / "blendedit.json"
    defaults.write_text(json.dumps({"clip_guidance_scale": 300.0, "measured": "a test"}))
    pipe = BlendedDiffusionPipeline.from_pretrained(str(folder), clip=pixel_pipe.clip)
    assert pipe.default_clip_guidance_scale == 300.0
    image, mask = scene

    def edit(**kw):
        return np.asarray(
            pipe("a red circle", image, mask, generator=gen(0), **FAST, **kw).images[0]
        )

    unset = edit()
    assert np.array_equal(unset, edit(clip_guidance_scale=300.0))  # unset is the folder's 300
    assert not np.array_equal(unset, edit(clip_guidance_scale=1000.0))
    defaults.unlink()  # no file: the paper's 1000
    pipe = BlendedDiffusionPipeline.from_pretrained(str(folder), clip=pixel_pipe.clip)
    assert pipe.default_clip_guidance_scale == 1000.0
    for bad in ('{"clip_guidance_scale": -1}', '{"guidance_scale": 5}', "not json"):
        defaults.write_text(bad)
        with pytest.raises(ModelNotFoundError, match="blendedit.json is not a blendedit defaults"):
            BlendedDiffusionPipeline.from_pretrained(str(folder), clip=pixel_pipe.clip)
