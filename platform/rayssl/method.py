"""The one door between the platform and an SSL method.

``rayssl`` reaches the method only through this module: its config schema (validated before
any Ray work), its builder, its multi-crop transforms (run by the data actors) and its
evaluation code. A method is registered in :data:`METHODS` by module paths, so importing
this door costs nothing: config validation loads only the method's config module, data
actors only its transforms.

A built method is an ``nn.Module`` with the members of :class:`SSLMethod`. Another method
plugs in with one :class:`MethodEntry`; its config class types the ``model`` and ``method``
groups (fields listed in ``model_fields`` go to ``model``, the rest to ``method``).
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Dict, List, Optional, Protocol, Tuple

if TYPE_CHECKING:  # annotations only: this module must import without torch
    import torch


@dataclass(frozen=True)
class MethodEntry:
    """Where a method's pieces live, as ``module:attribute`` paths."""

    builder: str  # (kwargs) -> SSLMethod
    config: str  # the config dataclass: fields, types and defaults of the model + method groups
    model_fields: str  # tuple of the config fields that describe the network (the model group)
    derived_fields: str  # fields the platform sets itself (img_size from data.global_size)
    check: str  # (kwargs) -> None, raising ValueError with .field/.value/.rule on a bad value
    schedules: str  # (kwargs, total_steps, steps_per_epoch, global_batch) -> dict of schedule lengths
    transforms: str  # module with MultiCropAugmentation, EvalTransform, normalize
    evaluation: str  # module with knn_classify, linear_probe


METHODS: Dict[str, MethodEntry] = {
    "dinov3": MethodEntry(
        builder="dinov3.model:build_method", config="dinov3.config:DINOv3Config",
        model_fields="dinov3.config:MODEL_FIELDS", derived_fields="dinov3.config:DERIVED_FIELDS",
        check="dinov3.config:check_config", schedules="dinov3.schedules:describe",
        transforms="dinov3.augment", evaluation="dinov3.evaluation"),
}
DEFAULT_METHOD = "dinov3"


class MethodConfigError(ValueError):
    """A model/method value the method rejects: ``field``, ``value``, ``rule``."""

    def __init__(self, field_name: str, value: Any, rule: str):
        super().__init__(f"{field_name}={value!r}: {rule}")
        self.field, self.value, self.rule = field_name, value, rule


class SSLMethod(Protocol):
    """What the training loop needs from a method (tensors on the training device).

    ``forward_backward`` runs one step's forward and backward pass(es) and returns an object
    with detached ``loss`` and ``loss_*`` scalars and ``metrics: dict[str, Tensor]``;
    ``runner`` is the module to call for forwards (the DDP-wrapped method under DDP, so its
    hooks all-reduce the gradients) and ``autocast`` a context factory for the forwards;
    ``loss_scale`` and ``sync=False`` serve gradient accumulation (scale each micro-batch's loss,
    all-reduce on the last one only).
    """

    def forward_backward(self, global_crops: "torch.Tensor", local_crops: Optional["torch.Tensor"], *,
                         runner: Optional["torch.nn.Module"] = None,
                         autocast: Optional[Callable[[], ContextManager]] = None,
                         loss_scale: float = 1.0, sync: bool = True) -> Any: ...

    def configure(self, total_steps: int, steps_per_epoch: int, global_batch_size: int) -> None: ...

    def param_groups(self) -> List[Dict[str, Any]]: ...

    def apply_schedules(self, optimizer: "torch.optim.Optimizer", step: int) -> Dict[str, float]: ...

    def clip_gradients(self) -> Dict[str, float]: ...

    def update_teacher(self, momentum: float) -> None: ...

    def embed(self, images: "torch.Tensor") -> "torch.Tensor": ...

    def compile(self) -> None: ...


REQUIRED = ("forward_backward", "configure", "param_groups", "apply_schedules", "clip_gradients",
            "update_teacher", "embed")


def _entry(name: str) -> MethodEntry:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} (known: {', '.join(METHODS)})")
    return METHODS[name]


def _load(path: str) -> Any:
    module, _, attr = path.partition(":")
    mod = importlib.import_module(module)
    return getattr(mod, attr) if attr else mod


def config_schemas(name: str = DEFAULT_METHOD) -> Tuple[type, type]:
    """(ModelConfig, MethodConfig) dataclasses typed and defaulted by the method's config class;
    MethodConfig starts with ``name`` (the registry key)."""
    entry = _entry(name)
    cls = _load(entry.config)
    hints = typing.get_type_hints(cls)
    model_fields, derived = set(_load(entry.model_fields)), set(_load(entry.derived_fields))

    def spec(f: dataclasses.Field):
        default = (dataclasses.field(default_factory=f.default_factory)
                   if f.default_factory is not dataclasses.MISSING else dataclasses.field(default=f.default))
        return f.name, hints[f.name], default

    fields = [f for f in dataclasses.fields(cls) if f.name not in derived]
    model = dataclasses.make_dataclass("ModelConfig", [spec(f) for f in fields if f.name in model_fields])
    method = dataclasses.make_dataclass(
        "MethodConfig", [("name", str, field(default=name))] + [spec(f) for f in fields if f.name not in model_fields])
    return model, method


def check_config(name: str, kwargs: Dict[str, Any]) -> None:
    """The method's own check of its keyword arguments; :class:`MethodConfigError` on a bad value."""
    try:
        _load(_entry(name).check)(kwargs)
    except MethodConfigError:
        raise
    except ValueError as err:
        if hasattr(err, "field"):
            raise MethodConfigError(err.field, getattr(err, "value", None), getattr(err, "rule", str(err))) from None
        raise


def schedule_summary(name: str, kwargs: Dict[str, Any], total_steps: int, steps_per_epoch: int,
                     global_batch: int) -> Dict[str, Any]:
    """The method's schedule lengths for a run: ``peak_lr``, ``warmup_steps``, ... (launch plans)."""
    return _load(_entry(name).schedules)(kwargs, total_steps, steps_per_epoch, global_batch)


def peak_lr(name: str, kwargs: Dict[str, Any], global_batch: int) -> float:
    return float(schedule_summary(name, kwargs, 1, 1, global_batch)["peak_lr"])


def build_method(name: str, kwargs: Dict[str, Any]) -> "torch.nn.Module":
    """Build the method ``name`` from plain keyword arguments."""
    method = _load(_entry(name).builder)(kwargs)
    missing = [m for m in REQUIRED if not hasattr(method, m)]
    if missing:
        raise TypeError(f"method {name!r} lacks {', '.join(missing)} (see rayssl.method.SSLMethod)")
    return method


def transforms(name: str = DEFAULT_METHOD):
    """The method's transform module (``MultiCropAugmentation``, ``EvalTransform``, ``normalize``,
    ``IMAGENET_MEAN/STD``): imports torch only, so data actors stay lean."""
    return _load(_entry(name).transforms)


def evaluation(name: str = DEFAULT_METHOD):
    """The method's evaluation module (``knn_classify``, ``linear_probe``)."""
    return _load(_entry(name).evaluation)


def loss_terms(output: Any) -> Dict[str, "torch.Tensor"]:
    """The scalar ``loss*`` fields of a method output plus its ``metrics`` dict."""
    import torch

    terms = {k: v for k, v in vars(output).items() if k.startswith("loss") and isinstance(v, torch.Tensor)}
    terms.update(getattr(output, "metrics", None) or {})
    return terms
