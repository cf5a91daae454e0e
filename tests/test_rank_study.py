"""Issue 42's ranking study (benchmarks/rank_study.py): the pixel features it adds to CLIP see
what they claim to, and its preference head learns a preference that is there."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from rank_study import PreferenceHead, pixel_features  # noqa: E402


def _frame(obj=None, size=32):
    """A grey frame with an optional red square at ``obj`` = (y0, y1, x0, x1)."""
    x = torch.full((1, 3, size, size), 0.5)
    if obj is not None:
        y0, y1, x0, x1 = obj
        x[:, :, y0:y1, x0:x1] = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    return x


def test_pixel_features_see_a_cut_object_the_change_and_the_seam():
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    src = _frame()
    whole = _frame((12, 20, 12, 20))  # inside, clear of the edge
    cut = _frame((8, 16, 8, 24))  # its side lies along the mask's edge
    f = pixel_features(torch.cat([src, whole, cut]), src, mask)
    assert f[0].abs().max() == 0  # nothing changed: no edge change, no change, no seam
    assert f[1, 0] == 0 and f[2, 0] > 0.3  # only the cut object touches the edge band
    assert f[2, 1] > f[1, 1] > 0  # the share of the mask changed
    assert f[1, 2] == 0 and f[2, 2] > 0  # a step across the border the source does not have


def test_head_learns_a_separable_preference_deterministically():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(400, 6, generator=g)
    y = feats[:, 2] - 0.5 * feats[:, 4] > 0
    head = PreferenceHead(6).fit(feats, y)
    assert ((head(feats) > 0) == y).float().mean() > 0.95
    assert torch.equal(PreferenceHead(6).fit(feats, y)(feats), head(feats))
    mlp = PreferenceHead(6, hidden=16).fit(feats, y)
    assert ((mlp(feats) > 0) == y).float().mean() > 0.95
