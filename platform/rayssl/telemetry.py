"""Telemetry of the training loop: windows of step values, rates, and the collapse and
data-starvation warnings. No Ray, no MLflow: the loop logs what :meth:`Telemetry.flush` returns.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from typing import Callable, Dict, Mapping, Optional

log = logging.getLogger("rayssl.telemetry")

EPOCH_METRICS = ("loss", "loss_cls", "loss_patch", "loss_koleo")
COLLAPSE_FRACTION = 0.95  # teacher target entropy above this fraction of ln K: near-uniform collapse
DATA_WAIT_WARN = 0.2  # a window that waited for data more than this share of its time gets a warning


def data_starvation_hint(wait_frac: float, num_actors: int, cpus_per_actor: float,
                         max_cpus: Optional[float] = None) -> Optional[str]:
    """Advice when the step waited for the next batch more than DATA_WAIT_WARN of a window, else None.

    The stream is then the bottleneck and delivers what its actors make; the step alone would
    run 1 / (1 - wait_frac) times as fast, so about actors / (1 - wait_frac) actors keep it fed.
    """
    if wait_frac <= DATA_WAIT_WARN:
        return None
    need = math.ceil(num_actors / max(1.0 - wait_frac, 0.05))
    cap = f", data.max_cpus={max_cpus:g}" if max_cpus is not None else ""
    return (f"the step waited for data {100 * wait_frac:.0f}% of the time (data_wait_frac {wait_frac:.2f}): "
            f"the multi-crop actors are the bottleneck; about {need} actors would keep up (now "
            f"data.num_actors={num_actors}{cap}, {cpus_per_actor:g} CPU each)")


class Telemetry:
    """Sums of each step's values over a window of ``every`` steps (and over the epoch for the
    loss terms), the window's images/s and data-wait share, and the warnings they raise.

    ``add`` takes one step's values; ``flush`` returns the window's means as ``train/<key>``
    plus ``train/images_per_s``, ``train/data_wait_frac`` and ``collapse_warning``, and starts
    the next window. ``wait`` accumulates the seconds the loop waited for a batch.
    """

    def __init__(self, every: int, images_per_step: int, n_prototypes: int,
                 starvation_hint: Callable[[float], Optional[str]] = lambda frac: None,
                 memory: Callable[[], Optional[float]] = lambda: None, warn: bool = True):
        self.every, self.images_per_step = every, images_per_step
        self.collapse_entropy = COLLAPSE_FRACTION * math.log(n_prototypes)
        self.n_prototypes = n_prototypes
        self.starvation_hint, self.memory, self.warn = starvation_hint, memory, warn
        self.sums: Dict[str, float] = defaultdict(float)
        self.epoch_sums: Dict[str, float] = defaultdict(float)
        self.steps, self.wait = 0, 0.0
        self.last: Dict[str, float] = {}
        self.warned_collapse = self.warned_wait = False
        self.start = time.perf_counter()

    def restart(self) -> None:
        """Start the window now (e.g. after an initial evaluation it must not time)."""
        self.sums.clear()
        self.steps, self.wait, self.start = 0, 0.0, time.perf_counter()

    def add(self, values: Mapping[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] += float(v)
            if k in EPOCH_METRICS:
                self.epoch_sums[k] += float(v)
        self.steps += 1

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def flush(self, step: int, epoch_end: bool = False) -> Dict[str, float]:
        """The window's metrics; warns (at most once between epoch ends) on collapse or starvation."""
        wall = max(time.perf_counter() - self.start, 1e-9)
        n = max(self.steps, 1)
        out = {f"train/{k}": v / n for k, v in self.sums.items()}
        out["train/images_per_s"] = self.steps * self.images_per_step / wall
        out["train/data_wait_frac"] = self.wait / wall
        mem = self.memory()
        if mem is not None:
            out["train/peak_gpu_mem_gib"] = mem
        entropy = out.get("train/teacher_entropy")
        if entropy is not None:
            collapsed = entropy > self.collapse_entropy
            out["collapse_warning"] = float(collapsed)
            if collapsed and self.warn and (epoch_end or not self.warned_collapse):
                self.warned_collapse = True
                log.warning("step %d: teacher target entropy %.4f > %.2f ln(K=%d) = %.4f: the teacher is near "
                            "uniform collapse", step, entropy, COLLAPSE_FRACTION, self.n_prototypes,
                            self.collapse_entropy)
        # not after the first window: it also holds the stream's start-up
        if self.warn and self.last and (epoch_end or not self.warned_wait):
            hint = self.starvation_hint(out["train/data_wait_frac"])
            if hint:
                self.warned_wait = True
                log.warning("step %d: %s", step, hint)
        self.last = out
        self.restart()
        return out

    def epoch_means(self, steps: int, reduce: Callable[[Dict[str, float]], Dict[str, float]] = dict
                    ) -> Dict[str, float]:
        """Means of the loss terms over the epoch's ``steps`` (``reduce``: the mean over workers)."""
        out = {k: v / steps for k, v in reduce(dict(self.epoch_sums)).items()}
        self.epoch_sums.clear()
        return out
