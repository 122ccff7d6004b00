"""rayssl.data: sources, validation and Ray Data pipelines (the ``data`` config group is
:class:`rayssl.config.DataConfig`).

Public API:

* :class:`SourceInfo`, :class:`DataSourceError`
* :func:`validate_source` (data config, no Ray) -> SourceInfo(n_train, n_eval, class_names)
* :func:`build_train_dataset` (data, seed, epochs, start_epoch=0, run_key="") -> ray.data.Dataset with
  ``global`` [2,3,G,G] / ``local`` [n_local,3,L,L] uint8 and ``epoch`` int64, epoch-ordered (with
  ``data.augment_on=gpu``: the crops before their photometric ops, plus ``global_params`` /
  ``local_params`` float32 [2|n_local, P] for the trainer)
* :func:`build_knn_dataset` (data, run_key="") -> the k-NN bank and queries in one dataset: ``image``
  uint8 [3,S,S], ``label`` int64, ``knn_split`` int64 (``KNN_BANK`` | ``KNN_QUERY``)
* :func:`read_concurrency` (data) -> read tasks in flight (``read_concurrency``, else one per 4 actors)
* :func:`ray_data_limits` (data) -> ExecutionOptions for ``ray.train.DataConfig`` (CPU cap
  :func:`rayssl.config.data_cpu_budget`; ``preserve_order``, needed for epoch order under Train)
* :func:`skip_stats` (data, run_key="") -> {"skipped", "events", "first_bad"}: bad images of that run so far
* :func:`convert_imagefolder` / :func:`ensure_cifar10`: Parquet preparation
"""

import importlib

# Loaded on first use (PEP 562): the training loop and the config layer use the light modules
# (spec, sources) without importing Ray Data.
_EXPORTS = {
    "KNN_BANK": "spec", "KNN_QUERY": "spec", "DataSourceError": "spec", "SourceInfo": "spec",
    "decode_image": "sources", "row_seed": "sources", "stable_hash": "sources", "validate_source": "catalog",
    "build_knn_dataset": "pipeline", "build_train_dataset": "pipeline", "ray_data_limits": "pipeline",
    "read_concurrency": "pipeline", "skip_counter_name": "pipeline", "skip_stats": "pipeline",
    "convert_imagefolder": "prepare", "ensure_cifar10": "cifar10",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rayssl.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"rayssl.data.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
