"""k-NN evaluation of the teacher during training (rank 0), with a PCA picture of patch features.

Ray-free: the labelled eval images arrive from ``batches()`` (the Ray adapter streams the
k-NN dataset; tests pass tensors). The decoded set is kept in memory after the first pass
when it is small enough, so later evaluations cost only the teacher's forward passes.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch

from rayssl import method as method_door
from rayssl.data.spec import KNN_BANK, KNN_QUERY

log = logging.getLogger("rayssl.evaluator")

PCA_IMAGES = 4  # held-out images in the PCA picture at each evaluation
EVAL_ATTEMPTS = 3  # the eval set is re-read from the start after a transient failure
EVAL_CACHE_BYTES = 2 << 30  # keep the decoded bank + queries in memory up to 2 GiB

EvalBatches = Callable[[], Iterable[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]


class KnnEvaluator:
    """Weighted k-NN top-1 (%) of teacher CLS features: labelled train bank vs held-out queries.

    ``batches()`` yields ``(images uint8 [b,3,S,S], labels [b], knn_split [b])``;
    ``picture(method, images, step)`` (optional) logs the PCA picture of the first queries.
    """

    def __init__(self, batches: EvalBatches, device: torch.device, every_epochs: int, k: int, epochs: int,
                 picture: Optional[Callable[[Any, torch.Tensor, int], None]] = None, method_name: str = "dinov3"):
        self.batches, self.device = batches, device
        self.every_epochs, self.k, self.epochs = every_epochs, k, epochs
        self.picture, self.knn = picture, method_door.evaluation(method_name).knn_classify
        self.cache: Optional[Tuple[torch.Tensor, ...]] = None

    def due(self, epoch: int) -> bool:
        return epoch % self.every_epochs == 0 or epoch == self.epochs

    @torch.no_grad()
    def run(self, method, step: int) -> Dict[str, float]:
        was_training = method.training
        method.eval()
        try:
            for attempt in range(1, EVAL_ATTEMPTS + 1):
                try:
                    feats, labels, split, first_queries = self._features(method)
                    break
                except Exception as err:  # noqa: BLE001  e.g. Ray Data's actors failing to start on a busy node
                    if attempt == EVAL_ATTEMPTS:
                        raise
                    log.warning("k-NN evaluation at step %d failed (attempt %d of %d), retrying: %s",
                                step, attempt, EVAL_ATTEMPTS, err)
                    time.sleep(2.0 * attempt)
            if self.picture is not None and first_queries is not None:
                try:
                    self.picture(method, first_queries, step)
                except Exception as err:  # noqa: BLE001  a picture must never stop training
                    log.warning("could not log the PCA picture at step %d: %s", step, err)
        finally:
            method.train(was_training)
        bank, query = split == KNN_BANK, split == KNN_QUERY
        n_classes = int(labels.max()) + 1
        ks = sorted({10, self.k, 100})
        acc = self.knn(feats[bank], labels[bank], feats[query], labels[query], ks=tuple(ks), n_classes=n_classes)
        out = {"knn_top1": float(acc[self.k])}
        out.update({f"knn_top1_k{k}": float(v) for k, v in acc.items()})
        return out

    def _features(self, method):
        xs, ys, splits, queries = [], [], [], []
        for images, labels, split in self._eval_batches():
            if sum(len(q) for q in queries) < PCA_IMAGES:
                queries.append(images[split == KNN_QUERY][:PCA_IMAGES])
            xs.append(method.embed(images).float())
            ys.append(labels)
            splits.append(split)
        first = torch.cat(queries)[:PCA_IMAGES] if queries else None
        return (torch.cat(xs), torch.cat(ys), torch.cat(splits),
                first if first is not None and len(first) else None)

    def _eval_batches(self, batch_size: int = 256):
        """The eval set on the device: streamed the first time, then from memory when it fits."""
        if self.cache is not None:
            for i in range(0, len(self.cache[0]), batch_size):
                yield tuple(c[i:i + batch_size].to(self.device) for c in self.cache)
            return
        kept, n_bytes = [], 0
        for columns in self.batches():
            n_bytes += columns[0].numel()
            if n_bytes <= EVAL_CACHE_BYTES:
                kept.append(tuple(c.cpu() for c in columns))
            yield tuple(c.to(self.device) for c in columns)
        if n_bytes <= EVAL_CACHE_BYTES and kept:
            self.cache = tuple(torch.cat(c) for c in zip(*kept))
