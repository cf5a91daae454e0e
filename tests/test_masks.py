import pytest
import torch

from blendedit import masks as M


def line_mask(h=64, w=64, row=13):
    m = torch.zeros(1, 1, h, w)
    m[..., row, 10:50] = 1
    return m


def test_max_pool_keeps_a_one_pixel_line_nearest_loses_it():
    m = line_mask()
    assert M.downsample_mask(m, 8, "max").sum() == 6  # columns 10..49 touch latent cells 1..6
    assert M.downsample_mask(m, 8, "nearest").sum() == 0


def test_max_pool_marks_every_cell_a_pixel_touches():
    m = line_mask()
    cells = M.downsample_mask(m, 8, "max")[0, 0]
    assert cells[1].tolist() == [0, 1, 1, 1, 1, 1, 1, 0]
    assert cells.sum() == 6


def test_auto_shrinking_is_the_papers_at_64_latents_and_keeps_its_share_of_smaller_grids():
    sides = [16, 24, 32, 48, 63, 64, 96, 128]
    assert [M.auto_shrink_iterations(s, s) for s in sides] == [0, 1, 1, 2, 2, 3, 3, 3]
    assert M.auto_shrink_iterations(64, 16) == 0  # the short side decides
    for s in sides:  # the most dilated mask grows by k cells a side: at most 3/64 of the grid
        assert M.auto_shrink_iterations(s, s) / s <= 3 / 64


def test_shrink_schedule_goes_from_most_dilated_to_exact():
    m = torch.zeros(1, 1, 16, 16)
    m[..., 7:9, 7:9] = 1
    sched = M.shrink_schedule(m, 3)
    assert len(sched) == 4
    sizes = [int(s.sum()) for s in sched]
    assert sizes == [8 * 8, 6 * 6, 4 * 4, 2 * 2]  # 7x7, 5x5, 3x3 dilations of a 2x2 mask, exact
    assert torch.equal(sched[-1], m)
    for big, small in zip(sched, sched[1:]):
        assert torch.all(big >= small)
    assert M.shrink_schedule(m, 0) == [m]
    with pytest.raises(ValueError, match="shrink_iterations"):
        M.shrink_schedule(m, -1)


def test_schedule_index_splits_steps_into_equal_parts():
    idx = [M.schedule_index(i, 8, 4) for i in range(8)]
    assert idx == [0, 0, 1, 1, 2, 2, 3, 3]
    assert M.schedule_index(0, 1, 4) == 0 and M.schedule_index(49, 50, 4) == 3


def test_feather_is_zero_outside_one_inside_and_keeps_thin_lines():
    m = torch.zeros(1, 1, 32, 32)
    m[..., 8:24, 8:24] = 1
    w = M.feather(m, 3)
    assert torch.all(w[m == 0] == 0)
    assert w[0, 0, 16, 16] == 1
    assert w[0, 0, 8, 16] == pytest.approx(1 / 3)
    w_line = M.feather(line_mask(), 3)
    assert torch.all(w_line[line_mask() > 0] > 0)


def test_feather_on_the_box_equals_the_whole_frames_erosions():
    """feather erodes only the mask's box and a 1 px ring: the weights must be those of the
    erosions over the whole frame, for masks touching each border, in corners, soft, several
    islands, across a batch, and empty."""

    def whole_frame(mask, radius):
        binary = (mask > 0).to(mask.dtype)
        depth, current = torch.zeros_like(binary), binary
        for _ in range(radius):
            depth, current = depth + current, M.erode(current, 3)
        return mask * (depth / radius)

    g = torch.Generator().manual_seed(0)
    shapes = [(1, 30, 30), (2, 17, 41), (1, 1, 9), (1, 40, 3)]
    for b, h, w in shapes:
        for trial in range(12):
            m = torch.zeros(b, 1, h, w)
            for _ in range(trial % 4):  # 0 (empty) to 3 rectangles, some at the borders
                y, x = (int(torch.randint(0, n, (1,), generator=g)) for n in (h, w))
                dy, dx = (int(torch.randint(1, n + 1, (1,), generator=g)) for n in (h, w))
                m[trial % b, :, y : y + dy, x : x + dx] = 0.2 + 0.8 * torch.rand(1, generator=g)
            if trial == 5:
                m[..., 0, :] = 1  # a whole border row
            for radius in (1, 3, 8):
                assert torch.equal(M.feather(m, radius), whole_frame(m, radius)), (b, h, w, trial)


def test_crop_box_contains_mask_has_min_side_and_stays_inside():
    box = M.crop_box((1000, 10, 1020, 30), (1024, 768), min_side=256, context=0.5)
    x0, y0, x1, y1 = box
    assert (x1 - x0, y1 - y0) == (256, 256)
    assert 0 <= x0 <= 1000 and x1 >= 1020 and x1 <= 1024 and y0 == 0
    big = M.crop_box((100, 100, 500, 300), (600, 400), min_side=64, context=0.5)
    assert big == (0, 0, 600, 400)  # the box would exceed the image: clipped to it


def test_pad_to_multiple_pads_and_reports_size():
    x = torch.rand(1, 3, 50, 70)
    y, (h, w) = M.pad_to_multiple(x, 8)
    assert y.shape[-2:] == (56, 72) and (h, w) == (50, 70)
    assert torch.equal(y[..., :50, :70], x)


def test_mask_bbox():
    assert M.mask_bbox(line_mask()) == (10, 13, 50, 14)
