"""PCA pictures of patch features (DINO-paper style), logged at k-NN evaluations.

For a few fixed held-out images: the first principal component of all their patch
features separates foreground from background (thresholded, sign chosen so that the
smaller side is foreground); the first three components of the foreground patches,
fitted on those patches only, become RGB. One PNG: input images on the top row,
their PCA maps below, each tile ``TILE`` px (nearest upsampling). Cheap: a few images,
one SVD, rank 0 only, at evaluation time.
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import Optional

import numpy as np
import torch

from rayssl import method as method_door

TILE = 96  # px per image tile in the picture


@torch.no_grad()
def pca_rgb(patch_feats: torch.Tensor, threshold: float = 0.0) -> np.ndarray:
    """``patch_feats [N, h, w, D]`` -> ``[N, h, w, 3]`` uint8: foreground patches coloured by
    their first three PCA components, background black."""
    n, h, w, d = patch_feats.shape
    x = patch_feats.float().reshape(-1, d).cpu()
    x = x - x.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    first = x @ v[0]
    fg = first > threshold
    if fg.sum() > fg.numel() / 2:  # PC sign is arbitrary: call the minority side foreground
        fg = ~fg
    if fg.sum() < 3:
        fg = torch.ones_like(fg)
    xf = x[fg] - x[fg].mean(0, keepdim=True)
    _, _, vf = torch.linalg.svd(xf, full_matrices=False)
    k = min(3, vf.shape[0])
    comps = torch.zeros(x.shape[0], 3)
    comps[fg, :k] = xf @ vf[:k].T
    lo, hi = comps[fg].min(0).values, comps[fg].max(0).values
    comps = (comps - lo) / (hi - lo).clamp_min(1e-8)
    comps[~fg] = 0.0
    return (comps.clamp(0, 1) * 255).round().to(torch.uint8).reshape(n, h, w, 3).numpy()


def _to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    if images.dtype == torch.uint8:
        return images.permute(0, 2, 3, 1).cpu().numpy()
    tf = method_door.transforms()  # normalised float: undo the method's normalisation
    mean = torch.tensor(tf.IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(tf.IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    x = ((images.float() * std + mean) * 255).clamp(0, 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _resize_nearest(img: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((size, size), Image.NEAREST))


def pca_picture(images: torch.Tensor, patch_feats: torch.Tensor, tile: int = TILE) -> bytes:
    """PNG bytes, ``2 * tile`` high and ``N * tile`` wide: images above, PCA maps below."""
    from PIL import Image

    rgb = pca_rgb(patch_feats)
    imgs = _to_uint8_hwc(images)
    n = rgb.shape[0]
    canvas = np.zeros((2 * tile, n * tile, 3), dtype=np.uint8)
    for i in range(n):
        canvas[:tile, i * tile:(i + 1) * tile] = _resize_nearest(np.ascontiguousarray(imgs[i]), tile)
        canvas[tile:, i * tile:(i + 1) * tile] = _resize_nearest(rgb[i], tile)
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    return buf.getvalue()


def log_pca_picture(method: torch.nn.Module, images: torch.Tensor, tracking_uri: Optional[str], run_id: str,
                    step: int) -> str:
    """Log ``pca/step_XXXXXX.png`` for ``images [N, 3, H, W]`` (uses ``method.patch_features``)."""
    from mlflow.tracking import MlflowClient

    png = pca_picture(images, method.patch_features(images))
    name = f"step_{int(step):06d}.png"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, name)
        with open(path, "wb") as f:
            f.write(png)
        MlflowClient(tracking_uri).log_artifact(run_id, path, "pca")
    return f"pca/{name}"
