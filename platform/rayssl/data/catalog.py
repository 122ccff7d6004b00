"""The sources by name: where each one's rows are and whether it is usable (driver side, no Ray).

``validate_source(spec)`` checks a source before any Ray work and counts its images;
``parquet_dir(spec)`` is the Parquet directory behind ``parquet`` and ``cifar10`` (CIFAR-10 is
downloaded and converted on first use, unless ``download=False``); ``prepare`` converts any
source to Parquet shards (experiments/prepare_data.py).
"""

from __future__ import annotations

import json
import os
from typing import Dict, Optional

from rayssl.data import cifar10
from rayssl.data.prepare import MANIFEST, convert_imagefolder
from rayssl.data.sources import (check_imagefolder_splits, check_parquet_splits, list_imagefolder, list_parquet,
                                 resolve_spec)
from rayssl.config import DataConfig
from rayssl.data.spec import SOURCE_NAMES, DataSourceError, SourceInfo
from rayssl.data.synthetic import CLASS_NAMES


def parquet_dir(spec: DataConfig, download: bool = True) -> str:
    """The Parquet directory of a ``parquet`` or ``cifar10`` source (CIFAR-10 made on first use)."""
    if spec.name != "cifar10":
        return spec.path
    if not spec.path:
        raise DataSourceError("data.path (the CIFAR-10 cache directory) is required for data=cifar10")
    if not download and not cifar10.is_prepared(spec.path):
        raise DataSourceError(f"data.path={spec.path}: CIFAR-10 is not downloaded there yet (the first real run "
                              f"downloads and converts it, or: python experiments/prepare_data.py source=cifar10 "
                              f"output={spec.path})")
    return cifar10.ensure_cifar10(spec.path)


def validate_source(spec, download: bool = True) -> SourceInfo:
    """Check the source exists and is non-empty; returns SourceInfo(n_train, n_eval, class_names).

    Raises DataSourceError naming the path. ``download=False`` never fetches CIFAR-10.
    """
    spec = resolve_spec(spec)
    if spec.name not in SOURCE_NAMES:
        raise DataSourceError(f"data.name={spec.name!r}: must be one of {', '.join(SOURCE_NAMES)}")
    if spec.name == "synthetic":
        if spec.synthetic_n_train < 1:
            raise DataSourceError(f"data.synthetic_n_train={spec.synthetic_n_train}: must be >= 1")
        if spec.synthetic_n_eval < 1:
            raise DataSourceError(f"data.synthetic_n_eval={spec.synthetic_n_eval}: must be >= 1 (the k-NN "
                                  f"evaluation needs held-out images)")
        return SourceInfo(int(spec.synthetic_n_train), int(spec.synthetic_n_eval), list(CLASS_NAMES))
    if spec.name == "imagefolder":
        lst = list_imagefolder(spec.path)
        check_imagefolder_splits(lst)
        return SourceInfo(len(lst.train), len(lst.eval), list(lst.class_names))
    lst = list_parquet(parquet_dir(spec, download))
    check_parquet_splits(lst)
    return SourceInfo(lst.n_train, lst.n_eval, list(lst.class_names))


def prepare(source: str, output: str, resize: Optional[int] = None, shard_size: int = 5000,
            progress: bool = True, force: bool = False) -> Dict:
    """experiments/prepare_data.py: ``source`` (an ImageFolder directory/URI or 'cifar10') as Parquet
    shards under ``output``; returns the manifest."""
    if source == "cifar10":
        cifar10.ensure_cifar10(output, shard_size=shard_size, progress=progress, force=force)
        with open(os.path.join(output, MANIFEST)) as f:
            return json.load(f)
    if not source:
        raise DataSourceError("source is required (an ImageFolder directory/URI or 'cifar10')")
    return convert_imagefolder(source, output, resize=resize, shard_size=shard_size, progress=progress, force=force)
