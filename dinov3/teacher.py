"""EMA teacher (recipe section 4)."""

from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch.nn as nn


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with ``requires_grad=False`` everywhere, in eval mode (DDP skips it)."""
    teacher = copy.deepcopy(module)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def ema_update_(teacher_params: Iterable[torch.Tensor], student_params: Iterable[torch.Tensor],
                momentum: float) -> None:
    """In place ``t = m * t + (1 - m) * s`` over matching parameter lists.

    Mode-independent (no ``self.training`` check: an update in eval mode is not skipped).
    ``torch._foreach_*`` fuses the update into a few multi-tensor kernels.
    """
    teacher_params, student_params = list(teacher_params), list(student_params)
    if len(teacher_params) != len(student_params):
        raise ValueError(f"teacher has {len(teacher_params)} parameters, student {len(student_params)}")
    if momentum == 1.0:
        return  # exact no-op: t = 1 * t + 0 * s
    student = [s.detach().to(t.dtype) for t, s in zip(teacher_params, student_params)]
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student, alpha=1.0 - momentum)


@torch.no_grad()
def copy_params_(target: nn.Module, source: nn.Module) -> None:
    """``target <- source`` parameter-wise (e.g. refresh a frozen snapshot)."""
    torch._foreach_copy_(list(target.parameters()), [p.detach() for p in source.parameters()])
