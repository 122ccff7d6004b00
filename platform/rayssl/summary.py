"""After a sweep: results table, pictures and best-trial tags on the parent MLflow run."""

from __future__ import annotations

import logging
import os
import re
import tempfile
from typing import Any, Dict

from rayssl import tracking
from rayssl.config import ExperimentConfig

log = logging.getLogger("rayssl.sweep")


def close_stopped_trials(cfg: ExperimentConfig, results, uri: str, run_ids: Dict[str, str]) -> int:
    """Child runs of trials the scheduler stopped before ``train.epochs``: KILLED, not FAILED or RUNNING.

    Stopping (or pausing) a trial kills its Train run, which leaves the run RUNNING or marks it
    FAILED with an ``ActorDiedError``; the tag ``rayssl.stopped_early_at_epoch`` says what happened.
    """
    n = 0
    for r in results:
        metrics = r.metrics or {}
        run_id = run_ids.get(result_trial_id(r))
        epoch = metrics.get("epoch")
        if r.error is not None or run_id is None or epoch is None or epoch >= cfg.train.epochs:
            continue
        c = tracking.client(uri)
        if tracking.ERROR_TAG in c.get_run(run_id).data.tags:
            c.delete_tag(run_id, tracking.ERROR_TAG)
        c.set_tag(run_id, "rayssl.stopped_early_at_epoch", int(epoch))
        c.set_terminated(run_id, status="KILLED")
        n += 1
    if n:
        log.info("%d trials stopped early by the scheduler (MLflow status KILLED)", n)
    return n


def log_sweep_summary(cfg: ExperimentConfig, results, uri: str, exp_id: str, parent: str) -> Dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, mode = cfg.sweep.metric, cfg.sweep.mode
    df = results.get_dataframe()
    params = list(cfg.sweep.space)
    n_errors = len(results.errors)
    summary: Dict[str, Any] = {"n_trials": len(results), "n_errors": n_errors, "best": None}
    if n_errors:
        failed = [r for r in results if r.error is not None]
        for r in failed:
            log.error("trial %s failed: %s", result_trial_id(r) or r.path, str(r.error).splitlines()[0])
        tracking.set_tags(uri, parent, {"rayssl.trials_failed": n_errors})
    if df.empty or metric not in df:
        log.error("no trial reported %s (%d errors)", metric, n_errors)
        return summary
    # Child run id per trial, for the table and the best-trial link.
    trial_ids = [t for t in map(result_trial_id, results) if t is not None]
    run_ids = {t: tracking.find_run(uri, exp_id, {tracking.TRIAL_TAG: t, tracking.SWEEP_TAG: parent})
               for t in trial_ids}
    df = df.assign(mlflow_run_id=df["trial_id"].map(run_ids))
    close_stopped_trials(cfg, results, uri, run_ids)
    cols = ["trial_id", "mlflow_run_id", *[f"config/{p}" for p in params if f"config/{p}" in df],
            metric, "epoch", "time_total_s"]
    table = df[[c for c in cols if c in df]].sort_values(metric, ascending=(mode == "min"))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "results.csv")
        table.to_csv(path, index=False)
        tracking.log_artifact(uri, parent, path, "summary")

    n = len(params)
    fig, axes = plt.subplots(1, max(n, 1), figsize=(3.2 * max(n, 1), 3), squeeze=False)
    for ax, p in zip(axes[0], params):
        ax.scatter(df[f"config/{p}"], df[metric])
        ax.set_xlabel(p)
        ax.set_ylabel(f"{metric} (%)")
    fig.suptitle(f"{metric} per swept parameter (last report of each trial)")
    tracking.log_figure(uri, parent, fig, "summary/metric_vs_params.png")
    plt.close(fig)

    ordered = df.sort_values("timestamp") if "timestamp" in df else df
    best_so_far = ordered[metric].cummax() if mode == "max" else ordered[metric].cummin()
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.step(range(1, len(best_so_far) + 1), best_so_far, where="post")
    ax.set_xlabel("trials finished")
    ax.set_ylabel(f"best {metric} so far (%)")
    tracking.log_figure(uri, parent, fig, "summary/best_so_far.png")
    plt.close(fig)

    best = best_result(results, metric, mode, cfg.train.epochs)
    best_trial = result_trial_id(best)
    best_run = run_ids.get(best_trial)
    tracking.set_tags(uri, parent, {"best_trial_id": best_trial, "best_run_id": best_run,
                                    f"best_{metric}": best.metrics.get(metric)})
    tracking.log_params(uri, parent, {f"best.{k}": v for k, v in best.config.items()})
    if best_run and cfg.tracking.register_model_name:
        version = tracking.register_model(uri, best_run, cfg.tracking.register_model_name)
        if version:
            summary["registered_model"] = {"name": cfg.tracking.register_model_name, "version": version}
            tracking.set_tags(uri, parent, {"registered_model": f"{cfg.tracking.register_model_name}/{version}"})
            log.info("registered the best trial's model as %s version %s", cfg.tracking.register_model_name, version)
    summary.update(best={"config": best.config, metric: best.metrics.get(metric), "trial_id": best_trial,
                         "run_id": best_run, "url": tracking.run_url(uri, exp_id, best_run) if best_run else None})
    log.info("best trial %s: %s = %.2f with %s\n  MLflow: %s", best_trial, metric, best.metrics.get(metric),
             best.config, summary["best"]["url"])
    return summary


# Tune names a trial's folder <trainable>_<trial id>_<index>_<params>_<date>; a trial id is
# <5 hex digits>_<5-digit counter>.
_TRIAL_FOLDER = re.compile(r"_([0-9a-f]{5}_[0-9]{5})_")


def result_trial_id(result) -> Any:
    """The Tune trial id of ``result``: its last report's ``trial_id``, or, for a Result restored
    with the experiment that lacks it, the one its folder name carries (None if neither)."""
    trial = (result.metrics or {}).get("trial_id")
    if trial is None and result.path:
        m = _TRIAL_FOLDER.search(os.path.basename(str(result.path).rstrip("/")))
        trial = m.group(1) if m else None
    return trial


def best_result(results, metric: str, mode: str, epochs: int):
    """The best trial by its last report, among the trials that trained every epoch when any
    did: under early stopping a stopped trial's last report comes from a smaller budget, and
    that trial has no final model to register."""
    done = [r for r in results
            if not r.error and r.metrics and r.metrics.get("epoch") == epochs and r.metrics.get(metric) is not None]
    if not done:
        return results.get_best_result(metric=metric, mode=mode, scope="last")
    return (max if mode == "max" else min)(done, key=lambda r: r.metrics[metric])
