"""The per-worker training loop run by every Ray Train worker (DDP rank).

Reads top to bottom: build the method, restore a checkpoint, then one pass over
the multi-epoch stream of multi-crop batches (step -> schedules -> forward ->
backward -> clip -> AdamW -> EMA teacher), with windowed telemetry to MLflow
from rank 0 and, at each epoch end, k-NN evaluation (plus a PCA picture), a
checkpoint and a ``ray.train.report`` (which Tune sees through
``TuneReportCallback``); with ``train.checkpoint_every > 0`` also a checkpoint and
report every that many steps. A restarted or re-run worker group resumes from the
last checkpoint and logs only steps its MLflow run does not hold yet. At the end,
rank 0 attaches the teacher encoder (rayssl/export.py) to the run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import tempfile
import time
from collections import defaultdict
from typing import Any, Dict, List, Optional

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from rayssl.config import ExperimentConfig, from_dict
from rayssl.method import build_method, knn_classify, loss_terms, method_parts
from rayssl.tracking import MetricLogger, set_tags

log = logging.getLogger("rayssl.train")

CHECKPOINT_FILE = "state.pt"
EPOCH_METRICS = ("loss", "loss_cls", "loss_patch", "loss_koleo")
COLLAPSE_FRACTION = 0.95  # teacher target entropy above this fraction of ln K: near-uniform collapse
PCA_IMAGES = 4  # held-out images in the PCA picture at each k-NN evaluation
SYSTEM_METRICS_INTERVAL_S = 10.0
EVAL_ATTEMPTS = 3  # the k-NN eval sets are re-read from the start after a transient Ray Data failure
EVAL_CACHE_BYTES = 2 << 30  # keep the decoded k-NN bank + queries in rank 0's memory up to 2 GiB
DATA_WAIT_WARN = 0.2  # rank 0 warns when a telemetry window spent more than this share waiting for data


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the message names the step and the term."""


def train_loop_per_worker(loop_config: Dict[str, Any]) -> None:
    cfg: ExperimentConfig = from_dict(loop_config["cfg"])
    tracking_uri, run_id = loop_config["tracking_uri"], loop_config["mlflow_run_id"]
    n_train: int = loop_config["n_train"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # Schedules are per step, so the run length must be known up front.
    global_batch = cfg.train.batch_size * world
    steps_per_epoch = n_train // global_batch
    if steps_per_epoch < 1:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} x {world} workers exceeds the "
                         f"{n_train} training images: no full step per epoch")
    total_steps = steps_per_epoch * cfg.train.epochs

    seed_everything(cfg.train.seed, rank)
    method = build_method(cfg.method.name, cfg.method_kwargs())
    method.configure(total_steps, steps_per_epoch, global_batch)
    method.to(device)
    optimizer = torch.optim.AdamW(method.param_groups(), betas=(0.9, 0.999),
                                  fused=device.type == "cuda")

    # Resume: the newest readable checkpoint of this run (after a failure or a re-run of the
    # same name), else train.resume_from.
    start_step = 0
    last_knn: Dict[str, float] = {}
    run_dir = storage_join(loop_config.get("storage_path") or cfg.storage_path, loop_config.get("run_name") or "run")
    candidates = gather_objects(resume_candidates(run_dir, ray.train.get_checkpoint()), world)[0]  # rank 0's view
    if not candidates and loop_config.get("resume_from"):
        candidates = [ray.train.Checkpoint(loop_config["resume_from"])]
    state, source = load_first_readable(candidates)
    if state is not None:
        start_step, last_knn = load_state(state, method, optimizer, rank)
        del state
        log.info("rank %d resumed at step %d/%d from %s", rank, start_step, total_steps, source)

    if cfg.train.compile:
        method.compile()  # in place (nn.Module.compile, or the method's own choice of what to compile)
    model = method
    if world > 1:
        model = ray.train.torch.prepare_model(method, move_to_device=False)
    use_bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext)

    logger = ResumableLogger(tracking_uri, run_id, resumed=start_step > 0) if rank == 0 else None
    node_ids = gather_objects(ray.get_runtime_context().get_node_id(), world)  # where the ranks run
    if rank == 0:
        tags = {"rayssl.worker_node_ids": ",".join(sorted(set(node_ids)))}
        if start_step > 0:
            tags["rayssl.resumed_at_step"] = start_step
        set_tags(tracking_uri, run_id, tags)
    monitor = start_system_metrics(tracking_uri, run_id, resume=start_step > 0) \
        if rank == 0 and cfg.train.system_metrics else None
    fault = FaultInjector(cfg, loop_config, rank, world)
    batches = ray.train.get_dataset_shard("train").iter_torch_batches(
        batch_size=cfg.train.batch_size, prefetch_batches=cfg.train.prefetch_batches,
        drop_last=True, device=device)
    # The first batch is fetched in a background thread from here on: the train stream starts
    # its actors while rank 0 runs the initial k-NN evaluation, not after it.
    batch_iter = FirstFetchedAhead(iter(batches))
    collapse_entropy = COLLAPSE_FRACTION * math.log(cfg.model.n_cls_prototypes)
    ckpt_every = cfg.train.checkpoint_every

    step, to_skip = start_step, start_step
    window, epoch_sums = defaultdict(float), defaultdict(float)
    window_wait, window_steps = 0.0, 0
    last_window: Dict[str, float] = {}
    warned_collapse = warned_wait = False
    eval_cache: Dict[str, Any] = {}
    if rank == 0 and start_step == 0:
        # The same k-NN on the untrained teacher: the baseline every trial should beat.
        last_knn = evaluate_knn(method, cfg, device, tracking_uri, run_id, step=0, cache=eval_cache)
        logger.log({f"{k}_init": v for k, v in last_knn.items()}, 0)
    if rank == 0:
        log.info("training %d steps (%d epochs x %d steps, global batch %d on %d workers, %s)",
                 total_steps, cfg.train.epochs, steps_per_epoch, global_batch, world, device)
    window_start = time.perf_counter()  # after the initial k-NN: the first window times training only
    if start_step >= total_steps and last_knn:
        # Resumed from the final checkpoint (e.g. a trial paused right after its last epoch):
        # nothing to train, but Tune must still see the last epoch's result.
        report({"epoch": cfg.train.epochs, "step": step, **last_knn}, method, optimizer, step, run_id, rank,
               world, last_knn, False, cfg)
    try:
        while step < total_steps:
            t0 = time.perf_counter()
            batch = next(batch_iter, None)
            window_wait += time.perf_counter() - t0
            if batch is None:
                raise RuntimeError(f"the data stream ended at step {step} of {total_steps}")
            if to_skip > 0:  # resuming: the stream restarts at epoch 0, so fast-forward exactly
                to_skip -= 1
                continue
            fault.maybe_kill(step)

            hparams = method.apply_schedules(optimizer, step)
            local = batch["local"] if batch["local"].shape[1] > 0 else None
            optimizer.zero_grad(set_to_none=True)
            # A method may split its loss into parts, each with its own backward (less activation
            # memory); DDP all-reduces on the last one. The last part's output holds the step's terms.
            parts = method_parts(method, local)
            loss_sum = 0.0
            for i, part in enumerate(parts):
                no_sync = model.no_sync() if world > 1 and i < len(parts) - 1 else contextlib.nullcontext()
                with no_sync:
                    with autocast():
                        out = model(batch["global"], local) if part is None else \
                            model(batch["global"], local, part=part)
                    loss_sum = loss_sum + out.loss.detach()  # the parts add up to the step's loss
                    if i == len(parts) - 1:
                        terms = {**loss_terms(out), "loss": loss_sum}
                        values = check_finite(terms, step)  # one host sync per step: also the NaN guard
                    out.loss.backward()
            grad_norms = method.clip_gradients()
            optimizer.step()
            method.update_teacher(hparams["momentum"])
            step += 1

            for k, v in zip(terms, values.tolist()):
                window[k] += v
                if k in EPOCH_METRICS:
                    epoch_sums[k] += v
            for k, v in {**hparams, **grad_norms}.items():
                window[k] += float(v)
            window_steps += 1

            epoch_end = step % steps_per_epoch == 0
            if step % cfg.train.log_every == 0 or epoch_end:
                wall = time.perf_counter() - window_start
                telemetry = {f"train/{k}": v / window_steps for k, v in window.items()}
                telemetry["train/images_per_s"] = window_steps * global_batch / wall
                telemetry["train/data_wait_frac"] = window_wait / wall
                if device.type == "cuda":
                    telemetry["train/peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                entropy = telemetry.get("train/teacher_entropy")
                if entropy is not None:
                    collapsed = entropy > collapse_entropy
                    telemetry["collapse_warning"] = float(collapsed)
                    if collapsed and rank == 0 and (epoch_end or not warned_collapse):  # not every window
                        warned_collapse = True
                        log.warning("step %d: teacher target entropy %.4f > %.2f ln(K=%d) = %.4f: the teacher "
                                    "is near uniform collapse", step, entropy, COLLAPSE_FRACTION,
                                    cfg.model.n_cls_prototypes, collapse_entropy)
                # not after the first window (last_window empty): it also holds the stream's start-up
                if rank == 0 and last_window and (epoch_end or not warned_wait):
                    hint = data_starvation_hint(telemetry["train/data_wait_frac"], cfg.data)
                    if hint:
                        warned_wait = True
                        log.warning("step %d: %s", step, hint)
                if logger:
                    logger.log(telemetry, step)
                last_window = telemetry
                window.clear()
                window_start, window_wait, window_steps = time.perf_counter(), 0.0, 0

            due = ckpt_every > 0 and step % ckpt_every == 0
            if epoch_end:
                epoch = step // steps_per_epoch
                metrics = {k: v / steps_per_epoch for k, v in all_reduce_mean(epoch_sums, device).items()}
                epoch_sums.clear()
                metrics.update(epoch=epoch, step=step, images_per_s=last_window["train/images_per_s"],
                               data_wait_frac=last_window["train/data_wait_frac"])
                if epoch % cfg.train.knn_every == 0 or epoch == cfg.train.epochs:
                    if rank == 0:
                        last_knn = evaluate_knn(method, cfg, device, tracking_uri, run_id, step=step, cache=eval_cache)
                        log.info("epoch %d/%d step %d: loss %.4f, k-NN top-1 %.2f%%", epoch, cfg.train.epochs,
                                 step, metrics["loss"], last_knn["knn_top1"])
                metrics.update(last_knn)
                if rank == 0:
                    metrics["data_skipped"] = count_skipped(cfg, epoch, run_id)
                if logger:
                    logger.log(metrics, step)
                with_ckpt = ckpt_every == 0 or due or step == total_steps
                report(metrics, method, optimizer, step, run_id, rank, world, last_knn, with_ckpt, cfg)
            elif due:
                # Mid-epoch checkpoint. Every report reaches Tune: it carries the last k-NN
                # value (the sweep metric) and the completed epochs (ASHA's time_attr).
                metrics = {"epoch": step // steps_per_epoch, "step": step, **last_knn}
                if "train/loss" in last_window:
                    metrics["loss"] = last_window["train/loss"]
                report(metrics, method, optimizer, step, run_id, rank, world, last_knn, True, cfg)
    finally:
        if monitor is not None:
            stop_system_metrics(monitor)

    if rank == 0:  # off the hot path: once, after the last report
        from rayssl.export import log_encoder

        try:
            log_encoder(method, tracking_uri, run_id, image_size=cfg.data.eval_size)
        except Exception as err:  # noqa: BLE001  the run itself succeeded
            log.warning("could not export the final teacher encoder: %s", err)


def data_starvation_hint(wait_frac: float, data_cfg) -> Optional[str]:
    """Advice when the training step waited for the next batch more than DATA_WAIT_WARN of a
    window's wall time, else None.

    The stream is then the bottleneck and delivers what its actors make; the step alone would
    run 1 / (1 - wait_frac) times as fast, so about actors / (1 - wait_frac) actors keep it fed.
    """
    from rayssl.data import train_actor_count

    if wait_frac <= DATA_WAIT_WARN:
        return None
    actors = train_actor_count(data_cfg)
    need = math.ceil(actors / max(1.0 - wait_frac, 0.05))
    cap = f", data.max_cpus={data_cfg.max_cpus:g}" if data_cfg.max_cpus is not None else ""
    return (f"the step waited for data {100 * wait_frac:.0f}% of the time (data_wait_frac "
            f"{wait_frac:.2f}): the multi-crop actors are the bottleneck; about {need} actors "
            f"would keep up (now data.num_actors={data_cfg.num_actors}{cap}, "
            f"{data_cfg.cpus_per_actor:g} CPU each)")


def count_skipped(cfg: ExperimentConfig, epoch: int, run_id: str) -> float:
    """Unreadable images this run's data actors skipped so far (logged, never fatal)."""
    from rayssl.data import DataSpec, skip_stats

    stats = skip_stats(DataSpec.from_any(cfg.data), run_key=run_id)
    if stats["skipped"]:
        log.warning("epoch %d: %d unreadable images skipped so far, e.g. %s", epoch, stats["skipped"],
                    ", ".join(map(str, stats["first_bad"][:5])))
    return float(stats["skipped"])


def storage_join(storage_path: str, name: str) -> str:
    return f"{storage_path.rstrip('/')}/{name}" if "://" in storage_path else os.path.join(storage_path, name)


def resume_candidates(run_dir: str, registered: Optional[ray.train.Checkpoint]) -> List[ray.train.Checkpoint]:
    """Checkpoints to try, best first: every ``checkpoint_*`` under the run's storage
    directory, newest first (Ray names them by time), then the one Ray Train registered.

    Ray Train registers a reported checkpoint asynchronously: a worker killed just after
    ``ray.train.report`` leaves a complete checkpoint on storage that the controller never
    recorded, and trusting only ``get_checkpoint()`` would repeat a whole checkpoint
    interval (or restart a re-run from step 0). Incomplete ones are skipped when loading.
    """
    import pyarrow.fs as pafs

    found: List[ray.train.Checkpoint] = []
    try:
        if "://" in run_dir:
            fs, root = pafs.FileSystem.from_uri(run_dir)
        else:
            fs, root = pafs.LocalFileSystem(), os.path.abspath(run_dir)
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
        dirs = sorted((i.path for i in infos
                       if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")), reverse=True)
        found = [ray.train.Checkpoint(path=d, filesystem=fs) for d in dirs]
    except Exception as err:  # noqa: BLE001  an unlistable store falls back to Ray's own record
        log.warning("cannot list checkpoints under %s (%s); using Ray Train's latest", run_dir, err)
    if registered is not None and registered.path not in {c.path for c in found}:
        found.append(registered)
    return found


def load_first_readable(checkpoints: List[ray.train.Checkpoint]):
    """(state dict, path) of the first checkpoint that loads, or (None, None)."""
    for checkpoint in checkpoints:
        try:
            with checkpoint.as_directory() as ckpt_dir:
                state = torch.load(os.path.join(ckpt_dir, CHECKPOINT_FILE), map_location="cpu", weights_only=False)
            return state, checkpoint.path
        except Exception as err:  # noqa: BLE001  a checkpoint cut short by the failure itself
            log.warning("skipping unreadable checkpoint %s: %s", checkpoint.path, err)
    return None, None


def load_state(state: Dict[str, Any], method: torch.nn.Module, optimizer: torch.optim.Optimizer,
               rank: int):
    """Restore one checkpoint's state in place; returns (step, last k-NN metrics)."""
    method.load_state_dict(state["method"])
    optimizer.load_state_dict(state["optimizer"])
    restore_rng(state["rng"][min(rank, len(state["rng"]) - 1)])
    generators = state.get("generators") or []
    for name, gen_state in (generators[min(rank, len(generators) - 1)] if generators else {}).items():
        gen = torch.Generator()
        gen.set_state(gen_state)
        setattr(method, name, gen)
    return int(state["step"]), dict(state.get("last_knn") or {})


def method_generators(method: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """States of the CPU ``torch.Generator`` attributes of the method (e.g. DINOv3's mask sampler)."""
    return {k: v.get_state() for k, v in vars(method).items()
            if isinstance(v, torch.Generator) and v.device.type == "cpu"}


def report(metrics: Dict[str, float], method: torch.nn.Module, optimizer: torch.optim.Optimizer,
           step: int, run_id: str, rank: int, world: int, last_knn: Optional[Dict[str, float]] = None,
           with_checkpoint: bool = True, cfg: Optional[ExperimentConfig] = None) -> None:
    """Checkpoint (rank 0 writes; every rank's RNG state travels with it) and report.

    ``ray.train.report`` is a barrier: every rank calls it at the same steps. The
    checkpoint holds student + teacher (the method's state dict), the optimiser, the
    step (the schedule position: schedules are functions of the step), each rank's
    Python/NumPy/torch RNG and mask-sampler states, the data epoch, the last k-NN
    metrics, the MLflow run id and the config.
    """
    if not with_checkpoint:
        ray.train.report(metrics)
        return
    rng = gather_objects(rng_state(), world)
    gens = gather_objects(method_generators(method), world)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            torch.save({"method": method.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                        "epoch": metrics.get("epoch"), "rng": rng, "generators": gens,
                        "last_knn": dict(last_knn or {}), "mlflow_run_id": run_id,
                        "config": cfg.to_dict() if cfg is not None else None},
                       os.path.join(tmp, CHECKPOINT_FILE))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


class ResumableLogger(MetricLogger):
    """MetricLogger that, in a resumed run, drops points at steps the run already holds.

    A restarted worker group replays the steps between the last checkpoint and the
    failure; their metrics were logged by the previous attempt, so only steps past the
    last logged step of each key are sent (no duplicated step indices).
    """

    def __init__(self, uri: str, run_id: str, resumed: bool):
        super().__init__(uri, run_id)
        self.floor: Dict[str, int] = {}
        if resumed:
            run = self.client.get_run(run_id)
            for key in run.data.metrics:
                if key.startswith("system/"):
                    continue
                steps = [m.step for m in self.client.get_metric_history(run_id, key)]
                if steps:
                    self.floor[key] = max(steps)

    def log(self, metrics: Dict[str, float], step: int) -> None:
        fresh = {k: v for k, v in metrics.items() if step > self.floor.get(k, -1)}
        if fresh:
            super().log(fresh, step)


class FirstFetchedAhead:
    """An iterator whose first item is being fetched in a background thread from construction."""

    def __init__(self, it):
        import threading
        from concurrent.futures import Future

        self._it, self._first = it, Future()

        def fetch():
            try:
                self._first.set_result(next(it, None))
            except BaseException as err:  # noqa: BLE001  raised where the item is taken
                self._first.set_exception(err)

        # a daemon: a run that ends before taking the item must not wait for it at exit
        threading.Thread(target=fetch, name="first-batch", daemon=True).start()

    def __iter__(self):
        return self

    def __next__(self):
        if self._first is not None:
            first, self._first = self._first.result(), None
            if first is None:
                raise StopIteration
            return first
        return next(self._it)


class FaultInjector:
    """Test hook (``train.fault_injection_step``, 0 = off): the last rank SIGKILLs itself
    once, just before computing that step, on the first attempt only (a marker file under
    the run's storage directory records that it happened)."""

    def __init__(self, cfg: ExperimentConfig, loop_config: Dict[str, Any], rank: int, world: int):
        self.step = int(cfg.train.fault_injection_step)
        self.active = self.step > 0 and rank == world - 1
        self.marker = os.path.join(loop_config.get("storage_path") or cfg.storage_path,
                                   loop_config.get("run_name") or "run", f".fault_injected_step{self.step}")

    def maybe_kill(self, step: int) -> None:
        if not self.active or step != self.step or os.path.exists(self.marker):
            return
        os.makedirs(os.path.dirname(self.marker), exist_ok=True)
        with open(self.marker, "w") as f:
            f.write(str(step))
        log.warning("fault injection: SIGKILL of this worker (pid %d) at step %d", os.getpid(), step)
        os.kill(os.getpid(), signal.SIGKILL)


def start_system_metrics(uri: str, run_id: str, resume: bool):
    """MLflow's system-metrics sampler (CPU, memory, disk, network; GPU with nvidia-ml-py)."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S,
                                       samples_before_logging=1, resume_logging=resume, tracking_uri=uri)
        monitor.start()
        return monitor
    except Exception as err:  # noqa: BLE001  telemetry must never stop training
        log.warning("system metrics disabled: %s", err)
        return None


def stop_system_metrics(monitor) -> None:
    try:
        monitor.finish()
    except Exception as err:  # noqa: BLE001
        log.warning("could not stop system metrics: %s", err)


@torch.no_grad()
def evaluate_knn(method: torch.nn.Module, cfg: ExperimentConfig, device: torch.device,
                 tracking_uri: Optional[str] = None, run_id: Optional[str] = None,
                 step: int = 0, cache: Optional[Dict[str, Any]] = None) -> Dict[str, float]:
    """Weighted k-NN top-1 (%) of teacher CLS features: labelled train bank vs held-out queries.

    With a run id, also logs the PCA picture of the first query images' patch features
    (``pca/step_XXXXXX.png``). ``cache`` (a dict owned by the caller) keeps the decoded
    eval images in memory after the first evaluation when they are small enough.
    """
    was_training = method.training
    method.eval()
    for attempt in range(1, EVAL_ATTEMPTS + 1):
        try:
            feats, first_queries = eval_features(method, {} if cache is None else cache, device)
            break
        except Exception as err:  # noqa: BLE001  e.g. Ray Data's actors failing to start on a busy node
            if attempt == EVAL_ATTEMPTS:
                raise
            log.warning("k-NN evaluation at step %d failed (attempt %d of %d), retrying: %s",
                        step, attempt, EVAL_ATTEMPTS, err)
            time.sleep(2.0 * attempt)
    if run_id is not None and first_queries is not None and hasattr(method, "patch_features"):
        from rayssl.pictures import log_pca_picture

        try:
            log_pca_picture(method, first_queries, tracking_uri, run_id, step)
        except Exception as err:  # noqa: BLE001  a picture must never stop training
            log.warning("could not log the PCA picture at step %d: %s", step, err)
    method.train(was_training)
    (bank_x, bank_y), (query_x, query_y) = feats["knn_bank"], feats["knn_query"]
    n_classes = int(max(bank_y.max(), query_y.max())) + 1
    ks = sorted({10, cfg.train.knn_k, 100})
    acc = knn_classify(bank_x, bank_y, query_x, query_y, ks=ks, n_classes=n_classes)
    out = {"knn_top1": float(acc[cfg.train.knn_k])}
    out.update({f"knn_top1_k{k}": float(v) for k, v in acc.items()})
    return out


def eval_features(method: torch.nn.Module, cache: Dict[str, Any], device: torch.device):
    """({"knn_bank" | "knn_query": (teacher CLS features [n, D], labels [n])}, first query images)."""
    from rayssl.data import KNN_BANK, KNN_QUERY

    xs, ys, splits, queries = [], [], [], []
    for images, labels, split in eval_batches(cache, device):
        if sum(len(q) for q in queries) < PCA_IMAGES:
            queries.append(images[split == KNN_QUERY][:PCA_IMAGES])
        xs.append(method.embed(images).float())
        ys.append(labels)
        splits.append(split)
    x, y, split = torch.cat(xs), torch.cat(ys), torch.cat(splits)
    feats = {"knn_bank": (x[split == KNN_BANK], y[split == KNN_BANK]),
             "knn_query": (x[split == KNN_QUERY], y[split == KNN_QUERY])}
    first_queries = torch.cat(queries)[:PCA_IMAGES] if queries else None
    return feats, (first_queries if first_queries is not None and len(first_queries) else None)


def eval_batches(cache: Dict[str, Any], device: torch.device, batch_size: int = 256):
    """(images uint8 [b,3,S,S], labels [b], knn_split [b]) of the k-NN dataset on ``device``: from
    Ray Data the first time, then from ``cache`` if the whole set fits in EVAL_CACHE_BYTES
    (re-streaming it each epoch costs a Ray Data execution)."""
    if "knn" in cache:
        columns = cache["knn"]
        for i in range(0, len(columns[0]), batch_size):
            yield tuple(c[i:i + batch_size].to(device) for c in columns)
        return
    kept, n_bytes = [], 0
    for batch in ray.train.get_dataset_shard("knn").iter_torch_batches(batch_size=batch_size):
        columns = (batch["image"], batch["label"], batch["knn_split"])
        n_bytes += columns[0].numel()
        if n_bytes <= EVAL_CACHE_BYTES:
            kept.append(columns)
        yield tuple(c.to(device) for c in columns)
    if n_bytes <= EVAL_CACHE_BYTES and kept:
        cache["knn"] = tuple(torch.cat(c) for c in zip(*kept))


def check_finite(terms: Dict[str, torch.Tensor], step: int) -> torch.Tensor:
    """Stop on a NaN/inf loss term, on every rank at once (one rank alone would hang DDP).

    Returns the terms' values as a CPU float tensor, in ``terms`` order.
    """
    values = torch.stack([t.detach().float().reshape(()) for t in terms.values()]).cpu()
    bad = ~torch.isfinite(values)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(bad_flags := bad.to(torch.int32))
        bad = bad_flags > 0
    if bool(bad.any()):
        names = [k for k, b in zip(terms, bad.tolist()) if b]
        raise NonFiniteLossError(f"non-finite loss at step {step}: {', '.join(names)} "
                                 f"(values {[float(terms[k]) for k in names]})")
    return values


def all_reduce_mean(values: Dict[str, float], device: torch.device) -> Dict[str, float]:
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64,
                     device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def gather_objects(obj: Any, world: int) -> list:
    if world == 1 or not dist.is_initialized():
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def seed_everything(seed: int, rank: int) -> None:
    s = seed * 1000 + rank  # distinct masks per rank, reproducible per run
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
