"""End to end: a real 2-trial Ray Tune sweep, 2 gloo DDP workers per trial, into a real
`mlflow server` on 127.0.0.1 (read back through MlflowClient), under the pausing ASHA
(rayssl.schedulers.PromotionASHA): the trial with the better epoch-1 k-NN trains on (after a
pause and a resume if it got there first), the other stops; the best trial's model lands in
the server's registry."""

import shutil
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import compose, sweep_runs
from test_cluster_job_submit import Processes, free_ports, http_ok, wait_for

EPOCHS = 2
SWEPT = {"koleo_weight", "mask_ratio", "n_register_tokens", "temperature_student", "temperature_teacher"}
PER_EPOCH = ("loss", "loss_cls", "loss_patch", "loss_koleo", "knn_top1")

pytestmark = pytest.mark.slow
MODEL_NAME = "it-best-encoder"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    (port,) = free_ports(1)
    mlflow_bin = shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow")
    procs = Processes()
    try:
        proc = procs.start([mlflow_bin, "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                            "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
                            "--port", str(port), "--workers", "1"],
                           env=None, log_path=root / "server.log", cwd=root)
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: http_ok(f"{url}/health"), 120, "the MLflow server", [proc])
        yield url
    finally:
        procs.stop_all()  # only the process group this fixture started


def test_platform_module_is_stdlib_inside_ray_workers(ray_session):
    @ray_session.remote(num_cpus=0)
    def probe():
        import platform

        return platform.system(), platform.__file__

    system, path = ray_session.get(probe.remote())
    assert system in ("Linux", "Darwin", "Windows")
    assert "/platform/" not in path.replace("\\", "/").split("site-packages")[0] or path.endswith("platform.py")


def test_two_trial_sweep_with_two_ddp_workers_logs_nested_runs(ray_session, mlflow_server, tmp_path):
    from rayssl.sweep import run_sweep

    uri = mlflow_server
    cfg = compose([
        "model=micro", f"train.epochs={EPOCHS}", "train.num_workers=2", "train.cpus_per_worker=0.5",
        "train.global_batch_size=32", "train.log_every=2", "data.synthetic_n_train=192", "data.synthetic_n_eval=96",
        "data.n_local=2", "data.map_batch_size=32", "sweep.num_samples=2", f"tracking.uri={uri}",
        f"train.storage_path={tmp_path}/ray_results", "tracking.experiment=it-sweep",
        "sweep.scheduler=asha_promotion", "sweep.grace_period=1", "sweep.reduction_factor=2",
        f"tracking.register_model_name={MODEL_NAME}",
    ])
    summary = run_sweep(cfg)
    assert summary["best"] is not None and summary["n_errors"] == 0

    client = MlflowClient(uri)
    parent, children = sweep_runs(client, "it-sweep", 2)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["best_run_id"] in {c.info.run_id for c in children}

    # Parent: config, search space, results table, pictures, best-trial tags.
    config = {a.path for a in client.list_artifacts(parent.info.run_id, "config")}
    assert {"config/resolved.yaml", "config/search_space.yaml"} <= config
    summary_files = {a.path for a in client.list_artifacts(parent.info.run_id, "summary")}
    assert {"summary/results.csv", "summary/metric_vs_params.png", "summary/best_so_far.png"} <= summary_files
    table = Path(client.download_artifacts(parent.info.run_id, "summary/results.csv", str(tmp_path)))
    lines = table.read_text().strip().splitlines()
    assert len(lines) == 1 + 2 and "knn_top1" in lines[0]
    best_run = parent.data.tags["best_run_id"]
    best_knn = client.get_metric_history(best_run, "knn_top1")
    assert float(parent.data.tags["best_knn_top1"]) == pytest.approx(max(best_knn, key=lambda m: m.step).value)
    # The best trial's model is in the server's registry, pointing at that run.
    versions = client.search_model_versions(f"name='{MODEL_NAME}'")
    assert len(versions) == 1 and versions[0].run_id == best_run

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
    assert best_run == done[0].info.run_id  # the best among the trials that trained every epoch
    for key in PER_EPOCH:
        assert len(client.get_metric_history(done[0].info.run_id, key)) == EPOCHS, key
    assert stopped[0].data.tags["rayssl.stopped_early_at_epoch"] == "1"

    def epoch1_knn(run):
        return min(client.get_metric_history(run.info.run_id, "knn_top1"), key=lambda m: m.step).value

    assert epoch1_knn(done[0]) >= epoch1_knn(stopped[0])
