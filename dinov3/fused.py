"""Memory-lean residual branches for timm ViT blocks (fp32 training on CPU).

MLP branch (VisionTransformer and Eva blocks):

``y = x + drop_path(gamma * fc2(gelu(fc1(LayerNorm(x)))))`` as one autograd Function that
saves only ``x``, the LayerNorm statistics and the fc1 output ``h`` (D + 2 + 4D floats per
token) instead of autograd's LN input, fc1 input, ``h``, ``gelu(h)`` and the fc2 output
(D + D + 4D + 4D + D). The backward recomputes ``gelu(h)`` and the LayerNorm output
(elementwise, cheap) and runs the same four GEMMs autograd would: the LayerScale
gradient comes from ``G = g^T gelu(h)``, which the fc2 weight gradient needs anyway
(``sum_n g z = sum_j W2 * G + b2 * sum_n g``), so ``z`` is never stored. On the benchmark
workload this cuts saved activations by about 30%.

Attention branch (VisionTransformer blocks, CPU): :class:`_ResidualAttention`, same idea
with the flash-attention CPU kernels' own backward. Under CPU bf16 autocast (no lean
branches), :func:`matmul_attention` replaces the slow bf16 flash kernels for short sequences.

Used only for fp32/fp64 inputs with autocast off and grad enabled (the CPU path); under
bf16 autocast (GPU) the blocks run timm's own modules. Gradients equal autograd's
(tests/test_method_fused.py).
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
    scale = _drop_path_scale(dp, x)
    return _ResidualMlp.apply(x.contiguous(), norm.weight, norm.bias, mlp.fc1.weight, mlp.fc1.bias,
                              mlp.fc2.weight, mlp.fc2.bias, gamma, scale, norm.eps)


# Up to this many tokens, attention under CPU bf16 autocast runs as batched matrix products:
# forward + backward 1.5-1.9x faster than the bf16 flash kernels at 21 to 577 tokens (ViT-Tiny
# heads, 2 cores). It keeps the [B, H, T, T] probabilities for the backward, hence a bound.
MATH_ATTENTION_MAX_TOKENS = 1024


class _ResidualAttention(torch.autograd.Function):
    """``y = x + drop_path(gamma * proj(SDPA(qkv(LayerNorm(x)))))`` (timm ``Attention``).

    Saves ``x``, the LayerNorm statistics, the qkv projection, the attention output and its
    logsumexp (D + 2 + 3D + D floats per token) instead of autograd's LN input and output,
    qkv, attention output, its transposed copy and the proj output (D + D + 3D + D + D + D).
    """

    @staticmethod
    def forward(ctx, x, ln_w, ln_b, w_qkv, b_qkv, w_proj, b_proj, gamma, scale, num_heads, eps):
        b, t, d = x.shape
        x2 = x.reshape(-1, d)
        xn, mean, rstd = torch.native_layer_norm(x2, (d,), ln_w, ln_b, eps)
        qkv = F.linear(xn, w_qkv, b_qkv)  # [N, 3D]
        q, k, v = qkv.view(b, t, 3, num_heads, d // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False)
        z = F.linear(out.transpose(1, 2).reshape(-1, d), w_proj, b_proj)
        if gamma is not None:
            z = z * gamma
        z = z.view(b, t, d)
        if scale is not None:
            z = z * scale
        ctx.save_for_backward(x, mean, rstd, qkv, out, lse, ln_w, ln_b, w_qkv, b_qkv, w_proj, b_proj, gamma, scale)
        ctx.num_heads = num_heads
        return x + z

    @staticmethod
    def backward(ctx, gy):
        x, mean, rstd, qkv, out, lse, ln_w, ln_b, w_qkv, b_qkv, w_proj, b_proj, gamma, scale = ctx.saved_tensors
        b, t, d = x.shape
        h = ctx.num_heads
        gs = (gy * scale if scale is not None else gy).reshape(-1, d)
        o = out.transpose(1, 2).reshape(-1, d)
        big_g = gs.t().mm(o)  # [D, D]
        g_gamma = None
        if gamma is not None:
            g_gamma = (big_g * w_proj).sum(1) + (b_proj * gs.sum(0) if b_proj is not None else 0.0)
            g_wp, gz = big_g * gamma.unsqueeze(1), gs * gamma
        else:
            g_wp, gz = big_g, gs
        g_bp = gz.sum(0) if b_proj is not None else None
        del o, big_g
        g_out = gz.mm(w_proj).view(b, t, h, d // h).transpose(1, 2)
        q, k, v = qkv.view(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)
        gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            g_out, q, k, v, out, lse, 0.0, False)
        g_qkv = torch.stack([gq, gk, gv]).permute(1, 3, 0, 2, 4).reshape(-1, 3 * d)  # [N, 3D]
        del gq, gk, gv, g_out
        x2 = x.reshape(-1, d)
        xn = (x2 - mean) * rstd
        if ln_w is not None:
            xn = xn * ln_w + ln_b
        g_wqkv = g_qkv.t().mm(xn)
        g_bqkv = g_qkv.sum(0) if b_qkv is not None else None
        gxn = g_qkv.mm(w_qkv)
        del g_qkv, xn
        g_x, g_lnw, g_lnb = torch.ops.aten.native_layer_norm_backward(
            gxn, x2, [d], mean, rstd, ln_w, ln_b, [True, ln_w is not None, ln_b is not None])
        return (gy + g_x.view(b, t, d), g_lnw, g_lnb, g_wqkv, g_bqkv, g_wp, g_bp, g_gamma, None, None, None)


def attn_branch_supported(blk: nn.Module) -> bool:
    """Whether ``blk`` is a timm VisionTransformer Block whose attention branch is plain
    LayerNorm -> Attention (fused SDPA, no qk-norm / gate / dropout) -> LayerScale -> DropPath."""
    from timm.layers import Attention

    attn, norm = getattr(blk, "attn", None), getattr(blk, "norm1", None)
    if type(attn) is not Attention or not isinstance(norm, nn.LayerNorm):
        return False
    ls = getattr(blk, "ls1", None)
    ls_ok = isinstance(ls, nn.Identity) or (isinstance(ls, LayerScale) and not ls.inplace)
    return (ls_ok and getattr(attn, "gate", None) is None and attn.fused_attn
            and all(isinstance(getattr(attn, n), nn.Identity) for n in ("q_norm", "k_norm", "norm"))
            and attn.attn_drop.p == 0 and (isinstance(attn.proj_drop, nn.Identity) or attn.proj_drop.p == 0)
            and getattr(attn, "attn_dim", attn.qkv.in_features) == attn.qkv.in_features
            and isinstance(blk.drop_path1, (nn.Identity, DropPath))
            and norm.elementwise_affine == (norm.weight is not None))


def _drop_path_scale(dp: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    if isinstance(dp, DropPath) and dp.training and dp.drop_prob > 0:
        keep = 1.0 - dp.drop_prob
        scale = x.new_empty(x.shape[0], 1, 1).bernoulli_(keep)
        return scale.div_(keep) if dp.scale_by_keep else scale
    return None


def matmul_attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm ``Attention(x)`` with the attention as batched matrix products; for autocast on
    the CPU, where the bf16 flash kernels are slow (3x the fp32 backward at 69 tokens).

    ``x [B, T, D]``; ``attn`` as checked by :func:`attn_branch_supported`.
    """
    b, t, d = x.shape
    q, k, v = attn.qkv(x).view(b, t, 3, attn.num_heads, d // attn.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    p = torch.matmul(q * attn.scale, k.transpose(-1, -2)).softmax(-1)  # [B, H, T, T]
    return attn.proj(torch.matmul(p, v).transpose(1, 2).reshape(b, t, d))


def residual_attention(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x + drop_path1(ls1(attn(norm1(x))))`` of a timm Block; CPU only.

    ``x [B, T, D]``; requires :func:`attn_branch_supported`.
    """
    attn, norm = blk.attn, blk.norm1
    return _ResidualAttention.apply(x.contiguous(), norm.weight, norm.bias, attn.qkv.weight, attn.qkv.bias,
                                    attn.proj.weight, attn.proj.bias, _gamma(blk.ls1),
                                    _drop_path_scale(blk.drop_path1, x), attn.num_heads, norm.eps)
