#!/usr/bin/env python
"""ASHA against no early stopping: the same sweep run twice, one after the other.

Both sweeps sample the same trial configurations (same search seed); the second stops
trials through ASHA on the per-epoch ``knn_top1``. Prints one JSON line: trial-epochs
each sweep trained (epochs that reported ``knn_top1``, read back from MLflow), their
ratio, and each sweep's best ``knn_top1``.

    python experiments/bench_asha.py --scheduler asha_promotion model=micro \
        model.layerscale_init=null train.epochs=8 sweep.num_samples=8 sweep.max_concurrent_trials=2 \
        sweep.grace_period=1 sweep.reduction_factor=2 data.synthetic_n_train=512 \
        data.synthetic_n_eval=512 train.global_batch_size=32 train.log_every=8 train.system_metrics=false \
        tracking.register_model_name=null

``--scheduler asha_promotion`` (before the overrides) compares the paper's pausing ASHA
(rayssl.schedulers.PromotionASHA) instead of Ray's stopping ASHA; ``--only NAME`` runs one
of the two sweeps alone, e.g. to try other scheduler settings against a no-ASHA result
already measured with the same overrides.
"""

import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "platform")]


def trial_epochs(cfg, sweep_name: str):
    """(epochs trained per trial, best last knn_top1) of one sweep, from its MLflow runs."""
    from rayssl import tracking

    client = tracking.client(cfg.tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    parent = tracking.find_run(cfg.tracking_uri, exp.experiment_id,
                               {tracking.ROLE_TAG: "sweep", "rayssl.sweep_name": sweep_name})
    children = client.search_runs([exp.experiment_id], f"tags.`{tracking.SWEEP_TAG}` = '{parent}'")
    epochs, last = [], []
    for run in children:
        history = sorted(client.get_metric_history(run.info.run_id, cfg.sweep.metric), key=lambda m: m.step)
        epochs.append(len(history))
        if history:
            last.append(history[-1].value)
    return parent, epochs, last


SCHEDULERS = ["none", "asha"]  # without early stopping, then with it (argv: --scheduler, --only)


def bench(cfg):
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = {"trials": cfg.sweep.num_samples, "max_epochs": cfg.train.epochs,
           "grace_period": cfg.sweep.grace_period, "reduction_factor": cfg.sweep.reduction_factor}
    from rayssl.sweep import run_sweep

    for scheduler in SCHEDULERS:
        name = f"asha-bench-{scheduler}-{stamp}"
        run_cfg = dataclasses.replace(cfg, sweep=dataclasses.replace(cfg.sweep, scheduler=scheduler, run_name=name))
        t0 = time.perf_counter()
        run_sweep(run_cfg)
        wall = time.perf_counter() - t0
        parent, epochs, last = trial_epochs(run_cfg, name)
        best = max(last) if cfg.sweep.mode == "max" else min(last)
        out[scheduler] = {"mlflow_parent_run": parent, "trial_epochs": sum(epochs), "epochs_per_trial": epochs,
                          f"best_{cfg.sweep.metric}": round(best, 2), "wall_s": round(wall, 1)}
        print(f"{scheduler}: {sum(epochs)} trial-epochs, best {cfg.sweep.metric} {best:.2f}, {wall:.0f} s",
              flush=True)
    if len(SCHEDULERS) == 2:
        stopping = SCHEDULERS[1]
        out["trial_epoch_ratio"] = round(out[stopping]["trial_epochs"] / out["none"]["trial_epochs"], 3)
        key = f"best_{cfg.sweep.metric}"
        out[f"{key}_diff_points"] = round(out[stopping][key] - out["none"][key], 2)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    from rayssl.cli import main

    while len(sys.argv) > 2 and sys.argv[1] in ("--scheduler", "--only"):
        flag, name = sys.argv[1:3]
        del sys.argv[1:3]
        if flag == "--scheduler":
            SCHEDULERS[1] = name
        else:
            SCHEDULERS[:] = [name]
    sys.exit(main("sweep", sys.argv[1:], {"sweep": bench}))
