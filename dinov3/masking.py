"""Patch masks for the student's global crops (recipe section 2).

All randomness comes from the ``torch.Generator`` argument (CPU), so masks are
reproducible and independent of the global RNG. Masks are built on CPU (cheap, and the
masked-token indices are then known without a device sync) and moved by the caller.
"""

from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import torch

LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))


def block_mask(height: int, width: int, n_mask: int, generator: torch.Generator, min_block_patches: int = 4,
               max_block_patches: int | None = None, max_tries: int = 10) -> torch.Tensor:
    """BEiT-style block mask with exactly ``n_mask`` masked patches -> bool ``[height * width]``.

    Rectangles of area ~ U(min_block_patches, max_block_patches) (default half the grid)
    and log-uniform aspect ratio in [0.3, 1/0.3] are added (up to ``max_tries`` placements
    per block, never exceeding ``n_mask``) until no block fits; any shortfall is filled
    with uniformly random unmasked patches so the count is exact.
    """
    n_patches = height * width
    n_mask = int(min(max(n_mask, 0), n_patches))
    if max_block_patches is None:
        max_block_patches = int(0.5 * n_patches)
    mask = np.zeros((height, width), dtype=bool)
    count = 0
    while count < n_mask:
        budget = min(n_mask - count, max_block_patches)
        delta = 0
        for u in torch.rand(max_tries, 4, generator=generator, dtype=torch.float64).tolist():
            area = min_block_patches + u[0] * (budget - min_block_patches)
            aspect = math.exp(LOG_ASPECT[0] + u[1] * (LOG_ASPECT[1] - LOG_ASPECT[0]))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if 0 < h < height and 0 < w < width:
                top = int(u[2] * (height - h + 1))
                left = int(u[3] * (width - w + 1))
                region = mask[top:top + h, left:left + w]
                new = h * w - int(region.sum())
                if 0 < new <= budget:
                    region[...] = True
                    delta = new
                    break
        if delta == 0:
            break
        count += delta
    flat = torch.from_numpy(mask.reshape(-1))
    if count < n_mask:  # fill the shortfall at random: exact counts
        free = (~flat).nonzero().squeeze(1)
        flat[free[torch.randperm(free.numel(), generator=generator)[: n_mask - count]]] = True
    return flat


def random_mask(n_crops: int, n_patches: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Every crop masked uniformly at random at a fixed ratio (the original module) -> bool [n_crops, P]."""
    n_mask = int(round(n_patches * ratio))
    order = torch.rand(n_crops, n_patches, generator=generator).argsort(dim=1)
    masks = torch.zeros(n_crops, n_patches, dtype=torch.bool)
    masks.scatter_(1, order[:, :n_mask], True)
    return masks


def generate_masks(n_crops: int, grid: Tuple[int, int], generator: torch.Generator, strategy: str = "block",
                   mask_ratio: float = 0.3, ratio_range: Tuple[float, float] = (0.1, 0.5),
                   mask_probability: float = 0.5, min_block_patches: int = 4,
                   max_block_frac: float = 0.5) -> torch.Tensor:
    """Masks for the ``n_crops`` (= 2B) global crops of one worker batch -> bool ``[n_crops, h*w]``.

    ``strategy="block"``: ``n_m = int(n_crops * mask_probability)`` crops get block masks
    whose ratios are stratified: crop i draws r ~ U(p_i, p_{i+1}) with
    ``p = linspace(*ratio_range, n_m + 1)`` and masks ``int(P * r)`` patches; the other
    crops are unmasked; rows are shuffled. ``strategy="random"``: every crop gets
    ``round(P * mask_ratio)`` uniformly random patches.
    """
    height, width = grid
    n_patches = height * width
    if strategy == "random":
        return random_mask(n_crops, n_patches, mask_ratio, generator)
    if strategy != "block":
        raise ValueError(f"mask strategy {strategy!r}: expected 'block' or 'random'")
    masks = torch.zeros(n_crops, n_patches, dtype=torch.bool)
    n_masked_crops = int(n_crops * mask_probability)
    bounds = torch.linspace(ratio_range[0], ratio_range[1], n_masked_crops + 1, dtype=torch.float64).tolist()
    u = torch.rand(n_masked_crops, generator=generator, dtype=torch.float64).tolist()
    max_block = max(int(max_block_frac * n_patches), 1)
    for i in range(n_masked_crops):
        ratio = bounds[i] + u[i] * (bounds[i + 1] - bounds[i])
        masks[i] = block_mask(height, width, int(n_patches * ratio), generator, min_block_patches, max_block)
    return masks[torch.randperm(n_crops, generator=generator)]


def masked_token_index(masks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flat indices and iBOT weights of the masked tokens.

    ``masks bool [N, P]`` -> ``(index long [M], weights float [M])`` where ``index`` points
    into the ``N * P`` flattened patch tokens (crop-major) and each weight is
    ``1 / (masked tokens in that token's crop)``.
    """
    n_patches = masks.shape[1]
    index = masks.reshape(-1).nonzero().squeeze(1)
    counts = masks.sum(dim=1).clamp_min(1).to(torch.float32)
    weights = counts.reciprocal()[index // n_patches]
    return index, weights
