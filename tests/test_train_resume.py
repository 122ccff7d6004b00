"""End to end on Ray Train (gloo CPU workers, temporary MLflow store): a SIGKILLed worker
restarts from the last checkpoint into the same MLflow run; a re-run of the same name
and train.resume_from continue exactly; a NaN loss stops the run naming step and term."""

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import compose

pytestmark = pytest.mark.slow

# 96 training images: 6 steps/epoch at a global batch of 16 (1 worker), 3 at 32 (2 workers x 16).
MICRO = ["model=micro", "train.log_every=2", "data.synthetic_n_train=96",
         "data.synthetic_n_eval=32", "data.n_local=2", "data.map_batch_size=32", "train.system_metrics=false",
         "tracking.experiment=it-train"]


def _cfg(tmp_path, *extra):
    return compose(MICRO + [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                            f"train.storage_path={tmp_path}/ray_results", *extra])


def _runs(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("it-train")
    return client, client.search_runs([exp.experiment_id])


def _assert_no_duplicate_steps(client, run):
    for key in run.data.metrics:
        if key.startswith("system/"):
            continue
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(steps) == len(set(steps)), (key, steps)


def _final_state(result):
    with result["checkpoint"].as_directory() as d:
        return torch.load(f"{d}/state.pt", map_location="cpu", weights_only=False)


def test_killed_worker_restarts_from_checkpoint_into_same_run(ray_session, tmp_path):
    from rayssl.launch import run_training

    cfg = _cfg(tmp_path, "train.epochs=2", "train.num_workers=2", "train.cpus_per_worker=0.5",
               "train.global_batch_size=32", "train.checkpoint_every=2", "train.keep_checkpoints=2",
               "train.max_failures=1", "train.run_name=killed")
    result = run_training(cfg, fault_injection_step=4)
    assert result["metrics"]["step"] == 6 and result["metrics"]["epoch"] == 2
    assert _final_state(result)["step"] == 6
    assert (tmp_path / "ray_results" / "killed" / ".fault_injected_step4").exists()  # it did die

    client, runs = _runs(tmp_path)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    resumed_at = int(run.data.tags["rayssl.resumed_at_step"])
    assert resumed_at in (2, 4)
    # the restarted stream began at the checkpoint's epoch (3 steps each): it skipped only the
    # part of that epoch already trained, not every batch since step 0
    assert int(run.data.tags["rayssl.resume_skipped_batches"]) == resumed_at % 3
    _assert_no_duplicate_steps(client, run)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [3, 6]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "knn_top1")] == [3, 6]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/MLmodel", "model/teacher_backbone.safetensors"} <= artifacts
    pca = {a.path for a in client.list_artifacts(run.info.run_id, "pca")}
    assert {"pca/step_000000.png", "pca/step_000003.png", "pca/step_000006.png"} <= pca


def test_resume_is_exact_by_name_and_from_checkpoint(ray_session, tmp_path):
    """2N steps straight == N steps, process dies, re-run of the same name for N more."""
    import ray.train

    from rayssl.launch import run_training

    common = ["train.epochs=1", "train.num_workers=1", "train.cpus_per_worker=0.5", "train.global_batch_size=16",
              "train.checkpoint_every=3", "train.keep_checkpoints=3"]
    straight = run_training(_cfg(tmp_path, *common, "train.run_name=straight"))

    interrupted = _cfg(tmp_path, *common, "train.run_name=resumed")
    with pytest.raises(ray.train.TrainingFailedError):
        run_training(interrupted, fault_injection_step=4)  # max_failures=0: dies after the step-3 checkpoint
    resumed = run_training(interrupted, fault_injection_step=4)  # same name: continues from step 3 (the marker stops a 2nd kill)

    a, b = _final_state(straight), _final_state(resumed)
    assert a["step"] == b["step"] == 6
    for k, v in a["method"].items():
        assert torch.allclose(v.float(), b["method"][k].float(), atol=1e-5, rtol=0), k

    client, runs = _runs(tmp_path)
    run = next(r for r in runs if r.data.tags["rayssl.run_name"] == "resumed")
    assert len([r for r in runs if r.data.tags["rayssl.run_name"] == "resumed"]) == 1
    assert run.info.status == "FINISHED" and run.data.tags["rayssl.resumed_at_step"] == "3"
    _assert_no_duplicate_steps(client, run)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [2, 4, 6]


def test_non_finite_loss_stops_the_run_naming_step_and_term(ray_session, tmp_path):
    import ray.train

    from rayssl.launch import run_training

    cfg = _cfg(tmp_path, "train.epochs=1", "train.num_workers=1", "train.cpus_per_worker=0.5",
               "train.global_batch_size=16", "method.base_lr=1e30", "method.clip_grad=1e30", "method.lr_warmup_frac=0", "train.run_name=nan")
    with pytest.raises(ray.train.TrainingFailedError, match=r"non-finite loss at step \d+: loss"):
        run_training(cfg)
    _, runs = _runs(tmp_path)
    assert runs[0].info.status == "FAILED"
