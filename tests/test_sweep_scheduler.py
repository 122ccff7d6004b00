"""PromotionASHA's decisions, driven the way Tune drives a scheduler (one result at a time,
``choose_trial_to_run`` whenever a slot frees), against successive halving worked by hand."""

import math
import random

import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from rayssl.schedulers import ActiveTrialGate, PromotionASHA


class _Trial:
    def __init__(self, trial_id: str):
        self.trial_id, self.status = trial_id, Trial.PENDING


class _Search:
    """A search algorithm with ``n`` trials to hand out."""

    def __init__(self, n: int):
        self.left, self.made = n, 0

    def next_trial(self):
        if self.left == 0:
            return None
        self.left -= 1
        self.made += 1
        return _Trial(str(self.made - 1))

    def is_finished(self) -> bool:
        return self.left == 0


class _Controller:
    """What Tune hands a scheduler: the trials, the search algorithm, stop_trial."""

    def __init__(self, n: int):
        self.trials, self.search_alg = [], _Search(n)

    def get_trials(self):
        return list(self.trials)

    def stop_trial(self, trial):
        trial.status = Trial.TERMINATED


def run(curves, max_t, grace, eta, max_active, seed=0):
    """Simulate a sweep: each running trial reports epochs in a random interleaving.

    Returns (epochs trained per trial, peak number of trials running at once)."""
    rng = random.Random(seed)
    sched = PromotionASHA("epoch", max_t, grace, eta, max_active, metric="knn", mode="max")
    ctl = _Controller(len(curves))
    gate = ActiveTrialGate(ctl.search_alg, sched)
    epochs = {}
    peak = 0
    for _ in range(10_000):
        while (new := gate.next_trial()) is not None:  # Tune: ask the searcher, add what it gives
            ctl.trials.append(new)
            sched.on_trial_add(ctl, new)
        for t in ctl.trials:
            if t.status == Trial.PENDING:
                t.status = Trial.RUNNING
        chosen = sched.choose_trial_to_run(ctl)
        if chosen is not None:
            chosen.status = Trial.RUNNING
        running = [t for t in ctl.trials if t.status == Trial.RUNNING]
        peak = max(peak, len(running))
        if not running:
            if ctl.search_alg.is_finished() and sched.choose_trial_to_run(ctl) is None:
                break
            continue
        t = rng.choice(running)
        i = int(t.trial_id)
        epochs[i] = epochs.get(i, 0) + 1
        decision = sched.on_trial_result(ctl, t, {"epoch": epochs[i], "knn": curves[i][epochs[i] - 1]})
        if epochs[i] >= max_t:
            t.status = Trial.TERMINATED
            sched.on_trial_complete(ctl, t, {})
        elif decision == TrialScheduler.PAUSE:
            t.status = Trial.PAUSED
        else:
            assert decision == TrialScheduler.CONTINUE
    assert all(t.status == Trial.TERMINATED for t in ctl.trials)
    return epochs, peak


def test_rungs_follow_grace_period_and_reduction_factor():
    assert PromotionASHA("epoch", 8, 1, 2, 2).milestones == [1, 2, 4]
    assert PromotionASHA("epoch", 8, 1, 3, 2).milestones == [1, 3]
    assert PromotionASHA("epoch", 100, 2, 4, 2).milestones == [2, 8, 32]
    with pytest.raises(ValueError, match="reduction_factor"):
        PromotionASHA("epoch", 8, 1, 1, 2)


QUALITY = [4, 2, 7, 3, 1, 8, 3.5, 6]  # trial 5 > 2 > 7 > 0 > 6 > 3 > 1 > 4


def test_one_at_a_time_matches_the_sequence_worked_by_hand():
    # eta 2, rungs at epochs 1, 2, 4, max_t 8, one trial at a time, trials arrive in order.
    # t0 pauses at 1 (1 result, top 0); t1 pauses at 1 (top-1 is t0); t0 is owed the slot:
    # resumes, pauses at 2. t2 (7) tops rung 1 (3 results, top 1) and rung 2, pauses at 4.
    # t3, t4 pause at 1 (top 2 = t2, t0). t5 (8) is top everywhere: 1 -> 2 -> 4 -> 8.
    # t6 pauses at 1 (top 3 = t5, t2, t0). t7 (6): 8 results, top 4 = t5, t2, t7, t0 ->
    # promoted, pauses at 2 (4 results, top 2 = t5, t2). Drain: rung 4 already sent t5 to 8.
    curves = [[q + e / 100 for e in range(8)] for q in QUALITY]
    epochs, peak = run(curves, max_t=8, grace=1, eta=2, max_active=1)
    assert peak == 1
    assert epochs == {0: 2, 1: 1, 2: 4, 3: 1, 4: 1, 5: 8, 6: 1, 7: 2}  # 20 trial-epochs


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("max_active", [2, 3])
def test_concurrent_trials_stay_within_the_slots_and_the_best_reaches_max_t(seed, max_active):
    curves = [[q + e / 100 for e in range(8)] for q in QUALITY]
    epochs, peak = run(curves, max_t=8, grace=1, eta=2, max_active=max_active, seed=seed)
    assert peak <= max_active
    assert len(epochs) == 8 and min(epochs.values()) >= 1
    assert epochs[5] == 8  # the best trial always trains to max_t
    # successive halving trains 20; early (mis)promotions add a few, never half of 64
    assert 20 <= sum(epochs.values()) <= 32


def test_a_top_rung_without_promotions_still_sends_its_best_to_max_t():
    # eta 3, rungs at 1 and 3, max_t 9, 4 trials one at a time. t0, t1 pause at 1; t2 makes 3
    # results (top 1 = t1): t2 pauses, t1 resumes and pauses at 3. t3 (9) tops rung 1 and
    # pauses at 3, where 2 results promote floor(2/3) = 0. Draining, the best of that rung
    # (t3) trains to max_t and the rest stop.
    curves = [[q] * 9 for q in (1, 5, 2, 9)]
    epochs, _ = run(curves, max_t=9, grace=1, eta=3, max_active=1)
    assert epochs == {0: 1, 1: 3, 2: 1, 3: 9}


def test_nan_scores_rank_last_and_min_mode_inverts():
    sched = PromotionASHA("epoch", 4, 1, 2, 2, metric="loss", mode="min")
    ctl = _Controller(0)
    a, b = _Trial("a"), _Trial("b")
    ctl.trials = [a, b]
    a.status = b.status = Trial.RUNNING
    assert sched.on_trial_result(ctl, a, {"epoch": 1, "loss": 2.0}) == TrialScheduler.PAUSE
    a.status = Trial.PAUSED
    # b is better (lower loss): it is the one rung 1 may promote, right away
    assert sched.on_trial_result(ctl, b, {"epoch": 1, "loss": 1.0}) == TrialScheduler.CONTINUE
    c = _Trial("c")
    ctl.trials.append(c)
    c.status = Trial.RUNNING
    assert sched.on_trial_result(ctl, c, {"epoch": 1, "loss": math.nan}) == TrialScheduler.PAUSE
    assert sched.rungs[0]["c"] == -math.inf


def test_a_results_trial_id_comes_from_its_report_or_else_its_folder():
    from types import SimpleNamespace

    from rayssl.summary import result_trial_id

    folder = "/runs/sweep/run_trial_ab12c_00010_10_koleo_weight=0.0500,mask_ratio=0.3000_2026-12-02_07-00-00/"
    reported = SimpleNamespace(metrics={"trial_id": "ab12c_00001", "epoch": 3}, path=folder)
    assert result_trial_id(reported) == "ab12c_00001"  # the report wins over the folder
    restored = SimpleNamespace(metrics={"epoch": 3}, path=folder)
    assert result_trial_id(restored) == "ab12c_00010"  # the trial id, not the index (10) or the params
    assert result_trial_id(SimpleNamespace(metrics=None, path=folder.rstrip("/"))) == "ab12c_00010"
    assert result_trial_id(SimpleNamespace(metrics={}, path="/runs/sweep/other_trial")) is None
