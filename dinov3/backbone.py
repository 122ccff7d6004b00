"""timm ViT backbones that accept a patch mask (recipe section 4).

Two families:

* ``vit_*``        timm ``VisionTransformer``: learned absolute pos-embed, native register
                   tokens (``reg_tokens``), LayerScale via ``init_values``.
* ``vit_*_dinov3`` timm ``Eva``: RoPE, registers, LayerScale (the DINOv3 architecture).

Both are built with ``dynamic_img_size=True`` (global and local crops differ in size) so
``patch_embed`` returns NHWC; :class:`MaskableViT` replaces masked patch embeddings by a
learned mask token right after ``patch_embed``, i.e. before the absolute pos-embed
(VisionTransformer) or before the blocks and their RoPE (Eva). Token layout of the
output: ``[CLS, registers, patches]``.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import timm
import torch
import torch.nn as nn
from timm.layers import DropPath
from timm.models.eva import Eva, EvaBlock
from timm.models.vision_transformer import Block, VisionTransformer

from dinov3 import fused
from dinov3.fused import attn_branch_supported, matmul_attention, mlp_branch_supported, residual_attention, residual_mlp


def is_dinov3_family(name: str) -> bool:
    """``vit_*_dinov3`` (optionally ``_qkvb`` or a ``.tag``) -> timm Eva with RoPE."""
    return "_dinov3" in name.split(".")[0]


def create_timm_vit(
    name: str,
    img_size: int,
    patch_size: Optional[int] = None,
    embed_dim: Optional[int] = None,
    depth: Optional[int] = None,
    num_heads: Optional[int] = None,
    n_register_tokens: int = 4,
    qkv_bias: Optional[bool] = None,
    drop_path_rate: float = 0.0,
    layerscale_init: Optional[float] = 1e-5,
    pretrained: bool = False,
    pretrained_file: Optional[str] = None,
) -> nn.Module:
    """Create the bare timm model (no classifier head, CLS token, registers).

    ``pretrained_file``: a local checkpoint timm reads instead of the hub/cache (timm's
    ``pretrained_cfg_overlay=dict(file=...)``); only used with ``pretrained=True``.
    """
    kwargs = dict(num_classes=0, img_size=img_size, dynamic_img_size=True, drop_path_rate=drop_path_rate)
    for key, value in (("patch_size", patch_size), ("embed_dim", embed_dim), ("depth", depth),
                       ("num_heads", num_heads), ("qkv_bias", qkv_bias)):
        if value is not None:
            kwargs[key] = value
    load = dict(pretrained=pretrained)
    if pretrained and pretrained_file:
        load["pretrained_cfg_overlay"] = dict(file=pretrained_file)
    if is_dinov3_family(name):
        if layerscale_init is not None:
            kwargs["init_values"] = layerscale_init
        model = timm.create_model(name, num_reg_tokens=n_register_tokens, class_token=True, **kwargs)
        if pretrained:
            # Released vit_*_dinov3 checkpoints hold the arch's register count (4) and a sweep
            # may vary it: let timm load into the arch's own layout, then copy across.
            source = timm.create_model(name, **load, class_token=True, **kwargs)
            _copy_pretrained_eva(source, model)
    else:
        # Released vit_* checkpoints have no LayerScale: adding it would break strict loading.
        if layerscale_init is not None and not pretrained:
            kwargs["init_values"] = layerscale_init
        model = timm.create_model(name, reg_tokens=n_register_tokens, class_token=True, **kwargs)
        if pretrained:
            # The checkpoint's prefix layout (released vit_*: CLS, no registers) differs from
            # ours, and timm's checkpoint filter resamples pos_embed with the *model's* prefix
            # count, so loading straight into ``model`` fails. Let timm load (and resample to
            # img_size/patch_size) into a model with the arch's own layout, then copy across.
            source = timm.create_model(name, **load, **kwargs)
            _copy_pretrained_vit(source, model)
    if not isinstance(model, (VisionTransformer, Eva)):
        raise ValueError(f"backbone={name!r}: expected a timm VisionTransformer or Eva, got {type(model).__name__}")
    if getattr(model, "cls_token", None) is None:
        raise ValueError(f"backbone={name!r}: DINOv3 needs a CLS token")
    set_uniform_drop_path(model, drop_path_rate)
    return model


def _copy_pretrained_vit(src: VisionTransformer, dst: VisionTransformer) -> None:
    """Copy a loaded ``src`` into ``dst`` that differs only in its CLS/register tokens.

    timm's ``pos_embed`` is ``[CLS?, registers, patches]`` unless ``no_embed_class`` (then
    patches only, prefix tokens get no position). CLS and patch positions come from ``src``;
    tokens ``src`` lacks (registers, or CLS for a CLS-free arch) keep ``dst``'s fresh init.
    """
    src_sd, dst_sd = src.state_dict(), dst.state_dict()
    loaded = {k: v for k, v in src_sd.items() if k in dst_sd and v.shape == dst_sd[k].shape}
    same_prefix = (src.cls_token is None) == (dst.cls_token is None) and src.num_prefix_tokens == dst.num_prefix_tokens
    if "pos_embed" in dst_sd and not dst.no_embed_class and not same_prefix:
        pe, pe_src = dst_sd["pos_embed"].clone(), src_sd["pos_embed"]
        pe[:, dst.num_prefix_tokens:] = pe_src[:, src.num_prefix_tokens:]  # patches (same grid)
        if src.cls_token is not None:
            pe[:, 0] = pe_src[:, 0]  # CLS is first in both
        loaded["pos_embed"] = pe
    fresh = set(dst_sd) - set(loaded)
    dropped = set(src_sd) - set(loaded)
    if fresh - {"reg_token", "cls_token"} or dropped - {"reg_token"}:
        raise RuntimeError(f"pretrained copy: unexpected fresh {sorted(fresh)} / dropped {sorted(dropped)} keys")
    dst.load_state_dict(loaded, strict=False)


def _copy_pretrained_eva(src: Eva, dst: Eva) -> None:
    """Copy a loaded ``src`` into ``dst`` that differs at most in its register count: every
    weight, and the first ``min(n_src, n_dst)`` registers (extra ones keep ``dst``'s init)."""
    src_sd, dst_sd = src.state_dict(), dst.state_dict()
    loaded = {k: v for k, v in src_sd.items() if k in dst_sd and v.shape == dst_sd[k].shape}
    if "reg_token" in src_sd and "reg_token" in dst_sd and "reg_token" not in loaded:
        n = min(src_sd["reg_token"].shape[1], dst_sd["reg_token"].shape[1])
        reg = dst_sd["reg_token"].clone()
        reg[:, :n] = src_sd["reg_token"][:, :n]
        loaded["reg_token"] = reg
    fresh, dropped = set(dst_sd) - set(loaded), set(src_sd) - set(loaded)
    if fresh - {"reg_token"} or dropped - {"reg_token"}:
        raise RuntimeError(f"pretrained copy: unexpected fresh {sorted(fresh)} / dropped {sorted(dropped)} keys")
    dst.load_state_dict(loaded, strict=False)


def set_uniform_drop_path(vit: nn.Module, rate: float) -> None:
    """Same stochastic-depth rate in every block (recipe; timm builds a linear ramp)."""
    for blk in vit.blocks:
        for name in ("drop_path1", "drop_path2"):
            if hasattr(blk, name):
                setattr(blk, name, DropPath(rate) if rate > 0 else nn.Identity())


class MaskableViT(nn.Module):
    """A timm ViT plus a learned mask token.

    ``forward(images [N, 3, H, W], masks bool [N, h*w] | None) -> tokens [N, T, D]`` after
    the final norm, ``T = num_prefix_tokens + h*w`` with layout ``[CLS, registers, patches]``.
    """

    def __init__(self, vit: nn.Module, lean_mlp: bool = True):
        super().__init__()
        self.vit = vit
        # fused residual-MLP branch (dinov3.fused) where the block layout allows it
        self.lean_blocks = [lean_mlp and type(b) in (Block, EvaBlock) and mlp_branch_supported(b) for b in vit.blocks]
        self.lean_attn_ok = [type(b) is Block and attn_branch_supported(b) for b in vit.blocks]
        self.lean_attn = [lean and ok for lean, ok in zip(self.lean_blocks, self.lean_attn_ok)]
        self.embed_dim: int = vit.embed_dim
        self.num_prefix_tokens: int = vit.num_prefix_tokens  # CLS + registers
        self.num_register_tokens: int = self.num_prefix_tokens - 1
        self.is_eva = isinstance(vit, Eva)
        self.mask_token = nn.Parameter(torch.zeros(1, vit.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    @property
    def patch_size(self) -> Tuple[int, int]:
        return tuple(self.vit.patch_embed.patch_size)

    @property
    def depth(self) -> int:
        return len(self.vit.blocks)

    def grid_size(self, img_size: int) -> Tuple[int, int]:
        ph, pw = self.patch_size
        return img_size // ph, img_size // pw

    def _embed(self, images: torch.Tensor, masks: Optional[torch.Tensor]) -> torch.Tensor:
        x = self.vit.patch_embed(images)  # [N, h, w, D] (dynamic_img_size -> NHWC)
        if masks is not None:
            # Substitute before any position information is added (abs pos-embed / RoPE).
            m = masks.view(*x.shape[:-1], 1)
            x = torch.where(m, self.mask_token.to(x.dtype), x)
        return x

    def forward(self, images: torch.Tensor, masks: Optional[torch.Tensor] = None) -> torch.Tensor:
        vit = self.vit
        x = self._embed(images, masks)
        if self.is_eva:
            x, rope = vit._pos_embed(x)  # prepends CLS + registers; rope covers patches only
            x = vit.norm_pre(x)
            mixed = getattr(vit, "rope_mixed", False) and rope is not None
        else:
            x = vit._pos_embed(x)  # [N, T, D]
            x = vit.patch_drop(x)
            x = vit.norm_pre(x)
            rope, mixed = None, False
        cpu_autocast = x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        lean = torch.is_grad_enabled() and x.dtype in (torch.float32, torch.float64) and not cpu_autocast
        short = x.shape[1] <= fused.MATH_ATTENTION_MAX_TOKENS
        for i, blk in enumerate(vit.blocks):
            r = rope[i] if mixed else rope
            if lean and self.lean_blocks[i]:
                x = self._lean_block(i, blk, x, r)
            elif cpu_autocast and short and self.lean_attn_ok[i]:
                x = x + blk.drop_path1(blk.ls1(matmul_attention(blk.attn, blk.norm1(x))))
                x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
            else:
                x = blk(x, rope=r) if self.is_eva else blk(x)
        return vit.norm(x)

    def _lean_block(self, i: int, blk: nn.Module, x: torch.Tensor, rope: Optional[torch.Tensor]) -> torch.Tensor:
        """The block's own attention branch, then the fused MLP branch (same math as ``blk(x)``)."""
        if self.is_eva:
            x_attn = blk.attn(blk.norm1(x), rope=rope)
            if blk.gamma_1 is not None:
                x_attn = blk.gamma_1 * x_attn
            x = x + blk.drop_path1(x_attn)
        elif x.device.type == "cpu" and self.lean_attn[i]:
            x = residual_attention(blk, x)
        else:
            x = x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))
        return residual_mlp(blk, x)


def build_backbone(cfg) -> MaskableViT:
    """``cfg``: a :class:`dinov3.config.DINOv3Config`."""
    vit = create_timm_vit(cfg.backbone, cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads,
                          cfg.n_register_tokens, cfg.qkv_bias, cfg.drop_path_rate, cfg.layerscale_init, cfg.pretrained,
                          os.path.expanduser(cfg.pretrained_file) if cfg.pretrained_file else None)
    return MaskableViT(vit, lean_mlp=cfg.lean_mlp)
