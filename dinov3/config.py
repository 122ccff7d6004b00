"""Hyperparameters of the DINOv3 method (recipe defaults) in one plain dataclass.

Masking and the swept ``mask_ratio``
------------------------------------
``mask_strategy="block"`` (recipe default): ``n_m = int(2B * mask_probability)`` of the
2B global crops of a worker batch get BEiT-style block masks; their ratios are
stratified over ``linspace(r_min, r_max, n_m + 1)`` with

    r_min, r_max = clip(mask_ratio -/+ mask_ratio_spread, 0, 0.95)

so the defaults ``mask_ratio=0.3, mask_ratio_spread=0.2`` give the recipe's 0.1-0.5 and a
sweep over ``mask_ratio`` moves the centre of that range. ``mask_strategy="random"``
reproduces the original module: every global crop is masked uniformly at random at the
fixed ratio ``mask_ratio`` (``mask_probability`` and ``mask_ratio_spread`` are ignored).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

MASK_STRATEGIES = ("block", "random")
MAX_MASK_RATIO = 0.95
# Fields describing the network (a platform's "model" group); every other field but img_size
# (the global crop size, set from the data) is the training recipe (its "method" group).
MODEL_FIELDS = ("backbone", "patch_size", "embed_dim", "depth", "num_heads", "qkv_bias", "drop_path_rate",
                "layerscale_init", "pretrained", "pretrained_file", "head_hidden_dim", "head_bottleneck_dim",
                "n_cls_prototypes", "n_patch_prototypes")
DERIVED_FIELDS = ("img_size",)


class ConfigValueError(ValueError):
    """A :class:`DINOv3Config` field holds a bad value; ``field``, ``value`` and ``rule`` say which."""

    def __init__(self, field: str, value: Any, rule: str):
        super().__init__(f"DINOv3Config.{field}={value!r}: {rule}")
        self.field, self.value, self.rule = field, value, rule


@dataclass
class DINOv3Config:
    # ---- backbone (timm) ----
    backbone: str = "vit_small_patch16_224"  # vit_* (VisionTransformer) or vit_*_dinov3 (Eva, RoPE)
    img_size: int = 224  # global crop size
    patch_size: Optional[int] = None  # None = timm default of `backbone`
    embed_dim: Optional[int] = None  # None = timm default (overrides are for micro models)
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    qkv_bias: Optional[bool] = None  # None = timm default of `backbone` (vit_*: True, vit_*_dinov3: False)
    n_register_tokens: int = 4
    drop_path_rate: float = 0.1  # uniform over depth; 0.1 ViT-S, 0.3 ViT-B/L
    layerscale_init: Optional[float] = 1e-5  # None = no LayerScale (vit_* only)
    pretrained: bool = False
    pretrained_file: Optional[str] = None  # local checkpoint timm reads for pretrained=True (no hub)
    lean_mlp: bool = True  # fused, activation-lean MLP branch in fp32 training (dinov3.fused)
    split_backward: bool = True  # one backward for the local crops, one for the globals (DINOv3.backward_parts)
    # ---- heads ----
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    n_cls_prototypes: int = 65536
    n_patch_prototypes: int = 8192
    # ---- loss weights and temperatures ----
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    temperature_student: float = 0.1  # used by BOTH the CLS and the patch loss
    temperature_teacher: float = 0.07  # T_t after warm-up
    teacher_temp_warmup_start: float = 0.04
    teacher_temp_warmup_frac: float = 0.3  # fraction of the run
    sinkhorn_iterations: int = 3
    # ---- masking (see module docstring) ----
    mask_strategy: str = "block"
    mask_ratio: float = 0.3
    mask_ratio_spread: float = 0.2
    mask_probability: float = 0.5
    mask_min_block_patches: int = 4
    mask_max_block_frac: float = 0.5  # max block area as a fraction of the patch grid
    mask_seed: int = 0  # per-rank mask generator seed = mask_seed + rank
    # ---- optimisation (per-step schedules) ----
    base_lr: float = 4e-3  # scaled by sqrt(global_batch / lr_reference_batch)
    lr_reference_batch: int = 1024
    min_lr: float = 1e-6
    lr_warmup_frac: float = 0.1
    weight_decay_start: float = 0.04
    weight_decay_end: float = 0.4
    momentum_start: float = 0.992
    momentum_end: float = 1.0
    clip_grad: float = 3.0  # per student module; 0 = off
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    freeze_last_layer_epochs: float = 1.0
    # ---- Gram anchoring (DINOv3; off while gram_weight == 0) ----
    gram_weight: float = 0.0
    gram_start_step: int = 0  # first snapshot of the EMA teacher backbone
    gram_refresh_every: int = 0  # 0 = never refresh
    gram_max_refreshes: int = 0

    @property
    def mask_ratio_range(self) -> Tuple[float, float]:
        """(r_min, r_max) of the stratified block-mask ratios."""
        lo = min(max(self.mask_ratio - self.mask_ratio_spread, 0.0), MAX_MASK_RATIO)
        hi = min(max(self.mask_ratio + self.mask_ratio_spread, 0.0), MAX_MASK_RATIO)
        return lo, hi

    def validate(self) -> "DINOv3Config":
        """Raise :class:`ConfigValueError` naming the first bad field; return self."""

        def check(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ConfigValueError(name, getattr(self, name), rule)

        check(isinstance(self.backbone, str) and self.backbone.startswith("vit_"), "backbone",
              "must be a timm vit_* or vit_*_dinov3 model name")
        check(self.img_size > 0, "img_size", "must be > 0")
        for name in ("patch_size", "embed_dim", "depth", "num_heads"):
            v = getattr(self, name)
            check(v is None or v > 0, name, "must be None or > 0")
        check(self.n_register_tokens >= 0, "n_register_tokens", "must be >= 0")
        check(0.0 <= self.drop_path_rate < 1.0, "drop_path_rate", "must be in [0, 1)")
        check(self.layerscale_init is None or self.layerscale_init > 0, "layerscale_init", "must be None or > 0")
        check(self.pretrained_file is None or self.pretrained, "pretrained_file", "needs pretrained=True")
        check(self.pretrained_file is None or os.path.isfile(os.path.expanduser(str(self.pretrained_file))),
              "pretrained_file", "no such file")
        for name in ("head_hidden_dim", "head_bottleneck_dim", "n_cls_prototypes", "n_patch_prototypes",
                     "sinkhorn_iterations", "lr_reference_batch"):
            check(getattr(self, name) >= 1, name, "must be >= 1")
        for name in ("dino_weight", "ibot_weight", "koleo_weight", "gram_weight", "base_lr", "min_lr",
                     "weight_decay_start", "weight_decay_end", "clip_grad", "patch_embed_lr_mult",
                     "freeze_last_layer_epochs", "mask_ratio_spread", "gram_start_step",
                     "gram_refresh_every", "gram_max_refreshes"):
            check(getattr(self, name) >= 0, name, "must be >= 0")
        for name in ("temperature_student", "temperature_teacher", "teacher_temp_warmup_start"):
            check(getattr(self, name) > 0, name, "must be > 0")
        check(self.mask_strategy in MASK_STRATEGIES, "mask_strategy", f"must be one of {MASK_STRATEGIES}")
        check(0.0 <= self.mask_ratio < 1.0, "mask_ratio", "must be in [0, 1)")
        for name in ("mask_probability", "teacher_temp_warmup_frac", "lr_warmup_frac", "momentum_start",
                     "momentum_end"):
            check(0.0 <= getattr(self, name) <= 1.0, name, "must be in [0, 1]")
        check(self.mask_min_block_patches >= 1, "mask_min_block_patches", "must be >= 1")
        check(0.0 < self.mask_max_block_frac <= 1.0, "mask_max_block_frac", "must be in (0, 1]")
        check(0.0 < self.layerwise_decay <= 1.0, "layerwise_decay", "must be in (0, 1]")
        return self

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "DINOv3Config":
        """Build from plain keyword arguments; unknown keys raise ValueError naming them.

        The key ``name`` (the method's registry name in the platform config) is ignored.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in values.items() if k != "name"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown DINOv3Config field(s): {', '.join(unknown)}")
        return cls(**values)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def check_config(values: Mapping[str, Any]) -> None:
    """Validate the keyword dict :func:`dinov3.build_method` takes, building nothing.

    Raises :class:`ConfigValueError` naming the first bad field (ValueError for unknown keys)."""
    DINOv3Config.from_dict(values).validate()
