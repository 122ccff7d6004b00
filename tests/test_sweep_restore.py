"""Sweep resilience through the real entry script: a trial whose loss goes non-finite is
marked failed while the sweep goes on; a sweep whose driver is killed resumes when the same
command is re-run (sweep.run_name -> Tuner.restore), keeps its finished and failed trials
without re-running them, and finishes into the same parent MLflow run."""

import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, sweep_runs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# Grid over base_lr, one trial at a time in grid order: the 2nd trial's huge lr (with
# clipping and warm-up off) makes the loss non-finite; the 1st and 3rd train normally.
LRS = [0.004, 1e30, 0.003]
OVERRIDES = [
    "model=micro", "train.epochs=2", "train.num_workers=1", "train.cpus_per_worker=0.5",
    "train.global_batch_size=16", "train.log_every=2", "data.synthetic_n_train=96", "data.synthetic_n_eval=32",
    "data.n_local=2", "data.map_batch_size=32", "train.system_metrics=false", "ray.num_cpus=2",
    "sweep.max_concurrent_trials=1", "sweep.num_samples=1", "sweep.run_name=resilient",
    "method.clip_grad=1e30", "method.lr_warmup_frac=0", "sweep=custom",
    f"+sweep.space.base_lr={{type: grid, values: [{', '.join(map(repr, LRS))}]}}",
    "tracking.experiment=it-restore", "tracking.register_model_name=null",
]


def _sweep(tmp_path, **popen):
    cmd = [sys.executable, "experiments/sweep.py", *OVERRIDES, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
           f"train.storage_path={tmp_path}/ray_results"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    return subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, **popen)


def _children(client):
    exp = client.get_experiment_by_name("it-restore")
    if exp is None:
        return []
    return [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]


def _tune_state_has(tmp_path, *statuses) -> bool:
    files = list((tmp_path / "ray_results" / "resilient").glob("experiment_state-*.json"))
    text = "".join(f.read_text(errors="replace") for f in files)
    return all(s in text for s in statuses)


def test_killed_sweep_driver_resumes_without_rerunning_finished_trials(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    log1 = open(tmp_path / "first.log", "w")
    first = _sweep(tmp_path, stdout=log1, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and first.poll() is None:
            done = [c for c in _children(client) if c.info.status in ("FINISHED", "FAILED")]
            # Kill only once Tune's own saved state knows both outcomes (it saves periodically).
            if len(done) >= 2 and _tune_state_has(tmp_path, "TERMINATED", "ERROR"):
                break
            time.sleep(2)
        assert first.poll() is None, "the sweep ended before it could be interrupted:\n" + \
            (tmp_path / "first.log").read_text()[-4000:]
        assert len(done) >= 2, (tmp_path / "first.log").read_text()[-4000:]
        os.killpg(first.pid, signal.SIGKILL)  # the driver dies, with its local Ray
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait(60)
    before = {float(c.data.params["base_lr"]): c for c in _children(client)}
    assert before[LRS[0]].info.status == "FINISHED" and before[LRS[1]].info.status == "FAILED"
    assert "non-finite loss" in before[LRS[1]].data.tags["rayssl.error"]

    second = _sweep(tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, out[-6000:]
    assert "restoring the Tune experiment" in out

    parent, children = sweep_runs(client, "it-restore", 3)
    assert parent.info.status == "FINISHED"
    after = {float(c.data.params["base_lr"]): c for c in children}
    assert set(after) == set(LRS)
    for lr in LRS[:2]:  # neither re-run nor touched: same run, same end time
        assert after[lr].info.run_id == before[lr].info.run_id
        assert after[lr].info.end_time == before[lr].info.end_time, lr
    assert after[LRS[0]].info.status == "FINISHED" and after[LRS[1]].info.status == "FAILED"
    assert after[LRS[2]].info.status == "FINISHED"
    if LRS[2] in before:  # it was running when the driver died: continued in the same run
        assert after[LRS[2]].info.run_id == before[LRS[2]].info.run_id
    for lr in (LRS[0], LRS[2]):
        steps = [m.step for m in client.get_metric_history(after[lr].info.run_id, "knn_top1")]
        assert len(steps) == 2 and len(set(steps)) == 2, (lr, steps)
    assert int(parent.data.tags["rayssl.trials_failed"]) == 1
    # artifacts live beside the sqlite store, whatever the working directory
    assert all(c.info.artifact_uri.startswith(str(tmp_path)) for c in [parent, *children])
    assert parent.data.tags["best_run_id"] in {after[LRS[0]].info.run_id, after[LRS[2]].info.run_id}
