"""The Shapes World evaluation's own measures, on stand-in models whose answer is known."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from blendedit.toy.evaluate import denoise_shapes_kept, vae_shapes_kept


class _StandInVAE(torch.nn.Module):
    """encode/decode shaped like AutoencoderKL's; ``blur`` box-filters by it (as a VAE that
    keeps only 1/blur of the resolution)."""

    def __init__(self, blur: int = 1):
        super().__init__()
        self.blur = blur
        self.config = SimpleNamespace(scaling_factor=0.5)
        self.last = None  # the latents last encoded (what an oracle denoiser knows)

    def encode(self, x):
        z = F.avg_pool2d(x, self.blur) if self.blur > 1 else x
        self.last = z * self.config.scaling_factor
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: z))

    def decode(self, z):
        x = F.interpolate(z, scale_factor=self.blur, mode="bilinear") if self.blur > 1 else z
        return SimpleNamespace(sample=x)


def test_vae_shapes_kept_is_one_for_an_exact_round_trip_and_drops_with_blur():
    assert vae_shapes_kept(_StandInVAE(), n=30) == 1.0  # every colour x shape read back
    assert vae_shapes_kept(_StandInVAE(blur=8), n=30) < 0.5  # shapes blur into blobs


def test_measured_figures_go_into_the_card_once(tmp_path):
    from blendedit.toy.evaluate import MEASURED, write_measured

    card = tmp_path / "MODEL_CARD.md"
    card.write_text("# Shapes World models\n\nrecipe\n")
    write_measured(card, {"vae_psnr_db": 31.35, "vae_shapes_kept": 0.8133333, "seconds": 40.0})
    write_measured(card, {"vae_psnr_db": 31.4, "t2i_judge_success": 0.5, "seconds": 9.0})
    text = card.read_text()
    assert text.startswith("# Shapes World models\n\nrecipe\n")  # the recipe is kept
    assert text.count(MEASURED) == 1  # the second evaluation replaced the first
    assert "PSNR on 200 held-out scenes (dB): 31.4\n" in text and "31.35" not in text
    assert "judge finds 'a {colour} {shape}'" in text and "0.5" in text
    assert not list(tmp_path.glob("*.tmp"))


def _parts(vae, eps, prediction_type="epsilon"):
    """A pipeline's components around ``vae``, with a UNet that answers ``eps(z_t, t, ab)``."""
    from diffusers import DDPMScheduler

    from blendedit.toy.train import _latent_ddpm

    # the training schedule, answered in epsilon or v (not rescaled: the same noise either way)
    sched = DDPMScheduler.from_config(_latent_ddpm().config, prediction_type=prediction_type)

    def unet(zt, t, encoder_hidden_states):
        assert encoder_hidden_states.shape[0] == zt.shape[0] and int(t.unique()) == int(t[0])
        return SimpleNamespace(sample=eps(zt, int(t[0]), sched.alphas_cumprod))

    tokenizer = lambda texts, **kw: SimpleNamespace(input_ids=torch.zeros(len(texts), 4).long())
    text_encoder = lambda ids: (torch.zeros(len(ids), 4, 8),)
    return dict(vae=vae, unet=unet, scheduler=sched, tokenizer=tokenizer, text_encoder=text_encoder)


@pytest.mark.slow
def test_denoise_shapes_kept_tells_a_denoiser_that_keeps_shapes_from_one_that_does_nothing():
    vae = _StandInVAE()
    # the oracle predicts the very noise that was added: its x0 is the render
    oracle = lambda zt, t, ab: (zt - ab[t].sqrt() * vae.last) / (1 - ab[t]).sqrt()
    denoised, noisy = denoise_shapes_kept(_parts(vae, oracle), t=300, n=12)
    assert denoised == 1.0 and noisy < 0.5  # the noise at step 300 hides the shapes
    idle = lambda zt, t, ab: torch.zeros_like(zt)  # no denoising: x0 is the noisy latent
    assert denoise_shapes_kept(_parts(vae, idle), t=300, n=12) == (noisy, noisy)
    assert denoise_shapes_kept(_parts(vae, idle), t=0, n=12)[1] == 1.0  # step 0: barely noised
    # the same oracle answering in v (a `unet --zero-snr` UNet's prediction)
    v = lambda zt, t, ab: ab[t].sqrt() * oracle(zt, t, ab) - (1 - ab[t]).sqrt() * vae.last
    assert denoise_shapes_kept(_parts(vae, v, "v_prediction"), t=300, n=12) == (1.0, noisy)
    with pytest.raises(ValueError, match="t: a training step from 0 to 999"):
        denoise_shapes_kept(_parts(vae, idle), t=1000, n=12)
