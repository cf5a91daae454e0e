"""The Shapes World evaluation's own measures, on stand-in models whose answer is known."""

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from blendedit.toy.evaluate import vae_shapes_kept


class _StandInVAE(torch.nn.Module):
    """encode/decode shaped like AutoencoderKL's; ``blur`` box-filters by it (as a VAE that
    keeps only 1/blur of the resolution)."""

    def __init__(self, blur: int = 1):
        super().__init__()
        self.blur = blur

    def encode(self, x):
        z = F.avg_pool2d(x, self.blur) if self.blur > 1 else x
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
