"""Ray Tune sweep over DINOv3 hyperparameters; each trial launches its own TorchTrainer.

Shape (Ray 2.60 Train V2): the Tune trainable is a plain function that builds
the datasets and a ``TorchTrainer`` and calls ``fit()``; ``TuneReportCallback``
forwards rank 0's per-epoch reports (``knn_top1``) to Tune and its scheduler.
MLflow: the driver owns the experiment and a parent run; each trial creates (or
on restart finds) a child run tagged with the parent's id.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Dict

import ray
from ray import tune

from rayssl import tracking
from rayssl.config import ExperimentConfig, check_sweep, flat_params, from_dict, trial_resources, with_overrides
from rayssl.data import validate_source
from rayssl.launch import check_cluster_fits, build_trainer, init_ray
from rayssl.plan import concurrent_trials, live_capacity
from rayssl.schedulers import ActiveTrialGate, PromotionASHA
from rayssl.summary import log_sweep_summary

log = logging.getLogger("rayssl.sweep")

# The trial function only waits on its trainer: it holds no CPU, so Ray Data's
# budget (cluster minus Train's reservation) stays true. A bundle cannot be all
# zeros, and every node has "memory", so a sliver of memory keeps it schedulable
# on a plain `ray start` cluster with no custom resources.
TRIAL_DRIVER_RESOURCES = {"cpu": 0, "memory": 64 * 2**20}


def search_space(cfg: ExperimentConfig) -> Dict[str, Any]:
    """sweep.space (Hydra dicts) -> Tune sampling primitives, keyed by method field."""
    space = {}
    for name, spec in cfg.sweep.space.items():
        kind = spec["type"]
        if kind == "choice":
            space[name] = tune.choice(list(spec["values"]))
        elif kind == "grid":
            space[name] = tune.grid_search(list(spec["values"]))
        elif kind == "uniform":
            space[name] = tune.uniform(spec["low"], spec["high"])
        elif kind == "loguniform":
            space[name] = tune.loguniform(spec["low"], spec["high"])
        elif kind == "randint":
            space[name] = tune.randint(spec["low"], spec["high"])
    return space


def max_concurrent_trials(cfg: ExperimentConfig) -> int:
    """Trials at once: ``sweep.max_concurrent_trials``, else as many as the cluster holds."""
    cap, _ = live_capacity()
    return max(1, concurrent_trials(cfg, cap.get("CPU", 0.0), cap.get("GPU", 0.0)))


def run_trial(config: Dict[str, Any], base: Dict[str, Any], experiment_id: str, parent_run_id: str,
              n_train: int) -> None:
    """One Tune trial: a child MLflow run and a TorchTrainer with the sampled method.* values."""
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = with_overrides(from_dict(base), config)
    ctx = tune.get_context()
    trial_id, trial_name = ctx.get_trial_id(), ctx.get_trial_name()
    uri = cfg.tracking_uri
    tags = {tracking.TRIAL_TAG: trial_id, tracking.SWEEP_TAG: parent_run_id, tracking.ROLE_TAG: "trial"}
    run_id = tracking.find_run(uri, experiment_id, tags)  # a restarted or resumed trial continues its run
    if run_id is None:
        run_id = tracking.create_run(uri, experiment_id, trial_name, tags=tags, parent_run_id=parent_run_id)
    else:  # a pause or a lost driver killed it: it runs again
        client = tracking.client(uri)
        if tracking.ERROR_TAG in client.get_run(run_id).data.tags:
            client.delete_tag(run_id, tracking.ERROR_TAG)
        client.update_run(run_id, status="RUNNING")
    tracking.log_params(uri, run_id, {**config, **flat_params(cfg)})
    tracking.set_tags(uri, run_id, {"rayssl.trial_node_id": ray.get_runtime_context().get_node_id()})

    trainer = build_trainer(cfg, name=f"{cfg.sweep.name}-{trial_id}", mlflow_run_id=run_id,
                            n_train=n_train, callbacks=[TuneReportCallback()])
    try:
        trainer.fit()
    except BaseException as err:
        tracking.end_run(uri, run_id, "FAILED", error=err)
        raise
    tracking.end_run(uri, run_id, "FINISHED")


def run_sweep(cfg: ExperimentConfig) -> Dict[str, Any]:
    """Run the sweep described by ``cfg.sweep``; returns the best trial's config and metrics."""
    check_sweep(cfg)
    info = validate_source(cfg.data)  # fails on a bad path before any Ray work
    init_ray(cfg)
    check_cluster_fits(cfg)  # a trial that can never start fails now, not PENDING forever
    uri = cfg.tracking_uri
    exp_id = tracking.get_or_create_experiment(uri, cfg.tracking.experiment)
    sweep_name = cfg.sweep.run_name or f"{cfg.sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep_dir = os.path.join(cfg.storage_path, sweep_name)
    parent_tags = {tracking.ROLE_TAG: "sweep", "rayssl.sweep_name": sweep_name}
    parent = tracking.find_run(uri, exp_id, parent_tags) if cfg.sweep.run_name else None
    if parent is None:
        parent = tracking.create_run(uri, exp_id, sweep_name, tags=parent_tags)
        tracking.log_params(uri, parent, {**{f"sweep.{k}": v for k, v in dataclasses.asdict(cfg.sweep).items()},
                                          **flat_params(cfg)})
        tracking.log_dict_artifact(uri, parent, cfg.to_dict(), "config/resolved.yaml")
        tracking.log_dict_artifact(uri, parent, cfg.sweep.space, "config/search_space.yaml")
    else:
        log.info("resuming sweep %s into MLflow parent run %s", sweep_name, parent)
        tracking.client(uri).update_run(parent, status="RUNNING")
    log.info("sweep %s: MLflow parent run %s in %s", sweep_name, parent, uri)

    concurrent = max_concurrent_trials(cfg)
    log.info("%d trials, at most %d at a time (%s per trial)", cfg.sweep.num_samples, concurrent,
             trial_resources(cfg))
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=cfg.to_dict(), experiment_id=exp_id,
                             parent_run_id=parent, n_train=info.n_train),
        TRIAL_DRIVER_RESOURCES)
    if cfg.sweep.run_name and tune.Tuner.can_restore(sweep_dir):
        # The driver died: finished trials are kept, unfinished ones continue (their Train runs
        # resume from their own checkpoints, into the same child runs); failed ones stay failed
        # unless sweep.retry_failed (their error is the child run's rayssl.error tag).
        log.info("restoring the Tune experiment at %s", sweep_dir)
        tuner = tune.Tuner.restore(sweep_dir, trainable=trainable, resume_unfinished=True,
                                   resume_errored=cfg.sweep.retry_failed)
    else:
        sched = scheduler(cfg, concurrent)
        search_alg = search_algorithm(cfg, concurrent)
        if isinstance(sched, PromotionASHA):
            # paused trials must not count against the concurrency limit: the scheduler's slots do
            search_alg = ActiveTrialGate(search_algorithm(cfg, 0), sched)
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(cfg),
            tune_config=tune.TuneConfig(
                metric=cfg.sweep.metric, mode=cfg.sweep.mode, num_samples=cfg.sweep.num_samples,
                search_alg=search_alg, scheduler=sched),
            run_config=tune.RunConfig(name=sweep_name, storage_path=cfg.storage_path),
        )
    try:
        results = tuner.fit()
    except BaseException:
        tracking.end_run(uri, parent, "FAILED")
        raise
    summary = log_sweep_summary(cfg, results, uri, exp_id, parent)
    tracking.end_run(uri, parent, "FINISHED" if summary.get("best") else "FAILED")
    return summary


def search_algorithm(cfg: ExperimentConfig, max_concurrent: int):
    """Random/grid or Optuna TPE; ``max_concurrent`` live trials (0: no limit)."""
    if cfg.sweep.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter, SearchGenerator
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(seed=cfg.sweep.seed)
        if max_concurrent > 0:
            searcher = ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)
        return SearchGenerator(searcher)
    from ray.tune.search import BasicVariantGenerator

    # Trials hold no CPU, so Tune's own resource accounting cannot limit them: this does.
    return BasicVariantGenerator(random_state=cfg.sweep.seed, max_concurrent=max_concurrent)


def scheduler(cfg: ExperimentConfig, max_concurrent: int):
    """``asha``: Ray's stopping ASHA; ``asha_promotion``: the paper's pausing ASHA (rayssl.schedulers)."""
    s = cfg.sweep
    if s.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        return ASHAScheduler(time_attr="epoch", max_t=cfg.train.epochs,
                             grace_period=s.grace_period, reduction_factor=s.reduction_factor)
    if s.scheduler == "asha_promotion":
        return PromotionASHA(time_attr="epoch", max_t=cfg.train.epochs, grace_period=s.grace_period,
                             reduction_factor=s.reduction_factor, max_active=max_concurrent)
    return None
