"""Data-layer errors, the source summary and the k-NN split values (the data config itself is
:class:`rayssl.config.DataConfig`). No Ray imports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from rayssl.config import SOURCES as SOURCE_NAMES  # noqa: F401  (the names a source may have)

KNN_BANK, KNN_QUERY = 0, 1  # values of the k-NN dataset's ``knn_split`` column


class DataSourceError(ValueError):
    """A data source is missing, empty or unreadable; the message names the path."""


@dataclass
class SourceInfo:
    """What :func:`validate_source` found: image counts and class names."""

    n_train: int
    n_eval: int
    class_names: List[str] = field(default_factory=list)
