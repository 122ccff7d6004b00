"""Promotion-based asynchronous successive halving (ASHA, Li et al. 2020, Algorithm 2).

Ray's ``ASHAScheduler`` is the *stopping* variant: a trial reaching a rung continues
unless it falls below the rung's quantile *so far*, so the first trials to reach a rung
always continue and, with a handful of trials, several run to ``max_t`` on no evidence.
The paper's variant *promotes* instead: a trial reaching rung ``k`` pauses there, and a
paused trial resumes only once it is among the top ``floor(n_k / eta)`` of the ``n_k``
results rung ``k`` holds. Apart from the paper's "mispromotions" (a trial promoted early
that later arrivals push out of the top), rung ``k`` sends on ``floor(n_k / eta)`` trials as
synchronous successive halving does: an 8-trial sweep with ``eta = 2`` trains about
8*1 + 4*1 + 2*2 + 1*4 = 20 trial-epochs, against 64 without early stopping.

Pausing stops the trial's actor (and its Train run); resuming starts the trial function
again, and its Train run resumes from its own last checkpoint (same run name), so trials
must checkpoint at every rung (``train.checkpoint_every: 0`` checkpoints every epoch).

A freed slot goes to a promotable paused trial first and to a new trial otherwise; new
trials come from the search algorithm through :class:`ActiveTrialGate`, which counts
running trials only (Tune's own concurrency limits count paused trials as live and would
deadlock). When nothing runs and no new trial is coming, the best trial of the highest
rung is promoted if none was (so one trial always reaches ``max_t``), and the rest stop.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Dict, List, Optional, Set

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import SearchAlgorithm

log = logging.getLogger("rayssl.schedulers")


class PromotionASHA(FIFOScheduler):
    """Rungs at ``grace_period * reduction_factor**k < max_t`` of ``time_attr``.

    ``max_active``: trials allowed to run at once (paused ones do not count).
    """

    def __init__(self, time_attr: str, max_t: int, grace_period: int, reduction_factor: int, max_active: int,
                 metric: Optional[str] = None, mode: Optional[str] = None):
        super().__init__()
        if grace_period < 1 or reduction_factor < 2 or max_t <= grace_period:
            raise ValueError(f"need 1 <= grace_period < max_t and reduction_factor >= 2, got "
                             f"grace_period={grace_period}, max_t={max_t}, reduction_factor={reduction_factor}")
        self._time_attr, self._max_t, self._eta = time_attr, max_t, reduction_factor
        self._metric, self._mode = metric, mode
        self.max_active = max_active
        self.milestones: List[int] = []
        r = grace_period
        while r < max_t:
            self.milestones.append(r)
            r *= reduction_factor
        self.rungs: List[Dict[str, float]] = [{} for _ in self.milestones]  # trial id -> score (higher is better)
        self.promoted: List[Set[str]] = [set() for _ in self.milestones]
        self.paused_at: Dict[str, int] = {}  # trial id -> rung index it waits at
        self._trials: Optional[Callable[[], List[Trial]]] = None  # tune_controller.get_trials, once Tune calls us

    def set_search_properties(self, metric: Optional[str], mode: Optional[str], **spec) -> bool:
        self._metric = self._metric or metric
        self._mode = self._mode or mode
        return True

    # ---- decisions -------------------------------------------------------------------
    def _score(self, result: Dict) -> float:
        value = float(result[self._metric])
        if math.isnan(value):
            return -math.inf
        return value if self._mode == "max" else -value

    def _top(self, k: int) -> List[str]:
        """The trial ids rung ``k`` may promote: its best ``floor(n_k / eta)`` results."""
        rung = self.rungs[k]
        n = len(rung) // self._eta
        return sorted(rung, key=rung.get, reverse=True)[:n]

    def _promotable(self, k: int, trial_id: str) -> bool:
        return trial_id not in self.promoted[k] and trial_id in self._top(k)

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        self._trials = tune_controller.get_trials

    def on_trial_result(self, tune_controller, trial: Trial, result: Dict) -> str:
        self._trials = tune_controller.get_trials
        if self._time_attr not in result or self._metric not in result:
            return TrialScheduler.CONTINUE
        t = result[self._time_attr]
        if t >= self._max_t:
            return TrialScheduler.CONTINUE  # the trial ends by itself
        tid = trial.trial_id
        # the highest rung this result reaches that has no result of this trial yet
        k = max((i for i, m in enumerate(self.milestones) if t >= m and tid not in self.rungs[i]), default=None)
        if k is None:
            return TrialScheduler.CONTINUE
        self.rungs[k][tid] = self._score(result)
        if self._promotable(k, tid):
            self.promoted[k].add(tid)
            log.info("trial %s promoted at %s=%d (%s %.4g, %d results at this rung)", tid, self._time_attr, t,
                     self._metric, result[self._metric], len(self.rungs[k]))
            return TrialScheduler.CONTINUE
        self.paused_at[tid] = k
        log.info("trial %s paused at %s=%d (%s %.4g, %d results at this rung)", tid, self._time_attr, t,
                 self._metric, result[self._metric], len(self.rungs[k]))
        return TrialScheduler.PAUSE

    def _forget(self, trial: Trial) -> None:
        self.paused_at.pop(trial.trial_id, None)

    def on_trial_complete(self, tune_controller, trial: Trial, result: Dict) -> None:
        self._forget(trial)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        self._forget(trial)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        self._forget(trial)

    # ---- slots -----------------------------------------------------------------------
    def active(self) -> int:
        """Trials running or about to (paused, finished and failed ones hold no slot)."""
        if self._trials is None:
            return 0
        return sum(t.status in (Trial.RUNNING, Trial.PENDING) for t in self._trials())

    def next_promotion(self, trials: List[Trial]) -> Optional[Trial]:
        """A paused trial that rung statistics now promote, highest rung first."""
        paused = {t.trial_id: t for t in trials if t.status == Trial.PAUSED and t.trial_id in self.paused_at}
        for k in reversed(range(len(self.milestones))):
            for tid in self._top(k):
                if tid in paused and self.paused_at[tid] == k and tid not in self.promoted[k]:
                    return paused[tid]
        return None

    def accepts_new_trial(self) -> bool:
        """For :class:`ActiveTrialGate`: a free slot that no paused trial is owed."""
        if self.active() >= self.max_active:
            return False
        return self._trials is None or self.next_promotion(self._trials()) is None

    def choose_trial_to_run(self, tune_controller) -> Optional[Trial]:
        self._trials = tune_controller.get_trials
        trials = tune_controller.get_trials()
        for trial in trials:
            if trial.status == Trial.PENDING:
                return trial
        if self.active() >= self.max_active:
            return None
        trial = self.next_promotion(trials)
        if trial is None and self.active() == 0 and tune_controller.search_alg.is_finished():
            trial = self._finish(tune_controller, trials)
        if trial is not None:
            k = self.paused_at.pop(trial.trial_id)
            self.promoted[k].add(trial.trial_id)
            log.info("resuming trial %s (promoted from %s=%d)", trial.trial_id, self._time_attr, self.milestones[k])
        return trial

    def _finish(self, tune_controller, trials: List[Trial]) -> Optional[Trial]:
        """Nothing runs and nothing new comes: make sure one trial reaches max_t, stop the rest."""
        paused = [t for t in trials if t.status == Trial.PAUSED and t.trial_id in self.paused_at]
        if not paused:
            return None
        top = max(self.paused_at[t.trial_id] for t in paused)
        if not self.promoted[top]:
            waiting = [t for t in paused if self.paused_at[t.trial_id] == top]
            return max(waiting, key=lambda t: self.rungs[top][t.trial_id])
        for t in paused:
            log.info("stopping trial %s: not promoted past %s=%d", t.trial_id, self._time_attr,
                     self.milestones[self.paused_at[t.trial_id]])
            tune_controller.stop_trial(t)
        return None

    def debug_string(self) -> str:
        rungs = ", ".join(f"{self._time_attr} {m}: {len(r)} results, {len(p)} promoted"
                          for m, r, p in zip(self.milestones, self.rungs, self.promoted))
        return f"PromotionASHA (eta {self._eta}, max_t {self._max_t}, {self.max_active} at a time): {rungs}"


class ActiveTrialGate(SearchAlgorithm):
    """Hands out the wrapped search algorithm's trials only while ``scheduler`` has a slot
    for a new one (its running trials, paused ones excluded, and no paused trial owed it)."""

    def __init__(self, search_alg: SearchAlgorithm, scheduler: PromotionASHA):
        self.search_alg = search_alg
        self.scheduler = scheduler

    def next_trial(self) -> Optional[Trial]:
        if not self.scheduler.accepts_new_trial():
            return None
        return self.search_alg.next_trial()

    def __getattr__(self, name):  # everything else is the wrapped algorithm's
        if name in ("search_alg", "scheduler"):
            raise AttributeError(name)
        return getattr(self.search_alg, name)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.search_alg.set_search_properties(metric, mode, config, **spec)

    def add_configurations(self, experiments) -> None:
        self.search_alg.add_configurations(experiments)

    def is_finished(self) -> bool:
        return self.search_alg.is_finished()

    def set_finished(self) -> None:
        self.search_alg.set_finished()

    def on_trial_result(self, trial_id: str, result: Dict) -> None:
        self.search_alg.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: Optional[Dict] = None, error: bool = False) -> None:
        self.search_alg.on_trial_complete(trial_id, result=result, error=error)

    @property
    def metric(self):
        return self.search_alg.metric

    @property
    def total_samples(self) -> int:
        return self.search_alg.total_samples

    def has_checkpoint(self, dirpath: str) -> bool:
        return self.search_alg.has_checkpoint(dirpath)

    def save_to_dir(self, dirpath: str, **kwargs) -> None:
        self.search_alg.save_to_dir(dirpath, **kwargs)

    def restore_from_dir(self, dirpath: str) -> None:
        self.search_alg.restore_from_dir(dirpath)
