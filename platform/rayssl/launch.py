"""Ray runtime and the TorchTrainer of one training run (standalone or one Tune trial)."""

from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Any, Dict, List, Optional

import ray
import ray.train
from ray.train.torch import TorchTrainer

from rayssl import tracking
from rayssl.checkpoint import newest_meta, storage_join
from rayssl.config import REPO_ROOT, ConfigError, ExperimentConfig, flat_params, steps_per_epoch
from rayssl.data import build_knn_dataset, build_train_dataset, ray_data_limits, validate_source
from rayssl.loop import start_epoch
from rayssl.plan import check_fits
from rayssl.train import train_loop_per_worker

log = logging.getLogger("rayssl")


def init_ray(cfg: ExperimentConfig) -> None:
    """Start or join Ray; every worker gets the project's packages and the tracking URI."""
    from ray.data import DataContext

    if not ray.is_initialized():
        env_vars = {"MLFLOW_TRACKING_URI": cfg.tracking_uri, "PYTHONWARNINGS": "ignore::DeprecationWarning"}
        runtime_env: Dict[str, Any] = {"env_vars": env_vars}
        if cfg.ray.address is None and not os.environ.get("RAY_ADDRESS"):
            # Local: workers import dinov3/rayssl from this checkout without a working_dir upload.
            env_vars["PYTHONPATH"] = os.pathsep.join(
                [str(REPO_ROOT), str(REPO_ROOT / "platform"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        else:  # joining a cluster whose nodes may lack the project: ship it (rayssl/cluster.py)
            from rayssl.cluster import cluster_runtime_env

            runtime_env = cluster_runtime_env(cfg, runtime_env)
        ray.init(address=cfg.ray.address, num_cpus=cfg.ray.num_cpus, runtime_env=runtime_env,
                 log_to_driver=True, configure_logging=True, logging_level=logging.INFO)
        if cfg.ray.address is not None or os.environ.get("RAY_ADDRESS"):
            from rayssl.cluster import check_shared_storage

            check_shared_storage(cfg, sum(1 for n in ray.nodes() if n.get("Alive")))
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def check_cluster_fits(cfg: ExperimentConfig) -> None:
    """ConfigError (naming train.num_workers and the cluster's total) when one trial can never fit
    the Ray cluster this process is connected to: never a run that waits forever."""
    check_fits(cfg)


def build_trainer(cfg: ExperimentConfig, *, name: str, mlflow_run_id: str, n_train: int,
                  callbacks: Optional[List[Any]] = None, fault_injection_step: int = 0) -> TorchTrainer:
    """A TorchTrainer whose workers stream multi-crop batches and log into ``mlflow_run_id``.

    The train stream is built each time Ray Train starts the worker group (the first time, and
    after every failure or resume): it starts at the epoch of the run's newest checkpoint, so
    a resumed run never replays the epochs it already trained.
    """
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False  # this may be a Tune trial process
    t, d = cfg.train, cfg.data
    run_dir = storage_join(cfg.storage_path, name)
    spe = steps_per_epoch(cfg, n_train)

    def train_dataset():
        meta = newest_meta(run_dir)
        first = start_epoch(int(meta["step"]), spe, t.epochs) if meta else 0
        if first:
            log.info("run %s resumes at step %d: the train stream starts at epoch %d", name, meta["step"], first)
        # bad images are counted per run: concurrent trials on one source count apart
        return build_train_dataset(d, seed=t.seed, epochs=t.epochs, start_epoch=first, run_key=mlflow_run_id)

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "tracking_uri": cfg.tracking_uri, "mlflow_run_id": mlflow_run_id,
                           "n_train": n_train, "run_name": name, "storage_path": cfg.storage_path,
                           "fault_injection_step": fault_injection_step},
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if t.use_gpu else {})}),
        # rank 0 caches the k-NN set after the first evaluation
        datasets={"train": train_dataset, "knn": build_knn_dataset(d, run_key=mlflow_run_id)},
        # The k-NN bank and queries must be whole on the rank that evaluates.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"], execution_options=ray_data_limits(d)),
        run_config=ray.train.RunConfig(
            name=name, storage_path=cfg.storage_path, callbacks=callbacks or [],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures)),
    )


def training_run_name(cfg: ExperimentConfig) -> str:
    """``train.run_name``, else a new name per call: an unnamed run never picks up the
    checkpoints of an earlier one (which may have had other epochs or settings)."""
    if cfg.train.run_name:
        return cfg.train.run_name
    return f"train-{cfg.model.backbone}-{cfg.data.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"


def run_training(cfg: ExperimentConfig, fault_injection_step: int = 0) -> Dict[str, Any]:
    """One training run (no sweep), logged to MLflow as one run; re-running the same
    ``train.run_name`` resumes it. ``fault_injection_step`` is a test hook."""
    info = validate_source(cfg.data)
    if steps_per_epoch(cfg, info.n_train) < 1:
        raise ConfigError(f"train.global_batch_size={cfg.train.global_batch_size}: more than the {info.n_train} "
                          f"training images of data.path={cfg.data.path}: no full step per epoch")
    init_ray(cfg)
    check_cluster_fits(cfg)
    uri = cfg.tracking_uri
    exp_id = tracking.get_or_create_experiment(uri, cfg.tracking.experiment)
    name = training_run_name(cfg)
    run_id = None
    if cfg.train.run_name:  # a name the user chose: re-running it continues that run
        run_id = tracking.find_run(uri, exp_id, {tracking.ROLE_TAG: "train", "rayssl.run_name": name})
    if run_id is None:
        run_id = tracking.create_run(uri, exp_id, name, tags={tracking.ROLE_TAG: "train", "rayssl.run_name": name,
                                                              "rayssl.recipe": cfg.recipe})
        log.info("run %s, MLflow run %s (after a crash, re-run with train.run_name=%s to continue it)",
                 name, run_id, name)
    else:
        log.info("continuing MLflow run %s (%s)", run_id, name)
        tracking.client(uri).update_run(run_id, status="RUNNING")
    tracking.log_params(uri, run_id, flat_params(cfg))
    tracking.log_dict_artifact(uri, run_id, cfg.to_dict(), "config/resolved.yaml")
    trainer = build_trainer(cfg, name=name, mlflow_run_id=run_id, n_train=info.n_train,
                            fault_injection_step=fault_injection_step)
    try:
        result = trainer.fit()
    except Exception as err:
        tracking.end_run(uri, run_id, "FAILED", error=err)
        raise
    tracking.end_run(uri, run_id, "FINISHED")
    log.info("done: %s", tracking.run_url(uri, exp_id, run_id))
    return {"run_id": run_id, "metrics": result.metrics, "checkpoint": result.checkpoint}
