"""Patch masks (recipe section 2): exact counts, stratified ratios, seed's random option."""

import pytest
import torch

from dinov3.config import DINOv3Config
from dinov3.masking import block_mask, generate_masks, masked_token_index


@pytest.mark.parametrize("grid", [(8, 8), (4, 4), (14, 14), (6, 9)])
def test_block_mask_exact_counts(grid):
    g = torch.Generator().manual_seed(0)
    n = grid[0] * grid[1]
    for n_mask in sorted({0, 1, 3, n // 4, n // 2, int(0.95 * n), n}):
        m = block_mask(*grid, n_mask, g)
        assert m.dtype == torch.bool and m.shape == (n,)
        assert int(m.sum()) == n_mask


def test_block_mask_is_blocky():
    """Masked patches form rectangles: far more masked 4-neighbours than random placement."""
    g = torch.Generator().manual_seed(1)
    adjacent_block, adjacent_random = 0, 0
    for _ in range(20):
        m = block_mask(14, 14, 60, g).view(14, 14)
        adjacent_block += int((m[:, 1:] & m[:, :-1]).sum())
        r = torch.zeros(196, dtype=torch.bool)
        r[torch.randperm(196, generator=g)[:60]] = True
        r = r.view(14, 14)
        adjacent_random += int((r[:, 1:] & r[:, :-1]).sum())
    assert adjacent_block > 2 * adjacent_random


def test_generate_masks_stratified_ratios():
    g = torch.Generator().manual_seed(2)
    n_crops, grid = 16, (10, 10)
    p = 100
    r_min, r_max = 0.1, 0.5
    masks = generate_masks(n_crops, grid, g, "block", ratio_range=(r_min, r_max), mask_probability=0.5)
    assert masks.shape == (n_crops, p) and masks.dtype == torch.bool
    counts = masks.sum(1)
    n_m = int(n_crops * 0.5)
    assert int((counts == 0).sum()) >= n_crops - n_m  # the rest get no mask
    # stratum i of linspace(r_min, r_max, n_m + 1) holds exactly one crop's ratio
    bounds = torch.linspace(r_min, r_max, n_m + 1)
    got = sorted(counts[counts > 0].tolist())
    assert len(got) == n_m
    for i, c in enumerate(got):
        assert int(p * bounds[i]) - 1 <= c <= int(p * bounds[i + 1])


def test_generate_masks_shuffled_and_seeded():
    masks_a = [generate_masks(8, (8, 8), torch.Generator().manual_seed(s), "block") for s in range(6)]
    masked_rows = {tuple(m.sum(1).gt(0).nonzero().squeeze(1).tolist()) for m in masks_a}
    assert len(masked_rows) > 1  # which crops get masks varies (shuffled)
    again = generate_masks(8, (8, 8), torch.Generator().manual_seed(0), "block")
    assert torch.equal(again, masks_a[0])


def test_random_strategy_is_the_seed_fixed_ratio():
    g = torch.Generator().manual_seed(3)
    masks = generate_masks(6, (8, 8), g, "random", mask_ratio=0.3)
    assert (masks.sum(1) == round(64 * 0.3)).all()


def test_config_mask_ratio_range():
    assert DINOv3Config().mask_ratio_range == pytest.approx((0.1, 0.5))
    assert DINOv3Config(mask_ratio=0.05).mask_ratio_range == pytest.approx((0.0, 0.25))
    assert DINOv3Config(mask_ratio=0.9).mask_ratio_range == pytest.approx((0.7, 0.95))


def test_masked_token_index_weights():
    masks = torch.zeros(3, 4, dtype=torch.bool)
    masks[0, [1, 3]] = True
    masks[2, [0, 1, 2]] = True
    index, weights = masked_token_index(masks)
    assert index.tolist() == [1, 3, 8, 9, 10]
    torch.testing.assert_close(weights, torch.tensor([0.5, 0.5, 1 / 3, 1 / 3, 1 / 3]))
