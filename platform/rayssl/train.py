"""The Ray adapter of the training loop: what every Ray Train worker (DDP rank) runs.

It hands the Ray-free :class:`rayssl.loop.Trainer` its batch stream (this rank's shard of the
train dataset), rank, world size, device, a report function (``ray.train.report``, which Tune
sees through ``TuneReportCallback``) and rank 0's MLflow logging; then, on rank 0, logs the
teacher encoder to the run.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any, Dict, Optional

import ray
import ray.train
import ray.train.torch
import torch

from rayssl import tracking
from rayssl.checkpoint import storage_join
from rayssl.config import ExperimentConfig, from_dict
from rayssl.data import skip_stats
from rayssl.export import log_encoder
from rayssl.loop import Trainer, Worker, gather_objects
from rayssl.pictures import log_pca_picture

log = logging.getLogger("rayssl.train")

SYSTEM_METRICS_INTERVAL_S = 10.0


def train_loop_per_worker(loop_config: Dict[str, Any]) -> None:
    cfg: ExperimentConfig = from_dict(loop_config["cfg"])
    uri, run_id = loop_config["tracking_uri"], loop_config["mlflow_run_id"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    storage = loop_config["storage_path"]
    run_dir = storage_join(storage, loop_config["run_name"])
    shard = ray.train.get_dataset_shard

    # data.augment_on=gpu: the batch stays on the host (pinned) and the loop moves the crops, so the
    # photometric parameters never make a round trip to the device
    on_host = cfg.data.augment_on == "gpu"

    def batches():
        return shard("train").iter_torch_batches(
            batch_size=cfg.train.worker_batch_size, drop_last=True, prefetch_batches=cfg.train.prefetch_batches,
            device="cpu" if on_host else device, pin_memory=on_host and device.type == "cuda")

    def eval_batches():
        for b in shard("knn").iter_torch_batches(batch_size=256):
            yield b["image"], b["label"], b["knn_split"]

    worker = Worker(
        batches=batches, report=report, n_train=loop_config["n_train"], run_dir=run_dir, rank=rank, world=world,
        device=device, wrap=lambda m: ray.train.torch.prepare_model(m, move_to_device=False),
        registered_checkpoint=registered_path(ray.train.get_checkpoint(), storage),
        extra_state={"mlflow_run_id": run_id},
        before_step=fault_injector(loop_config.get("fault_injection_step", 0), run_dir, rank, world))
    if rank == 0:
        worker.eval_batches = eval_batches
        worker.make_logger = lambda resumed: tracking.ResumableLogger(uri, run_id, resumed)
        worker.picture = lambda method, images, step: log_pca_picture(method, images, uri, run_id, step)
        worker.epoch_extras = lambda epoch: {"data_skipped": count_skipped(cfg, epoch, run_id)}
        worker.tags = lambda tags: tracking.set_tags(uri, run_id, tags)
    trainer = Trainer(cfg, worker)

    node_ids = gather_objects(ray.get_runtime_context().get_node_id(), world)  # where the ranks run
    monitor = None
    if rank == 0:
        tracking.set_tags(uri, run_id, {"rayssl.worker_node_ids": ",".join(sorted(set(node_ids)))})
        if cfg.train.system_metrics:
            monitor = tracking.start_system_metrics(uri, run_id, SYSTEM_METRICS_INTERVAL_S)
    try:
        trainer.fit()
    finally:
        if monitor is not None:
            tracking.stop_system_metrics(monitor)
    if rank == 0:
        tracking.set_tags(uri, run_id, {"rayssl.resume_skipped_batches": trainer.skipped_batches})
        try:  # off the hot path: once, after the last report
            log_encoder(trainer.method, uri, run_id, image_size=cfg.data.eval_size)
        except Exception as err:  # noqa: BLE001  the run itself succeeded
            log.warning("could not export the final teacher encoder: %s", err)


def report(metrics: Dict[str, float], checkpoint_dir: Optional[str]) -> None:
    """``ray.train.report`` (a barrier: every rank calls it at the same steps); rank 0 passes the
    checkpoint directory, which Ray Train copies to the run's storage."""
    checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
    ray.train.report(metrics, checkpoint=checkpoint)


def registered_path(checkpoint: Optional[ray.train.Checkpoint], storage: str) -> Optional[str]:
    """Ray Train's record of the run's last checkpoint as a path the checkpointer can open."""
    if checkpoint is None:
        return None
    path = checkpoint.path
    if "://" in storage and "://" not in path:
        path = storage.split("://", 1)[0] + "://" + path.lstrip("/")
    return path


def count_skipped(cfg: ExperimentConfig, epoch: int, run_id: str) -> float:
    """Unreadable images this run's data actors skipped so far (logged, never fatal)."""
    stats = skip_stats(cfg.data, run_key=run_id)
    if stats["skipped"]:
        log.warning("epoch %d: %d unreadable images skipped so far, e.g. %s", epoch, stats["skipped"],
                    ", ".join(map(str, stats["first_bad"][:5])))
    return float(stats["skipped"])


def fault_injector(step: int, run_dir: str, rank: int, world: int):
    """Test hook (``fault_injection_step`` in the loop config, never in the user's config): the last
    rank SIGKILLs itself once, just before that step, on the first attempt only (a marker file
    under the run's storage directory records that it happened)."""
    marker = os.path.join(run_dir, f".fault_injected_step{step}")
    active = step > 0 and rank == world - 1

    def before_step(current: int) -> None:
        if not active or current != step or os.path.exists(marker):
            return
        os.makedirs(run_dir, exist_ok=True)
        with open(marker, "w") as f:
            f.write(str(current))
        log.warning("fault injection: SIGKILL of this worker (pid %d) at step %d", os.getpid(), current)
        os.kill(os.getpid(), signal.SIGKILL)

    return before_step
