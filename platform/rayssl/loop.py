"""The training loop of one worker (DDP rank), free of Ray: a :class:`Trainer` that reads top to
bottom and asks small collaborators (rayssl/checkpoint.py, rayssl/telemetry.py,
rayssl/evaluator.py; the method's own ``forward_backward``).

Whatever runs it hands it a :class:`Worker`: rank, world size, device, the batch stream and a
report function. The Ray adapter (rayssl/train.py) builds one from Ray Train's context; tests
build one from tensors and lists.
"""

from __future__ import annotations

import logging
import random
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from rayssl import method as method_door
from rayssl.checkpoint import Checkpointer
from rayssl.config import ExperimentConfig, steps_per_epoch
from rayssl.evaluator import EvalBatches, KnnEvaluator
from rayssl.telemetry import Telemetry, data_starvation_hint

log = logging.getLogger("rayssl.loop")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the message names the step and the term."""


@dataclass
class Worker:
    """What runs the loop hands it. ``batches()`` is the train stream from the epoch
    ``start_epoch(step)`` of the restored step: dicts with ``global`` uint8 [B,2,3,G,G],
    ``local`` uint8 [B,n,3,L,L] and ``epoch`` [B] (with ``data.augment_on=gpu`` also the
    photometric parameters ``global_params`` / ``local_params``, best left on the host). ``report(metrics, checkpoint_dir)``
    is called by every rank at the same steps (a barrier under Ray Train)."""

    batches: Callable[[], Iterable[Dict[str, torch.Tensor]]]
    report: Callable[[Dict[str, float], Optional[str]], None]
    n_train: int
    run_dir: str
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    eval_batches: Optional[EvalBatches] = None  # rank 0: the k-NN bank + queries
    make_logger: Optional[Callable[[bool], Any]] = None  # rank 0: (resumed) -> an object with .log(metrics, step)
    wrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m  # DDP
    registered_checkpoint: Optional[str] = None  # the runner's record of the last checkpoint
    picture: Optional[Callable[[Any, torch.Tensor, int], None]] = None  # the PCA picture at evaluations
    epoch_extras: Callable[[int], Dict[str, float]] = lambda epoch: {}  # rank 0, e.g. data_skipped
    extra_state: Dict[str, Any] = field(default_factory=dict)  # saved in every checkpoint (MLflow run id)
    tags: Callable[[Dict[str, Any]], None] = lambda tags: None  # rank 0: run tags (MLflow)
    before_step: Callable[[int], None] = lambda step: None  # test hook (fault injection)


class Trainer:
    """Builds the method and optimiser from ``cfg`` and trains them on ``worker``'s stream."""

    def __init__(self, cfg: ExperimentConfig, worker: Worker):
        self.cfg, self.worker = cfg, worker
        t = cfg.train
        self.global_batch = t.global_batch_size
        self.steps_per_epoch = steps_per_epoch(cfg, worker.n_train)
        if self.steps_per_epoch < 1:
            raise ValueError(f"train.global_batch_size={t.global_batch_size} exceeds the {worker.n_train} training "
                             f"images: no full step per epoch")
        self.total_steps = self.steps_per_epoch * t.epochs
        self.device = worker.device
        seed_everything(t.seed, worker.rank)
        self.method = method_door.build_method(cfg.method.name, cfg.method_kwargs())
        self.method.configure(self.total_steps, self.steps_per_epoch, self.global_batch)
        self.method.to(self.device)
        self.optimizer = torch.optim.AdamW(self.method.param_groups(), betas=(0.9, 0.999),
                                           fused=self.device.type == "cuda")
        self.checkpointer = Checkpointer(worker.run_dir, t.checkpoint_every, self.steps_per_epoch, self.total_steps,
                                         worker.registered_checkpoint, t.resume_from)
        d = cfg.data
        self.telemetry = Telemetry(
            t.log_every, self.global_batch, cfg.model.n_cls_prototypes, warn=worker.rank == 0,
            starvation_hint=lambda frac: data_starvation_hint(frac, d.num_actors, d.cpus_per_actor, d.max_cpus),
            memory=lambda: (torch.cuda.max_memory_allocated(self.device) / 2**30
                            if self.device.type == "cuda" else None))
        self.evaluator = None
        if worker.rank == 0 and worker.eval_batches is not None:
            self.evaluator = KnnEvaluator(worker.eval_batches, self.device, t.knn_every, t.knn_k, t.epochs,
                                          worker.picture, cfg.method.name)
        self.photometric = method_door.transforms(cfg.method.name).apply_photometric_batch
        use_bf16 = t.precision == "bf16" or (t.precision == "auto" and self.device.type == "cuda")
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if use_bf16 else None
        self.step, self.last_knn, self.skipped_batches, self.resumed_at = 0, {}, 0, 0
        self.model: torch.nn.Module = self.method
        self.logger: Optional[Any] = None

    # ---- the loop ------------------------------------------------------------------
    def fit(self) -> None:
        self.restore()  # the newest readable checkpoint of the run, else train.resume_from
        stream = prefetch_first(iter(self.worker.batches()))  # starts up while the initial k-NN runs
        if self.step == 0:
            self.evaluate(initial=True)  # the untrained teacher: the baseline every run should beat
        if self.step >= self.total_steps:
            self.report({"epoch": self.cfg.train.epochs, "step": self.step, **self.last_knn}, checkpoint=False)
            return  # resumed from the final checkpoint (e.g. a paused trial): only the last result
        log.info("rank %d: training steps %d-%d of %d (%d epochs x %d, global batch %d on %d workers, %s)",
                 self.worker.rank, self.step, self.total_steps, self.total_steps, self.cfg.train.epochs,
                 self.steps_per_epoch, self.global_batch, self.worker.world, self.device)
        self.telemetry.restart()
        for batch in self.batches(stream):
            hparams = self.method.apply_schedules(self.optimizer, self.step)
            values = check_finite(self.forward_backward(*self.crops(batch)), self.step)  # also the step's host sync
            grad_norms = self.optimizer_step(hparams["momentum"])
            self.step += 1
            self.telemetry.add({**values, **hparams, **grad_norms})
            epoch_end = self.step % self.steps_per_epoch == 0
            if self.telemetry.due(self.step) or epoch_end:
                self.log(self.telemetry.flush(self.step, epoch_end))
            if epoch_end:
                self.end_epoch()
            elif self.checkpointer.due(self.step):
                self.report(self.progress(), checkpoint=True)
            if self.step >= self.total_steps:
                break

    def crops(self, batch: Dict[str, torch.Tensor]):
        """(global [B,2,3,G,G], local [B,n,3,L,L] | None) uint8 crops on the device. With
        ``data.augment_on=gpu`` the actors left the photometric ops: they run here, batched, from
        per-crop parameters that stay on the host (no device sync)."""
        g = batch["global"].to(self.device, non_blocking=True)
        loc = batch["local"].to(self.device, non_blocking=True)
        if "global_params" in batch:
            g, loc = self.photometric(g, loc, batch["global_params"], batch["local_params"])
        return g, (loc if loc.shape[1] > 0 else None)

    def forward_backward(self, global_crops: torch.Tensor, local_crops: Optional[torch.Tensor]
                         ) -> Dict[str, torch.Tensor]:
        """The method's forward and backward over the worker's batch, in ``train.accumulate``
        micro-batches (each loss scaled by 1/k, DDP's all-reduce on the last); the loss terms
        averaged over them."""
        k = self.cfg.train.accumulate
        if k == 1:
            out = self.method.forward_backward(global_crops, local_crops, runner=self.model, autocast=self.autocast)
            return method_door.loss_terms(out)
        terms = []
        for i, (g, loc) in enumerate(zip(global_crops.chunk(k), local_crops.chunk(k) if local_crops is not None
                                         else [None] * k)):
            out = self.method.forward_backward(g, loc, runner=self.model, autocast=self.autocast, loss_scale=1.0 / k,
                                               sync=i == k - 1)
            terms.append(method_door.loss_terms(out))
        return {name: torch.stack([t[name].float() for t in terms]).mean() for name in terms[0]}

    def optimizer_step(self, momentum: float) -> Dict[str, float]:
        """Clip, AdamW step, EMA teacher update; returns the gradient norms before clipping."""
        grad_norms = self.method.clip_gradients()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.method.update_teacher(momentum)
        return grad_norms

    def end_epoch(self) -> None:
        """Epoch means of the loss terms, k-NN when due, a checkpoint when due, one report."""
        epoch = self.step // self.steps_per_epoch
        metrics = self.telemetry.epoch_means(self.steps_per_epoch, self.all_reduce_mean)
        last = self.telemetry.last
        metrics.update(epoch=epoch, step=self.step, images_per_s=last["train/images_per_s"],
                       data_wait_frac=last["train/data_wait_frac"])
        if self.evaluator is not None and self.evaluator.due(epoch):
            self.evaluate()
            log.info("epoch %d/%d step %d: loss %.4f, k-NN top-1 %.2f%%", epoch, self.cfg.train.epochs,
                     self.step, metrics["loss"], self.last_knn["knn_top1"])
        metrics.update(self.last_knn)
        if self.worker.rank == 0:
            metrics.update(self.worker.epoch_extras(epoch))
        self.log(metrics)
        self.report(metrics, checkpoint=self.checkpointer.due(self.step))

    def evaluate(self, initial: bool = False) -> None:
        if self.evaluator is None:
            return
        self.last_knn = self.evaluator.run(self.method, self.step)
        if initial:
            self.log({f"{k}_init": v for k, v in self.last_knn.items()})

    def progress(self) -> Dict[str, float]:
        """A mid-epoch report: the completed epochs (ASHA's time) and the last k-NN (the sweep metric)."""
        metrics = {"epoch": self.step // self.steps_per_epoch, "step": self.step, **self.last_knn}
        if "train/loss" in self.telemetry.last:
            metrics["loss"] = self.telemetry.last["train/loss"]
        return metrics

    def log(self, metrics: Dict[str, float]) -> None:
        if self.logger is not None:
            self.logger.log(metrics, self.step)

    # ---- the stream ----------------------------------------------------------------
    def batches(self, it: Iterator[Dict[str, torch.Tensor]]) -> Iterator[Dict[str, torch.Tensor]]:
        """The worker's stream ``it`` from the restored step on. The stream starts at the
        checkpoint's epoch, so at most the part of that epoch already trained is skipped; the
        seconds spent waiting for each batch go to the telemetry."""
        first_epoch = self.step // self.steps_per_epoch
        skip = self.step - first_epoch * self.steps_per_epoch
        step, checking = self.step, True
        while step < self.total_steps:
            t0 = time.perf_counter()
            batch = next(it, None)
            self.telemetry.wait += time.perf_counter() - t0
            if batch is None:
                raise RuntimeError(f"the data stream ended at step {step} of {self.total_steps}")
            if checking:  # until the first batch to train on: a host sync, then never again
                if int(batch["epoch"][0]) < first_epoch:  # a stream that starts before the checkpoint
                    self.skipped_batches += 1
                    continue
                if skip > 0:  # the part of the checkpoint's epoch already trained
                    skip -= 1
                    self.skipped_batches += 1
                    continue
                checking = False
            self.worker.before_step(step)
            yield batch
            step += 1

    # ---- checkpoints ---------------------------------------------------------------
    def restore(self) -> None:
        """Continue from the newest readable checkpoint (rank 0's choice, on every rank)."""
        candidates = gather_objects(self.checkpointer.candidates(), self.worker.world)[0]
        state, path = self.checkpointer.load(candidates)
        if state is not None:
            self.method.load_state_dict(state["method"])
            self.optimizer.load_state_dict(state["optimizer"])
            rank = self.worker.rank
            restore_rng(state["rng"][min(rank, len(state["rng"]) - 1)])
            generators = state.get("generators") or []
            for name, gen_state in (generators[min(rank, len(generators) - 1)] if generators else {}).items():
                gen = torch.Generator()
                gen.set_state(gen_state)
                setattr(self.method, name, gen)
            self.step, self.last_knn = int(state["step"]), dict(state.get("last_knn") or {})
            self.resumed_at = self.step
            log.info("rank %d resumed at step %d/%d from %s", rank, self.step, self.total_steps, path)
            if rank == 0:
                self.worker.tags({"rayssl.resumed_at_step": self.step})
        if self.worker.make_logger is not None:
            self.logger = self.worker.make_logger(self.step > 0)
        if self.cfg.train.compile:
            self.method.compile()  # in place (the method's own choice of what to compile)
        if self.worker.world > 1:
            self.model = self.worker.wrap(self.method)

    def report(self, metrics: Dict[str, float], checkpoint: bool) -> None:
        """Report on every rank; with a checkpoint, rank 0 writes it (every rank's RNG travels in it)."""
        if not checkpoint:
            self.worker.report(metrics, None)
            return
        rng = gather_objects(rng_state(), self.worker.world)
        gens = gather_objects(method_generators(self.method), self.worker.world)
        with tempfile.TemporaryDirectory() as tmp:
            path = None
            if self.worker.rank == 0:
                path = self.checkpointer.save({
                    "method": self.method.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                    "epoch": metrics.get("epoch"), "rng": rng, "generators": gens, "last_knn": dict(self.last_knn),
                    "config": self.cfg.to_dict(), **self.worker.extra_state}, tmp)
            self.worker.report(metrics, path)

    def all_reduce_mean(self, values: Dict[str, float]) -> Dict[str, float]:
        if not (dist.is_available() and dist.is_initialized()) or not values:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64,
                         device=self.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        t /= dist.get_world_size()
        return dict(zip(keys, t.tolist()))


# ---------------------------------------------------------------------------------------
# Small pieces
# ---------------------------------------------------------------------------------------

def check_finite(terms: Dict[str, torch.Tensor], step: int) -> Dict[str, float]:
    """The terms' values as floats; stops on a NaN/inf on every rank at once (one rank alone would
    hang DDP), naming the step and the terms."""
    values = torch.stack([t.detach().float().reshape(()) for t in terms.values()]).cpu()
    bad = ~torch.isfinite(values)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(bad_flags := bad.to(torch.int32))
        bad = bad_flags > 0
    if bool(bad.any()):
        names = [k for k, b in zip(terms, bad.tolist()) if b]
        raise NonFiniteLossError(f"non-finite loss at step {step}: {', '.join(names)} "
                                 f"(values {[float(terms[k]) for k in names]})")
    return dict(zip(terms, values.tolist()))


def prefetch_first(it: Iterator) -> Iterator:
    """``it`` whose first item is fetched in a background thread from now on."""
    first: Future = Future()

    def fetch():
        try:
            first.set_result(next(it, StopIteration))
        except BaseException as err:  # noqa: BLE001  raised where the item is taken
            first.set_exception(err)

    # a daemon: a run that ends before taking the item must not wait for it at exit
    threading.Thread(target=fetch, name="first-batch", daemon=True).start()

    def chained():
        item = first.result()
        if item is StopIteration:
            return
        yield item
        yield from it

    return chained()


def gather_objects(obj: Any, world: int) -> List[Any]:
    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def method_generators(method: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """States of the CPU ``torch.Generator`` attributes of the method (e.g. DINOv3's mask sampler)."""
    return {k: v.get_state() for k, v in vars(method).items()
            if isinstance(v, torch.Generator) and v.device.type == "cpu"}


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


def start_epoch(step: int, steps_per_epoch: int, epochs: int) -> int:
    """The epoch a stream resumed at ``step`` starts at (the last one for a finished run)."""
    return min(step // max(steps_per_epoch, 1), epochs - 1)
