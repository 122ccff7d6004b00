"""The data group's config (:class:`DataSpec`), source summary and errors. No Ray imports."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, List, Mapping, Optional

SOURCE_NAMES = ("synthetic", "imagefolder", "parquet", "cifar10")


class DataSourceError(ValueError):
    """A data source is missing, empty or unreadable; the message names the path."""


@dataclass
class DataSpec:
    """Plain dataclass mirror of the ``data`` config group (defaults: the quickstart).

    ``name``: synthetic | imagefolder | parquet | cifar10. ``path``: directory or URI
    (imagefolder/parquet), cache directory for cifar10, unused for synthetic.
    """

    name: str = "synthetic"
    path: Optional[str] = None
    global_size: int = 32
    local_size: int = 16
    n_local: int = 4
    blur: str = "nominal"           # nominal (recipe table) | official (released models)
    eval_size: int = 32
    num_actors: int = 1             # CPU actors running decode + multi-crop
    cpus_per_actor: float = 1.0     # logical CPUs each actor reserves
    map_batch_size: int = 64
    max_cpus: Optional[float] = None  # cap on Ray Data's CPU budget (None: num_actors * cpus_per_actor)
    read_concurrency: Optional[int] = None  # read tasks in flight (None: one per 4 actors, >= 1)
    knn_bank_size: Optional[int] = None   # None: every labelled train image
    knn_query_size: Optional[int] = None  # None: every held-out image
    synthetic_n_train: int = 2048
    synthetic_n_eval: int = 512
    synthetic_image_size: int = 32
    synthetic_seed: int = 0

    @classmethod
    def from_any(cls, obj: Any) -> "DataSpec":
        """DataSpec from a DataSpec, a dataclass with the same fields (rayssl.config.DataConfig)
        or a mapping; unknown keys are ignored."""
        if isinstance(obj, cls):
            return obj
        if dataclasses.is_dataclass(obj):
            obj = dataclasses.asdict(obj)
        if not isinstance(obj, Mapping):
            raise TypeError(f"cannot make a DataSpec from {type(obj).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in obj.items() if k in known})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class SourceInfo:
    """What :func:`validate_source` found: image counts and class names."""

    n_train: int
    n_eval: int
    class_names: List[str] = field(default_factory=list)
