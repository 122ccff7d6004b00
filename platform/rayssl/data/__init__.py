"""rayssl.data: sources, validation and Ray Data pipelines for DINOv3 training.

Public API:

* :class:`DataSpec` (the ``data`` config group), :class:`SourceInfo`, :class:`DataSourceError`
* :func:`validate_source` (driver side, no Ray) -> SourceInfo(n_train, n_eval, class_names)
* :func:`build_train_dataset` (spec, seed, epochs, start_epoch=0, run_key="") -> ray.data.Dataset with
  ``global`` [2,3,G,G] / ``local`` [n_local,3,L,L] uint8 and ``epoch`` int64, epoch-ordered
* :func:`build_knn_dataset` (spec, run_key="") -> the k-NN bank and queries in one dataset: ``image``
  uint8 [3,S,S], ``label`` int64, ``knn_split`` int64 (``KNN_BANK`` | ``KNN_QUERY``)
* :func:`train_actor_count` (spec) -> the multi-crop actors the train stream runs
* :func:`read_concurrency` (spec) -> read tasks in flight (``read_concurrency``, else one per 4 actors)
* :func:`ray_data_limits` (spec) -> ExecutionOptions for ``ray.train.DataConfig``
  (CPU cap :func:`data_cpu_budget`: ``max_cpus``, else ``num_actors * cpus_per_actor``;
  ``preserve_order``, needed for epoch order under Train)
* :func:`skip_stats` (spec, run_key="") -> {"skipped", "events", "first_bad"}: bad images of that run so far
  (log ``skipped`` as ``data_skipped``)
* :func:`convert_imagefolder` / :func:`ensure_cifar10`: Parquet preparation
"""

from rayssl.data.spec import DataSourceError, DataSpec, SourceInfo
from rayssl.data.sources import decode_image, row_seed, stable_hash, validate_source
from rayssl.data.pipeline import (KNN_BANK, KNN_QUERY, build_knn_dataset, build_train_dataset, data_cpu_budget,
                                  ray_data_limits, read_concurrency, skip_counter_name, skip_stats,
                                  train_actor_count)
from rayssl.data.prepare import convert_imagefolder
from rayssl.data.cifar10 import ensure_cifar10

__all__ = ["DataSpec", "SourceInfo", "DataSourceError", "validate_source", "build_train_dataset",
           "build_knn_dataset", "KNN_BANK", "KNN_QUERY", "ray_data_limits", "data_cpu_budget", "train_actor_count", "read_concurrency", "skip_stats", "skip_counter_name",
           "convert_imagefolder", "ensure_cifar10", "decode_image", "row_seed", "stable_hash"]
