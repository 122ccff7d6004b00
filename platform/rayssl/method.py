"""The one door between the platform and an SSL method.

``rayssl`` never reaches into ``dinov3`` beyond this module. A method is any
``torch.nn.Module`` with the members of :class:`SSLMethod`, built by a function
registered in :data:`METHODS` (``"module:function"``) from plain keyword
arguments. Another method plugs in by adding one line here (or by naming its
builder as ``method.name=my_pkg.module:build``).
"""

from __future__ import annotations

import importlib
from typing import Any, Dict, List, Optional, Protocol, runtime_checkable

import torch

METHODS: Dict[str, str] = {
    "dinov3": "dinov3:build_method",
}
# Optional: a method's own config check (same kwargs, builds nothing, raises ValueError),
# run by rayssl.config.validate before any Ray work.
CONFIG_CHECKS: Dict[str, str] = {
    "dinov3": "dinov3:check_config",
}


@runtime_checkable
class SSLMethod(Protocol):
    """What the train loop needs from a method (all tensors on the training device).

    ``forward(global_crops [B,2,3,G,G] uint8, local_crops [B,n,3,L,L] uint8 | None)``
    returns an object with ``loss`` (differentiable), detached ``loss_*`` scalars
    and ``metrics: dict[str, Tensor]``.
    """

    def forward(self, global_crops: torch.Tensor, local_crops: Optional[torch.Tensor]) -> Any: ...

    def configure(self, total_steps: int, steps_per_epoch: int, global_batch_size: int) -> None: ...

    def param_groups(self) -> List[Dict[str, Any]]: ...

    def apply_schedules(self, optimizer: torch.optim.Optimizer, step: int) -> Dict[str, float]: ...

    def clip_gradients(self) -> Dict[str, float]: ...

    def update_teacher(self, momentum: float) -> None: ...

    def embed(self, images: torch.Tensor) -> torch.Tensor: ...

    def compile(self) -> None: ...  # train.compile: nn.Module.compile, or the method's own override

    # Optional: ``backward_parts(n_local) -> tuple of str``. The train loop then calls
    # ``forward(..., part=p)`` and backward once per part, in order (see method_parts).


def _resolve(name: str):
    target = METHODS.get(name, name)
    if ":" not in target:
        raise ValueError(f"method.name={name!r}: unknown method (known: {', '.join(METHODS)}) "
                         "and not a 'module:function' path")
    module, func = target.split(":", 1)
    return getattr(importlib.import_module(module), func)


def check_method_config(name: str, kwargs: Dict[str, Any]) -> None:
    """Run the method's own config check, when it registers one (ValueError on a bad value)."""
    target = CONFIG_CHECKS.get(name)
    if target is not None:
        module, func = target.split(":", 1)
        getattr(importlib.import_module(module), func)(kwargs)


def build_method(name: str, kwargs: Dict[str, Any]) -> torch.nn.Module:
    """Build the method ``name`` from plain keyword arguments."""
    method = _resolve(name)(kwargs)
    missing = [m for m in ("configure", "param_groups", "apply_schedules", "clip_gradients",
                           "update_teacher", "embed") if not hasattr(method, m)]
    if missing:
        raise TypeError(f"method {name!r} lacks {', '.join(missing)} (see rayssl.method.SSLMethod)")
    return method


def method_parts(method: torch.nn.Module, local_crops: Optional[torch.Tensor]) -> tuple:
    """The ``part=`` values of one step (``method.backward_parts``), or ``(None,)``: one forward
    and one backward without a ``part`` argument."""
    parts = getattr(method, "backward_parts", None)
    if parts is None:
        return (None,)
    return tuple(parts(0 if local_crops is None else local_crops.shape[1]))


def loss_terms(output: Any) -> Dict[str, torch.Tensor]:
    """The scalar ``loss*`` fields of a method output plus its ``metrics`` dict."""
    terms = {k: v for k, v in vars(output).items() if k.startswith("loss") and isinstance(v, torch.Tensor)}
    terms.update(getattr(output, "metrics", None) or {})
    return terms


def knn_classify(bank_feats: torch.Tensor, bank_labels: torch.Tensor, query_feats: torch.Tensor,
                 query_labels: torch.Tensor, ks, n_classes: int) -> Dict[int, float]:
    """Weighted k-NN top-1 (%) per k, DINO protocol (evaluation code lives with the method)."""
    from dinov3.evaluation import knn_classify as _knn

    return _knn(bank_feats, bank_labels, query_feats, query_labels, ks=tuple(ks), n_classes=n_classes)
