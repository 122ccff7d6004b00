"""Per-step schedules (recipe section 5), closed-form in the global step.

Every value is a pure function of ``step`` and ``total_steps``, so bounding a run by steps,
resuming mid-epoch or changing the epoch length never produces the per-epoch staircase
of the original module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict

from dinov3.config import DINOv3Config


def cosine(start: float, end: float, step: int, total: int) -> float:
    """Half-cosine from ``start`` (step 0) to ``end`` (step >= total)."""
    if total <= 0 or step >= total:
        return end
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * max(step, 0) / total))


def linear(start: float, end: float, step: int, total: int) -> float:
    """Linear from ``start`` (step 0) to ``end`` (step >= total)."""
    if total <= 0 or step >= total:
        return end
    return start + (end - start) * max(step, 0) / total


def peak_lr(cfg, global_batch_size: int) -> float:
    """``base_lr * sqrt(global_batch / lr_reference_batch)`` (DINOv2/v3's sqrt_wrt_1024 rule)."""
    return cfg.base_lr * math.sqrt(global_batch_size / cfg.lr_reference_batch)


@dataclass(frozen=True)
class Schedules:
    """Schedules of one run; build with :meth:`from_config`."""

    total_steps: int
    peak_lr: float
    min_lr: float
    warmup_steps: int
    wd_start: float
    wd_end: float
    momentum_start: float
    momentum_end: float
    teacher_temp_start: float
    teacher_temp: float
    teacher_temp_warmup_steps: int
    freeze_last_layer_steps: int

    @classmethod
    def from_config(cls, cfg, total_steps: int, steps_per_epoch: int, global_batch_size: int) -> "Schedules":
        """``cfg``: :class:`dinov3.config.DINOv3Config`. LR = base_lr * sqrt(global_batch / 1024)."""
        if total_steps < 1 or steps_per_epoch < 1 or global_batch_size < 1:
            raise ValueError(f"configure: total_steps={total_steps}, steps_per_epoch={steps_per_epoch}, "
                             f"global_batch_size={global_batch_size} must all be >= 1")
        return cls(
            total_steps=total_steps,
            peak_lr=peak_lr(cfg, global_batch_size),
            min_lr=cfg.min_lr,
            warmup_steps=int(cfg.lr_warmup_frac * total_steps),
            wd_start=cfg.weight_decay_start,
            wd_end=cfg.weight_decay_end,
            momentum_start=cfg.momentum_start,
            momentum_end=cfg.momentum_end,
            teacher_temp_start=cfg.teacher_temp_warmup_start,
            teacher_temp=cfg.temperature_teacher,
            teacher_temp_warmup_steps=int(cfg.teacher_temp_warmup_frac * total_steps),
            freeze_last_layer_steps=int(round(cfg.freeze_last_layer_epochs * steps_per_epoch)),
        )

    def lr(self, step: int) -> float:
        """Linear warm-up 0 -> peak over ``warmup_steps``, then cosine peak -> min_lr."""
        if step < self.warmup_steps:
            return self.peak_lr * step / self.warmup_steps
        return cosine(self.peak_lr, self.min_lr, step - self.warmup_steps, self.total_steps - self.warmup_steps)

    def weight_decay(self, step: int) -> float:
        return cosine(self.wd_start, self.wd_end, step, self.total_steps)

    def momentum(self, step: int) -> float:
        return cosine(self.momentum_start, self.momentum_end, step, self.total_steps)

    def teacher_temperature(self, step: int) -> float:
        return linear(self.teacher_temp_start, self.teacher_temp, step, self.teacher_temp_warmup_steps)

    def last_layer_frozen(self, step: int) -> bool:
        return step < self.freeze_last_layer_steps

    def values(self, step: int) -> Dict[str, float]:
        return {"lr": self.lr(step), "wd": self.weight_decay(step), "momentum": self.momentum(step),
                "teacher_temp": self.teacher_temperature(step)}


def describe(kwargs, total_steps: int, steps_per_epoch: int, global_batch_size: int) -> Dict[str, float]:
    """Schedule lengths of a run, for launch plans: peak lr and the warm-up, teacher-temperature
    and last-layer-freeze lengths in steps (``kwargs``: :func:`dinov3.build_method`'s)."""
    s = Schedules.from_config(DINOv3Config.from_dict(kwargs), total_steps, steps_per_epoch, global_batch_size)
    return {"peak_lr": s.peak_lr, "min_lr": s.min_lr, "warmup_steps": s.warmup_steps,
            "teacher_temp_warmup_steps": s.teacher_temp_warmup_steps,
            "freeze_last_layer_steps": s.freeze_last_layer_steps, "weight_decay": (s.wd_start, s.wd_end),
            "momentum": (s.momentum_start, s.momentum_end), "teacher_temp": (s.teacher_temp_start, s.teacher_temp)}
