"""A 2-trial sweep against a real `mlflow server` on 127.0.0.1, read back through MlflowClient."""

import shutil
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import compose, sweep_runs
from test_cluster_job_submit import Processes, free_ports, http_ok, wait_for

pytestmark = pytest.mark.slow
SWEPT = {"koleo_weight", "mask_ratio", "n_register_tokens", "temperature_student", "temperature_teacher"}
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


def test_two_trial_sweep_is_browsable_in_a_real_server(ray_session, mlflow_server, tmp_path):
    from rayssl.sweep import run_sweep

    cfg = compose([
        "model=micro", "train.epochs=2", "train.batch_size=16", "data.synthetic_n_train=128",
        "data.synthetic_n_eval=64", "data.n_local=2", "data.map_batch_size=32", "sweep.num_samples=2",
        f"tracking.uri={mlflow_server}", f"tracking.register_model_name={MODEL_NAME}",
        f"train.storage_path={tmp_path}/ray_results", "tracking.experiment=it-server",
    ])
    summary = run_sweep(cfg)
    assert summary["n_errors"] == 0 and summary["best"] is not None

    client = MlflowClient(mlflow_server)
    parent, children = sweep_runs(client, "it-server", 2)

    # Parent: config, search space, results table, pictures, best-trial tags.
    config = {a.path for a in client.list_artifacts(parent.info.run_id, "config")}
    assert {"config/resolved.yaml", "config/search_space.yaml"} <= config
    summary_files = {a.path for a in client.list_artifacts(parent.info.run_id, "summary")}
    assert {"summary/results.csv", "summary/metric_vs_params.png", "summary/best_so_far.png"} <= summary_files
    table = Path(client.download_artifacts(parent.info.run_id, "summary/results.csv", str(tmp_path)))
    lines = table.read_text().strip().splitlines()
    assert len(lines) == 1 + 2 and "knn_top1" in lines[0]
    best_run = parent.data.tags["best_run_id"]
    assert best_run in {c.info.run_id for c in children}
    best_knn = max(client.get_metric_history(c.info.run_id, "knn_top1")[-1].value for c in children)
    assert float(parent.data.tags["best_knn_top1"]) == pytest.approx(best_knn)

    for child in children:
        assert SWEPT <= set(child.data.params)
        for key in ("loss", "loss_cls", "loss_patch", "loss_koleo", "knn_top1"):
            assert len(client.get_metric_history(child.info.run_id, key)) == 2, key

    # The best trial's model is in the registry, pointing at that run.
    versions = client.search_model_versions(f"name='{MODEL_NAME}'")
    assert len(versions) == 1 and versions[0].run_id == best_run
