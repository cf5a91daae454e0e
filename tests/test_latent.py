import numpy as np
import pytest
import torch
from conftest import gen
from PIL import Image

from blendedit import masks as M
from blendedit.latent import blend

STEPS = 8


def run(pipe, image, mask, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    kw.setdefault("generator", gen(0))
    return pipe("a red circle", image, mask, **kw)


def px(img):
    return np.asarray(img).astype(np.int32)


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++", "euler"])
def test_paste_keeps_every_pixel_outside_the_mask(pipe, image, box_mask, scheduler):
    pipe.set_scheduler(scheduler)
    out = run(pipe, image, box_mask, num_images_per_prompt=2, generator=[gen(0), gen(1)])
    for result in out.images:
        diff = np.abs(px(result) - px(image))
        assert diff[box_mask == 0].max() == 0  # exact: the feather band lies inside the mask
        assert diff[box_mask == 1].mean() > 5  # and the masked region did change


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++", "euler"])
def test_final_latents_outside_the_latent_mask_equal_the_source(pipe, image, box_mask, scheduler):
    pipe.set_scheduler(scheduler)
    out = run(pipe, image, box_mask, background="none")
    z_src = pipe.encode_image(torch.from_numpy(px(image) / 255.0).permute(2, 0, 1)[None].float())
    outside = out.latent_mask == 0
    assert outside.any()
    assert torch.equal(
        out.latents.expand_as(z_src)[outside.expand_as(z_src)], z_src[outside.expand_as(z_src)]
    )
    assert torch.equal(out.source_latents, z_src)
    inside = ~outside.expand_as(z_src)
    assert (out.latents[inside] - z_src[inside]).abs().mean() > 0.05


def test_background_is_noised_to_the_level_of_the_latents_it_is_blended_with(pipe, image, box_mask):
    """After step t -> t_prev the background equals q(z_src, t_prev) with the sample's fixed
    noise, not q(z_src, t) as in the public SD script."""
    seen = []
    out = run(pipe, image, box_mask, shrink_iterations=0, callback=lambda i, t, z: seen.append(z))
    z_src = out.source_latents
    noise = torch.randn(z_src.shape, generator=gen(0))  # the start noise, reused (fixed mode)
    ts = pipe.scheduler.timesteps
    outside = (out.latent_mask == 0).expand_as(z_src)
    for i in range(STEPS - 1):
        same_level = pipe.scheduler.add_noise(z_src, noise, ts[i + 1 : i + 2])
        one_step_off = pipe.scheduler.add_noise(z_src, noise, ts[i : i + 1])
        assert torch.allclose(seen[i][outside], same_level[outside], atol=1e-6)
        assert not torch.allclose(seen[i][outside], one_step_off[outside], atol=1e-3)
    assert torch.equal(seen[-1][outside], z_src[outside])


def test_fresh_background_noise_differs_from_fixed(pipe, image, box_mask):
    a = run(pipe, image, box_mask, background_noise="fixed", background="none")
    b = run(pipe, image, box_mask, background_noise="fresh", background="none")
    assert not torch.equal(a.latents, b.latents)
    assert torch.equal(a.latents * (a.latent_mask == 0), b.latents * (b.latent_mask == 0))


def test_same_seed_same_images_other_seed_other_images(pipe, image, box_mask):
    a, b = run(pipe, image, box_mask), run(pipe, image, box_mask)
    c = run(pipe, image, box_mask, generator=gen(1))
    assert px(a.images[0]).tolist() == px(b.images[0]).tolist()
    assert px(a.images[0]).tolist() != px(c.images[0]).tolist()


def test_sample_i_depends_only_on_generator_i(pipe, image, box_mask):
    pipe.ranker = None  # keep sample order
    batch = run(pipe, image, box_mask, num_images_per_prompt=3, generator=[gen(5), gen(6), gen(7)])
    alone = run(pipe, image, box_mask, generator=[gen(6)])
    assert torch.allclose(batch.latents[1], alone.latents[0], atol=1e-4)  # batched-conv rounding


def test_one_pixel_line_still_edits_with_max_pool(pipe, image):
    line = np.zeros((64, 64), np.float32)
    line[29, 8:56] = 1
    out = run(pipe, image, line, mask_downsample="max")
    diff = np.abs(px(out.images[0]) - px(image))
    assert diff[line == 1].mean() > 5
    assert diff[line == 0].max() == 0
    with pytest.raises(
        ValueError, match="mask: covers no latent cell with mask_downsample='nearest'"
    ):
        run(pipe, image, line, mask_downsample="nearest")


def test_mask_schedule_used_goes_from_most_dilated_to_exact(pipe, image, box_mask):
    seen = []
    out = run(pipe, image, box_mask, shrink_iterations=3, callback=lambda i, t, z: seen.append(i))
    sched = out.mask_schedule
    assert len(sched) == 4 and torch.equal(sched[-1], out.latent_mask)
    sizes = [int(s.sum()) for s in sched]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
    assert seen == list(range(STEPS))
    assert len(run(pipe, image, box_mask, shrink_iterations=0).mask_schedule) == 1


def test_auto_shrinking_follows_the_latent_grid_of_the_edit(pipe, box_mask):
    # the default: 64 px -> 8x8 latents: no dilation; 256 px -> 32x32: one (3x3), then exact
    small = Image.fromarray((np.random.RandomState(1).rand(64, 64, 3) * 255).astype(np.uint8))
    assert len(run(pipe, small, box_mask, num_inference_steps=2).mask_schedule) == 1
    big = small.resize((256, 256))
    big_mask = np.kron(box_mask, np.ones((4, 4), np.float32))
    out = run(pipe, big, big_mask, num_inference_steps=2, crop_to_mask=False)
    assert len(out.mask_schedule) == 2
    assert torch.equal(out.mask_schedule[0], M.dilate(out.latent_mask, 3))


def test_strength_runs_that_fraction_of_the_schedule(pipe, image, box_mask):
    seen = []
    run(pipe, image, box_mask, strength=0.5, callback=lambda i, t, z: seen.append(t))
    full = run(pipe, image, box_mask).timings
    assert len(seen) == STEPS // 2 and full["total"] > 0
    pipe.set_scheduler("dpm++")
    seen.clear()
    run(pipe, image, box_mask, strength=0.5, callback=lambda i, t, z: seen.append(t))
    assert len(seen) == STEPS // 2


def test_any_size_comes_back_undistorted(pipe, box_mask):
    rng = np.random.RandomState(1)
    img = Image.fromarray((rng.rand(50, 70, 3) * 255).astype(np.uint8))
    m = np.zeros((50, 70), np.float32)
    m[10:30, 20:50] = 1
    out = run(pipe, img, m, crop_to_mask=False)
    assert out.images[0].size == (70, 50)
    assert np.abs(px(out.images[0]) - px(img))[m == 0].max() == 0


def test_crop_to_mask_edits_only_a_native_size_box(pipe):
    rng = np.random.RandomState(2)
    img = Image.fromarray((rng.rand(256, 256, 3) * 255).astype(np.uint8))
    m = np.zeros((256, 256), np.float32)
    m[180:196, 30:46] = 1
    out = run(pipe, img, m, background="none")  # auto: the image is larger than native 64
    x0, y0, x1, y1 = out.crop_box
    assert (x1 - x0, y1 - y0) == (64, 64) and x0 <= 30 and x1 >= 46 and y0 <= 180 and y1 >= 196
    assert out.latents.shape[-2:] == (8, 8)
    res = px(out.images[0])
    outside_box = np.ones((256, 256), bool)
    outside_box[y0:y1, x0:x1] = False
    assert np.abs(res - px(img))[outside_box].max() == 0
    assert np.abs(res - px(img))[m == 1].mean() > 5
    full = run(pipe, img, m, crop_to_mask=False)
    assert full.crop_box == (0, 0, 256, 256) and full.latents.shape[-2:] == (32, 32)


def test_zoom_edits_the_box_around_the_mask_magnified_to_native_size(pipe):
    """crop_to_mask="zoom" (diffusers' padding_mask_crop): a 16 px mask with context 0.5 is
    a 32 px box, edited at 64 px (2x): the mask covers 4x4 latent cells instead of 2x2."""
    rng = np.random.RandomState(2)
    img = Image.fromarray((rng.rand(256, 256, 3) * 255).astype(np.uint8))
    m = np.zeros((256, 256), np.float32)
    m[180:196, 32:48] = 1
    out = run(pipe, img, m, crop_to_mask="zoom")
    assert out.zoomed and out.crop_box == (24, 172, 56, 204)
    assert out.latents.shape[-2:] == (8, 8) and int(out.latent_mask.sum()) == 16
    assert int(run(pipe, img, m, crop_to_mask=True).latent_mask.sum()) == 4
    diff = np.abs(px(out.images[0]) - px(img))
    assert diff[m == 0].max() == 0 and diff[m == 1].mean() > 5  # paste: every pixel kept
    # the raw decode, resized back, fills the box; outside the box the source
    raw = run(pipe, img, m, crop_to_mask="zoom", background="none")
    diff = np.abs(px(raw.images[0]) - px(img))
    in_box = np.zeros((256, 256), bool)
    in_box[172:204, 24:56] = True
    assert diff[~in_box].max() == 0 and diff[in_box & (m == 0)].mean() > 1
    # redoing the background of the zoomed edit is the zoomed edit's own paste
    again = pipe.reconstruct_background(raw, img, background="paste")
    assert px(again.images[0]).tolist() == px(out.images[0]).tolist()


def test_ranking_orders_best_first_and_keeps_images_with_their_scores(pipe, image, box_mask):
    gens = lambda: [gen(s) for s in (3, 4, 5, 6)]  # noqa: E731
    ranker, pipe.ranker = pipe.ranker, None
    plain = run(pipe, image, box_mask, num_images_per_prompt=4, generator=gens())
    assert plain.scores is None and plain.order == [0, 1, 2, 3]
    pipe.ranker = ranker
    ranked = run(pipe, image, box_mask, num_images_per_prompt=4, generator=gens())
    assert ranked.scores == sorted(ranked.scores, reverse=True)
    assert sorted(ranked.order) == [0, 1, 2, 3]
    for img, k in zip(ranked.images, ranked.order):
        assert px(img).tolist() == px(plain.images[k]).tolist()
    direct = ranker.score(
        torch.stack(
            [torch.from_numpy(px(i) / 255.0).permute(2, 0, 1).float() for i in plain.images]
        ),
        "a red circle",
        torch.from_numpy(box_mask)[None, None],
    )
    assert ranked.scores == pytest.approx([float(direct[k]) for k in ranked.order], abs=1e-5)


@pytest.mark.parametrize("region", ["crop", "masked", "full"])
def test_rank_regions_score_different_pixels(pipe, image, box_mask, region):
    x = torch.rand(2, 3, 64, 64, generator=gen(0))
    m = torch.from_numpy(box_mask)[None, None]
    s = pipe.ranker.score(x, "a red circle", m, region)
    y = x.clone()
    y[..., m[0, 0] == 0] = torch.rand_like(y[..., m[0, 0] == 0])  # change only the background
    s2 = pipe.ranker.score(y, "a red circle", m, region)
    if region == "masked":
        assert torch.allclose(s, s2)
    else:
        assert not torch.allclose(s, s2)


def test_long_prompt_is_truncated_with_a_warning(pipe, image, box_mask):
    out = pipe("red " * 100, image, box_mask, num_inference_steps=2, generator=gen(0))
    assert any("truncated" in w for w in out.warnings)
    assert run(pipe, image, box_mask).warnings == []


def test_tokenizer_gives_distinct_ids_for_distinct_prompts(pipe):
    ids = {
        p: tuple(pipe.tokenizer(p).input_ids)
        for p in [
            "a red circle",
            "a blue circle",
            "a red star",
            "an orange cross",
            "a purple square",
        ]
    }
    assert len(set(ids.values())) == len(ids)
    assert all(len(v) == 5 for k, v in ids.items() if k.startswith("a "))
    assert len(set(pipe.tokenizer("zebra quokka").input_ids)) > 3  # unknown words still tokenize


def test_blend_is_the_masked_mix():
    z, bg = torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    m = torch.tensor([[[[1.0, 0.0], [0.5, 0.0]]]])
    assert blend(z, bg, m)[0, 0].tolist() == [[1.0, 0.0], [0.5, 0.0]]


BAD = [
    ("num_inference_steps", 0),
    ("num_inference_steps", 2.5),
    ("num_inference_steps", True),
    ("guidance_scale", float("nan")),
    ("guidance_scale", -1.0),
    ("strength", 0.0),
    ("strength", 1.5),
    ("num_images_per_prompt", 0),
    ("mask_downsample", "mean"),
    ("shrink_iterations", -1),
    ("shrink_iterations", "often"),
    ("background", "blur"),
    ("background_noise", "pink"),
    ("crop_to_mask", "yes"),
    ("rank_region", "face"),
    ("feather", -2),
    ("generator", 42),
    ("negative_prompt", 3),
    ("callback", "print"),
    ("crop_context", float("inf")),
]


@pytest.mark.parametrize("name, value", BAD)
def test_bad_arguments_raise_value_error_naming_the_argument(pipe, image, box_mask, name, value):
    with pytest.raises(ValueError, match=f"^{name}: "):
        pipe("a red circle", image, box_mask, **{"num_inference_steps": 2, name: value})


def test_bad_prompt_image_and_mask_are_named(pipe, image, box_mask):
    with pytest.raises(ValueError, match="^prompt: "):
        pipe(None, image, box_mask)
    with pytest.raises(ValueError, match="^image: "):
        pipe("a", "/no/such/file.png", box_mask)
    with pytest.raises(ValueError, match="^mask: the mask is empty"):
        pipe("a", image, np.zeros((64, 64), np.float32))
    with pytest.raises(ValueError, match="^mask: size 32x64 differs"):
        pipe("a", image, np.ones((64, 32), np.float32))
    with pytest.raises(ValueError, match="^mask: size 32x64 differs"):
        pipe("a", image, torch.ones(64, 32))
    with pytest.raises(ValueError, match="^generator: a list must hold num_images_per_prompt=2"):
        pipe("a", image, box_mask, num_images_per_prompt=2, generator=[gen(0)])
    with pytest.raises(ValueError, match="^strength: 0.05 x num_inference_steps 10 runs no step"):
        pipe("a", image, box_mask, num_inference_steps=10, strength=0.05)


def test_masks_module_is_what_the_pipeline_uses(pipe, image, box_mask):
    out = run(pipe, image, box_mask, shrink_iterations=2)
    m = torch.from_numpy(box_mask)[None, None]
    exact = M.downsample_mask(m, 8, "max")
    assert torch.equal(out.latent_mask, exact)
    assert [torch.equal(a, b) for a, b in zip(out.mask_schedule, M.shrink_schedule(exact, 2))] == [
        True,
        True,
        True,
    ]


def test_bfloat16_weights_run_and_keep_the_background(tiny_components, image, box_mask):
    import copy

    c = {
        k: copy.deepcopy(v)
        for k, v in tiny_components.items()
        if k in ("unet", "vae", "text_encoder")
    }
    from blendedit import BlendedLatentDiffusionPipeline

    p = BlendedLatentDiffusionPipeline(
        c["unet"],
        c["vae"],
        c["text_encoder"],
        tiny_components["tokenizer"],
        tiny_components["scheduler"],
    )
    p.to("cpu", torch.bfloat16)
    assert p.dtype == torch.bfloat16
    out = run(p, image, box_mask)
    assert np.abs(px(out.images[0]) - px(image))[box_mask == 0].max() == 0
    assert torch.isfinite(out.latents.float()).all()


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++", "euler"])
def test_v_prediction_models_blend_the_same_way(pipe, image, box_mask, scheduler):
    """SD 2.x-style v-prediction: the scheduler converts the output; the blend is unchanged."""
    from diffusers import DDIMScheduler

    from blendedit.tiny import SD_SCHEDULER

    pipe.scheduler = DDIMScheduler(**SD_SCHEDULER, prediction_type="v_prediction")
    pipe.set_scheduler(scheduler)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    out = run(pipe, image, box_mask, background="none")
    eps_out = run(
        pipe.__class__(
            pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, DDIMScheduler(**SD_SCHEDULER)
        ),
        image,
        box_mask,
        background="none",
    )
    outside = (out.latent_mask == 0).expand_as(out.latents)
    assert torch.equal(out.latents[outside], out.source_latents.expand_as(out.latents)[outside])
    assert not torch.allclose(out.latents, eps_out.latents)  # the prediction type is honoured


def test_the_unet_is_channels_last_on_the_cpu_and_edits_as_in_the_default_layout(
    tiny_components, image, box_mask, monkeypatch
):
    """On the CPU the pipeline keeps its UNet's and VAE's weights channels-last (faster
    convolutions); the edit is the one the default layout gives, up to float rounding; another
    device gets the default layout back."""
    import copy

    from blendedit import BlendedLatentDiffusionPipeline

    c = tiny_components
    parts = [c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler"]]

    def build(unet):
        vae = copy.deepcopy(c["vae"]).to(memory_format=torch.contiguous_format)
        return BlendedLatentDiffusionPipeline(copy.deepcopy(unet), vae, *parts[1:])

    def channels_last(p):
        convs = (p.unet.conv_in, p.vae.encoder.conv_in, p.vae.decoder.conv_out)
        layouts = {w.weight.is_contiguous(memory_format=torch.channels_last) for w in convs}
        assert len(layouts) == 1  # all or none
        return layouts.pop()

    fast = build(c["unet"])
    assert channels_last(fast)
    monkeypatch.setattr(BlendedLatentDiffusionPipeline, "_layout", lambda self: None)
    plain = build(copy.deepcopy(c["unet"]).to(memory_format=torch.contiguous_format))
    assert not channels_last(plain) and plain.unet.conv_in.weight.is_contiguous()
    a, b = (run(p, image, box_mask, background="none") for p in (fast, plain))
    assert torch.allclose(a.latents, b.latents, atol=1e-4)
    assert np.abs(px(a.images[0]) - px(b.images[0])).max() <= 1
    monkeypatch.undo()
    fast.unet.to("meta")  # not the CPU: the layout as loaded
    fast.vae.to("meta")
    fast._layout()
    assert not channels_last(fast) and fast.unet.conv_in.weight.is_contiguous()
