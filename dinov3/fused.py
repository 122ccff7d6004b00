"""Memory-lean residual MLP branch for timm ViT blocks (fp32 training on CPU).

``y = x + drop_path(gamma * fc2(gelu(fc1(LayerNorm(x)))))`` as one autograd Function that
saves only ``x``, the LayerNorm statistics and the fc1 output ``h`` (D + 2 + 4D floats per
token) instead of autograd's LN input, fc1 input, ``h``, ``gelu(h)`` and the fc2 output
(D + D + 4D + 4D + D). The backward recomputes ``gelu(h)`` and the LayerNorm output
(elementwise, cheap) and runs the same four GEMMs autograd would: the LayerScale
gradient comes from ``G = g^T gelu(h)``, which the fc2 weight gradient needs anyway
(``sum_n g z = sum_j W2 * G + b2 * sum_n g``), so ``z`` is never stored. On the benchmark
workload this cuts saved activations by about 30%.

Used only for fp32/fp64 inputs with autocast off and grad enabled (the CPU path); under
bf16 autocast (GPU) the blocks run timm's own modules.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, Mlp


class _ResidualMlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ln_w, ln_b, w1, b1, w2, b2, gamma, scale, eps):
        # x [B, T, D]; gamma [D] | None; scale [B, 1, 1] | None (drop path)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xn, mean, rstd = torch.native_layer_norm(x2, (shape[-1],), ln_w, ln_b, eps)
        h = torch.addmm(b1, xn, w1.t())  # [N, 4D]
        z = torch.addmm(b2, F.gelu(h), w2.t())  # [N, D]
        if gamma is not None:
            z = z * gamma
        z = z.view(shape)
        if scale is not None:
            z = z * scale
        ctx.save_for_backward(x, mean, rstd, h, ln_w, ln_b, w1, w2, b2, gamma, scale)
        ctx.eps = eps
        return x + z

    @staticmethod
    def backward(ctx, gy):
        x, mean, rstd, h, ln_w, ln_b, w1, w2, b2, gamma, scale = ctx.saved_tensors
        shape = x.shape
        d = shape[-1]
        gs = gy * scale if scale is not None else gy  # grad of gamma * z
        gs = gs.reshape(-1, d)
        a = F.gelu(h)
        big_g = gs.t().mm(a)  # [D, 4D] = sum_n gs[n, d] a[n, j]
        g_gamma = None
        if gamma is not None:
            g_gamma = (big_g * w2).sum(1) + b2 * gs.sum(0)  # = sum_n gs * z
            g_w2 = big_g * gamma.unsqueeze(1)
            gz = gs * gamma
        else:
            g_w2, gz = big_g, gs
        g_b2 = gz.sum(0)
        del a, big_g
        gh = torch.ops.aten.gelu_backward(gz.mm(w2), h)  # [N, 4D]
        x2 = x.reshape(-1, d)
        xn = (x2 - mean) * rstd
        if ln_w is not None:
            xn = xn * ln_w + ln_b
        g_w1 = gh.t().mm(xn)
        g_b1 = gh.sum(0)
        gxn = gh.mm(w1)
        del gh, xn
        g_x, g_lnw, g_lnb = torch.ops.aten.native_layer_norm_backward(
            gxn, x2, [d], mean, rstd, ln_w, ln_b, [True, ln_w is not None, ln_b is not None])
        return (gy + g_x.view(shape), g_lnw, g_lnb, g_w1, g_b1, g_w2, g_b2, g_gamma, None, None)


def _gamma(ls) -> Optional[torch.Tensor]:
    if isinstance(ls, LayerScale) and not ls.inplace:
        return ls.gamma
    if isinstance(ls, nn.Parameter):
        return ls
    return None


def mlp_branch_supported(blk: nn.Module) -> bool:
    """Whether ``blk`` (timm VisionTransformer Block or Eva EvaBlock) has the plain
    LayerNorm -> Mlp(GELU) -> LayerScale -> DropPath branch this module fuses."""
    mlp, norm = getattr(blk, "mlp", None), getattr(blk, "norm2", None)
    if type(mlp) is not Mlp or not isinstance(norm, nn.LayerNorm) or not isinstance(mlp.norm, nn.Identity):
        return False
    act_ok = isinstance(mlp.act, nn.GELU) and mlp.act.approximate == "none"
    drops_ok = all(isinstance(m, nn.Identity) or (isinstance(m, nn.Dropout) and m.p == 0)
                   for m in (mlp.drop1, mlp.drop2))
    ls = getattr(blk, "ls2", getattr(blk, "gamma_2", None))
    ls_ok = ls is None or isinstance(ls, (nn.Identity, nn.Parameter)) or (isinstance(ls, LayerScale) and not ls.inplace)
    dp = blk.drop_path2
    return (act_ok and drops_ok and ls_ok and mlp.fc1.bias is not None and mlp.fc2.bias is not None
            and isinstance(dp, (nn.Identity, DropPath)) and norm.elementwise_affine == (norm.weight is not None))


def residual_mlp(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x + drop_path2(gamma_2 * mlp(norm2(x)))`` of ``blk`` with lean activation storage.

    ``x [B, T, D]``; requires :func:`mlp_branch_supported`.
    """
    mlp, norm, dp = blk.mlp, blk.norm2, blk.drop_path2
    gamma = _gamma(getattr(blk, "ls2", getattr(blk, "gamma_2", None)))
    scale = None
    if isinstance(dp, DropPath) and dp.training and dp.drop_prob > 0:
        keep = 1.0 - dp.drop_prob
        scale = x.new_empty(x.shape[0], 1, 1).bernoulli_(keep)
        if dp.scale_by_keep:
            scale.div_(keep)
    return _ResidualMlp.apply(x.contiguous(), norm.weight, norm.bias, mlp.fc1.weight, mlp.fc1.bias,
                              mlp.fc2.weight, mlp.fc2.bias, gamma, scale, norm.eps)
