"""End to end: a real 2-trial Ray Tune sweep, 2 gloo DDP workers per trial, into a temporary MLflow
store, under the pausing ASHA (rayssl.schedulers.PromotionASHA): the trial with the better
epoch-1 k-NN trains on (after a pause and a resume if it got there first), the other stops."""

import pytest
from mlflow.tracking import MlflowClient

from conftest import compose, sweep_runs

EPOCHS = 2
SWEPT = {"koleo_weight", "mask_ratio", "n_register_tokens", "temperature_student", "temperature_teacher"}
PER_EPOCH = ("loss", "loss_cls", "loss_patch", "loss_koleo", "knn_top1")

pytestmark = pytest.mark.slow


def test_platform_module_is_stdlib_inside_ray_workers(ray_session):
    @ray_session.remote(num_cpus=0)
    def probe():
        import platform

        return platform.system(), platform.__file__

    system, path = ray_session.get(probe.remote())
    assert system in ("Linux", "Darwin", "Windows")
    assert "/platform/" not in path.replace("\\", "/").split("site-packages")[0] or path.endswith("platform.py")


def test_two_trial_sweep_with_two_ddp_workers_logs_nested_runs(ray_session, tmp_path):
    from rayssl.sweep import run_sweep

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = compose([
        "model=micro", f"train.epochs={EPOCHS}", "train.num_workers=2", "train.cpus_per_worker=0.5",
        "train.batch_size=16", "train.log_every=2", "data.synthetic_n_train=192", "data.synthetic_n_eval=96",
        "data.n_local=2", "data.map_batch_size=32", "sweep.num_samples=2", f"tracking.uri={uri}",
        f"train.storage_path={tmp_path}/ray_results", "tracking.experiment=it-sweep",
        "sweep.scheduler=asha_promotion", "sweep.grace_period=1", "sweep.reduction_factor=2",
    ])
    summary = run_sweep(cfg)
    assert summary["best"] is not None and summary["n_errors"] == 0

    client = MlflowClient(uri)
    parent, children = sweep_runs(client, "it-sweep", 2)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["best_run_id"] in {c.info.run_id for c in children}

    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "config")}
    assert "config/resolved.yaml" in artifacts
    assert "summary/results.csv" in {a.path for a in client.list_artifacts(parent.info.run_id, "summary")}

    for child in children:
        assert SWEPT <= set(child.data.params), set(child.data.params)
        assert child.data.params["train.num_workers"] == "2"
        assert "rayssl.trial_node_id" in child.data.tags and "rayssl.error" not in child.data.tags
        knn = client.get_metric_history(child.info.run_id, "knn_top1")
        assert all(0.0 <= m.value <= 100.0 for m in knn)
        for key in PER_EPOCH:  # a resumed trial logs each epoch once
            steps = [m.step for m in client.get_metric_history(child.info.run_id, key)]
            assert len(steps) == len(set(steps)) >= 1, (key, steps)
        # train-loop telemetry: throughput in images/s and the share of wall time spent waiting
        # for the next batch (a fraction), every log window; the skip count of a clean source
        speed = client.get_metric_history(child.info.run_id, "train/images_per_s")
        wait = client.get_metric_history(child.info.run_id, "train/data_wait_frac")
        assert len(speed) == len(wait) >= 2 and all(m.value > 0 for m in speed), speed
        assert all(0.0 <= m.value <= 1.0 for m in wait), [m.value for m in wait]
        assert {m.value for m in client.get_metric_history(child.info.run_id, "data_skipped")} == {0.0}

    # Rung 1 holds 2 results and promotes floor(2/2) = 1: the better epoch-1 k-NN.
    done = [c for c in children if c.info.status == "FINISHED"]
    stopped = [c for c in children if c.info.status == "KILLED"]
    assert len(done) == 1 and len(stopped) == 1, [c.info.status for c in children]
    for key in PER_EPOCH:
        assert len(client.get_metric_history(done[0].info.run_id, key)) == EPOCHS, key
    assert stopped[0].data.tags["rayssl.stopped_early_at_epoch"] == "1"

    def epoch1_knn(run):
        return min(client.get_metric_history(run.info.run_id, "knn_top1"), key=lambda m: m.step).value

    assert epoch1_knn(done[0]) >= epoch1_knn(stopped[0])
