"""The launch plan (``plan=true``): what a run or sweep will do, printed in seconds, no training.

Resources per trial and how many trials fit the target cluster (a live one with ``ray.address``
or ``RAY_ADDRESS``, else this machine), batch sizes, the scaled peak lr, schedule lengths in
steps, crop sizes and patch grids, the images/s the data actors can deliver against what the
model will consume, the MLflow URI and storage path, and every warning.

Throughputs are estimates from measured rates (docs/benchmarks.md): a data actor's cost per
image grows with the crop pixels it makes; a worker's rate is the model's FLOPs per image
(counted from its shapes) over the FLOP/s this repo's step reached on that device.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from rayssl import method as method_door
from rayssl.config import ConfigError, ExperimentConfig, data_cpu_budget, steps_per_epoch, trial_resources
from rayssl.data.catalog import validate_source
from rayssl.data.spec import DataSourceError

log = logging.getLogger("rayssl.plan")

# Multi-crop actor cost per image on one core: ACTOR_MS_FIXED + ACTOR_MS_PER_PIXEL x (crop pixels
# 2 G^2 + n L^2); fitted to bench_data.py (a) on a 2-core AMD EPYC, 2026-11-27: ~1,300 images/s
# at 32/16 px with 6 locals, ~90 images/s at 224/96 px with 8 locals (256 px JPEGs).
ACTOR_MS_FIXED = 0.55
ACTOR_MS_PER_PIXEL = 6.06e-5
# data.augment_on=gpu: the actor only decodes and crops (the photometric ops run on the trainer):
# the same fit scaled by the measured gpu/cpu-mode ratios, 6.83x at 224/96 px with 8 locals and
# 1.47x at 32/16 px with 6 locals (bench_data.py --cases gpuaug, 2026-12-02).
GPU_AUGMENT_MS_FIXED = 0.50
GPU_AUGMENT_MS_PER_PIXEL = 6.5e-6

# TFLOP/s this repo's training step reached per device, by backbone width (eager, bf16):
# ViT-S/16 on an H100: 543 images/s x 123 GFLOP = 67 TFLOP/s (2026-11-26); wider models run
# their matrix products at higher utilisation: ViT-L/16 at Meta's 0.57 s/step on 32 H100 is
# ~174 TFLOP/s per GPU. Interpolated in log(width) between the two.
GPU_TFLOPS_BY_WIDTH = ((384, 67.0), (1024, 174.0))
COMPILE_SPEEDUP = 1.19  # --compile backbone vs eager, ViT-S/16 on an H100 (2026-11-26)
# Relative to an H100's dense bf16 peak (989 TFLOP/s), for Ray's accelerator_type resource.
ACCELERATOR_SCALE = {"H100": 1.0, "H200": 1.0, "H20": 0.15, "A100": 0.32, "A10G": 0.13, "L4": 0.12,
                     "L40S": 0.37, "V100": 0.13, "B200": 2.27}
# GPU memory (GiB) by Ray's accelerator_type; unknown: an H100's.
ACCELERATOR_GIB = {"H100": 80, "H200": 141, "H20": 96, "A100": 40, "A10G": 24, "L4": 24, "L40S": 48, "V100": 16,
                   "B200": 180}
# Activation bytes per (width x depth x token alive) and image, bf16 autocast with the split
# backward (one crop group alive): ViT-S/16, batch 64, 224/96 px peaked at 6.50 GiB (2026-11-26),
# 1.0 GiB of it parameters, gradients, AdamW state and teacher; without the split 10.6 GiB.
ACTIVATION_BYTES = 46.4
PARAM_BYTES = 20  # fp32 student weights + gradients + AdamW moments (16) + fp32 teacher (4)
CPU_GFLOPS_PER_CORE = 57.0  # fp32 training step, 2-core AMD EPYC (322 GFLOP in 2.8 s), 2026-11-26


@dataclass
class Cluster:
    """What the plan is checked against."""

    source: str  # "live cluster at ADDRESS" | "this machine"
    cpus: float
    gpus: float
    accelerator: Optional[str] = None
    live: bool = False
    nodes: int = 1


@dataclass
class Plan:
    sections: List[tuple] = field(default_factory=list)  # (title, [(label, value), ...])
    warnings: List[str] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)
    numbers: Dict[str, float] = field(default_factory=dict)  # the figures, for tests and tools

    def add(self, title: str, rows: List[tuple]) -> None:
        self.sections.append((title, rows))

    def render(self) -> str:
        lines = []
        width = max((len(k) for _, rows in self.sections for k, _ in rows), default=10)
        for title, rows in self.sections:
            lines.append(title)
            lines += [f"  {k:<{width}}  {v}" for k, v in rows]
        lines.append(f"warnings ({len(self.warnings)})" if self.warnings else "warnings: none")
        lines += [f"  - {w}" for w in self.warnings]
        lines += [f"error: {e}" for e in self.errors]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Throughput models
# ---------------------------------------------------------------------------------------

def crop_pixels(cfg: ExperimentConfig) -> int:
    d = cfg.data
    return 2 * d.global_size ** 2 + d.n_local * d.local_size ** 2


def actor_images_per_s(cfg: ExperimentConfig) -> float:
    """Images/s one multi-crop actor delivers (per CPU it holds, capped at one core)."""
    if cfg.data.augment_on == "gpu":
        ms = GPU_AUGMENT_MS_FIXED + GPU_AUGMENT_MS_PER_PIXEL * crop_pixels(cfg)
    else:
        ms = ACTOR_MS_FIXED + ACTOR_MS_PER_PIXEL * crop_pixels(cfg)
    return 1000.0 / ms * min(cfg.data.cpus_per_actor, 1.0)


def backbone_shape(cfg: ExperimentConfig) -> tuple:
    """(width, depth) of the backbone: the overrides, else timm's default for its name."""
    known = {"tiny": (192, 12), "small": (384, 12), "base": (768, 12), "large": (1024, 24), "huge": (1280, 32),
             "giant": (1536, 40)}
    name = cfg.model.backbone
    width, depth = next((v for k, v in known.items() if f"vit_{k}_" in name), (384, 12))
    return cfg.model.embed_dim or width, cfg.model.depth or depth


def flops_per_image(cfg: ExperimentConfig) -> float:
    """Training FLOPs per image: student forward + backward (3x) on 2 + n crops, teacher forward on
    the 2 globals, heads on CLS tokens and on the masked patch tokens (matches torch's FLOP
    counter within 2 % for ViT-S/16 at 224/96 px)."""
    d, m, mdl = cfg.data, cfg.method, cfg.model
    width, depth = backbone_shape(cfg)
    p = cfg.patch_size
    prefix = 1 + m.n_register_tokens

    def crop(size: int) -> float:
        t = (size // p) ** 2 + prefix
        return depth * t * (24 * width ** 2 + 4 * t * width)

    def head(k: int) -> float:
        h, b = mdl.head_hidden_dim, mdl.head_bottleneck_dim
        return 2 * (width * h + h * h + h * b + b * k)

    g, loc = crop(d.global_size), crop(d.local_size)
    student = 3 * (2 * g + d.n_local * loc)
    teacher = 2 * g
    cls_heads = (3 * (2 + d.n_local) + 2) * head(mdl.n_cls_prototypes)
    lo, hi = max(m.mask_ratio - m.mask_ratio_spread, 0.0), min(m.mask_ratio + m.mask_ratio_spread, 0.95)
    masked = 2 * m.mask_probability * (lo + hi) / 2 * (d.global_size // p) ** 2
    patch_heads = 4 * masked * head(mdl.n_patch_prototypes)
    return student + teacher + cls_heads + patch_heads


def gpu_memory_gib(cfg: ExperimentConfig, micro_batch: Optional[int] = None) -> float:
    """Estimated peak GPU memory of one worker (parameters and optimiser state of student, teacher
    and heads, plus the activations of one micro-batch's largest crop group)."""
    d, mdl, m = cfg.data, cfg.model, cfg.method
    width, depth = backbone_shape(cfg)
    p = cfg.patch_size
    prefix = 1 + m.n_register_tokens
    h, b = mdl.head_hidden_dim, mdl.head_bottleneck_dim
    head = width * h + h * h + h * b
    params = 12 * width ** 2 * depth + 2 * head + b * (mdl.n_cls_prototypes + mdl.n_patch_prototypes)
    glob = 2 * ((d.global_size // p) ** 2 + prefix)
    loc = d.n_local * ((d.local_size // p) ** 2 + prefix)
    tokens = max(glob, loc) if m.split_backward else glob + loc
    batch = micro_batch or cfg.train.micro_batch_size
    return (PARAM_BYTES * params + batch * ACTIVATION_BYTES * width * depth * tokens) / 2**30


def memory_row(plan: Plan, cfg: ExperimentConfig, accelerator: str) -> str:
    """The plan's GPU memory line; a warning (with the train.accumulate that fits) when it does not fit."""
    t = cfg.train
    gib, have = gpu_memory_gib(cfg), ACCELERATOR_GIB.get(accelerator, 80) * t.gpus_per_worker
    plan.numbers["gpu_memory_gib"] = gib
    if gib > 0.9 * have:
        batch = t.worker_batch_size
        k = next((k for k in range(2, batch + 1) if batch % k == 0 and gpu_memory_gib(cfg, batch // k) <= 0.9 * have),
                 None)
        fix = (f"train.accumulate={k} (micro-batches of {batch // k}: ~{gpu_memory_gib(cfg, batch // k):,.0f} GiB; the "
               "same global batch and schedule)" if k else "more workers (train.num_workers)")
        plan.warnings.append(f"estimated ~{gib:,.0f} GiB of GPU memory per worker, more than an {accelerator}'s "
                             f"{have:g} GiB: {fix}")
    return f"~{gib:,.0f} GiB per worker (estimate; {t.micro_batch_size} images per forward; {accelerator}: {have:g} GiB)"


def worker_images_per_s(cfg: ExperimentConfig, accelerator: Optional[str]) -> float:
    t = cfg.train
    if t.use_gpu:
        width = backbone_shape(cfg)[0]
        (w0, f0), (w1, f1) = GPU_TFLOPS_BY_WIDTH
        x = min(max((math.log(width) - math.log(w0)) / (math.log(w1) - math.log(w0)), 0.0), 1.0)
        tflops = f0 * (f1 / f0) ** x
        tflops *= ACCELERATOR_SCALE.get(accelerator or "H100", 1.0) * t.gpus_per_worker
        if t.compile:
            tflops *= COMPILE_SPEEDUP
        return tflops * 1e12 / flops_per_image(cfg)
    return CPU_GFLOPS_PER_CORE * max(t.cpus_per_worker, 0.25) * 1e9 / flops_per_image(cfg)


# ---------------------------------------------------------------------------------------
# The target cluster
# ---------------------------------------------------------------------------------------

def ray_address(cfg: ExperimentConfig) -> Optional[str]:
    return cfg.ray.address or os.environ.get("RAY_ADDRESS") or None


def live_capacity() -> Tuple[Dict[str, float], bool]:
    """(capacity, from_autoscaler) of the connected Ray cluster: the autoscaler's maximum when it
    reports its node groups (autoscaler v2, the default of ``ray up`` since Ray 2.50; what Ray
    Train checks too), else the resources of the nodes up now."""
    import ray
    from ray._private.state import state

    try:
        most = state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001  no autoscaler config on this cluster
        most = None
    if most:
        return {k: float(v) for k, v in most.items()}, True
    return {k: float(v) for k, v in ray.cluster_resources().items()}, False


def local_gpus() -> int:
    """GPUs of this machine, without importing torch (CUDA_VISIBLE_DEVICES, else nvidia-smi)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def target_cluster(cfg: ExperimentConfig) -> Cluster:
    """The live cluster when an address is set (connects, reads, leaves it), else this machine."""
    address = ray_address(cfg)
    if address is None:
        return Cluster("this machine (no ray.address / RAY_ADDRESS: a local Ray instance)",
                       float(cfg.ray.num_cpus or os.cpu_count() or 1), float(local_gpus()))
    import ray

    connected_here = not ray.is_initialized()
    if connected_here:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        cap, from_autoscaler = live_capacity()
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    finally:
        if connected_here:
            ray.shutdown()
    accel = next((k.split(":", 1)[1] for k in cap if k.startswith("accelerator_type:")), None)
    exact = from_autoscaler or not cfg.ray.autoscaling
    what = f"live cluster at {address}" + (" (its autoscaler's maximum)" if from_autoscaler else
                                           "" if exact else " (the nodes up now; ray.autoscaling=true)")
    return Cluster(what, cap.get("CPU", 0.0), cap.get("GPU", 0.0), accel, live=exact, nodes=nodes)


def duration(hours: float) -> str:
    return f"{hours:,.1f} h" if hours >= 1 else f"{hours * 60:,.0f} min"


def fit_errors(cfg: ExperimentConfig, cpus: float, gpus: float, where: str) -> List[str]:
    """Why one trial can never run on ``cpus``/``gpus`` (empty when it fits)."""
    need = trial_resources(cfg)
    t, d = cfg.train, cfg.data
    errors = []
    if need["GPU"] > gpus + 1e-9:
        errors.append(f"train.num_workers={t.num_workers} x train.gpus_per_worker={t.gpus_per_worker:g} needs "
                      f"{need['GPU']:g} GPUs per trial; {where} has {gpus:g} in total")
    if need["CPU"] > cpus + 1e-9:
        errors.append(f"train.num_workers={t.num_workers} x train.cpus_per_worker={t.cpus_per_worker:g} + "
                      f"data.num_actors={d.num_actors} x data.cpus_per_actor={d.cpus_per_actor:g} needs "
                      f"{need['CPU']:g} CPUs per trial; {where} has {cpus:g} in total")
    return errors


def check_fits(cfg: ExperimentConfig, where: str = "the Ray cluster") -> None:
    """Raise ConfigError when a trial can never fit the connected cluster (a run would wait forever
    in PENDING). The cluster's size is its autoscaler's maximum where it reports one, else the
    nodes up now; with ``ray.autoscaling=true`` (an autoscaler that reports no maximum, such as
    KubeRay's v1) a trial larger than the nodes up now is only a warning."""
    capacity, from_autoscaler = live_capacity()
    errors = fit_errors(cfg, capacity.get("CPU", 0.0), capacity.get("GPU", 0.0), where)
    if errors and (from_autoscaler or not cfg.ray.autoscaling):
        hint = "" if from_autoscaler else " (if the cluster grows beyond the nodes up now: ray.autoscaling=true)"
        raise ConfigError("; ".join(errors) + f": the trial can never start{hint}")
    for e in errors:
        log.warning("%s now: the trial waits until the autoscaler adds nodes (ray.autoscaling=true)", e)


def concurrent_trials(cfg: ExperimentConfig, cpus: float, gpus: float) -> int:
    need = trial_resources(cfg)
    have = {"CPU": cpus, "GPU": gpus}
    fits = [math.floor(have[k] / v + 1e-9) for k, v in need.items() if v > 0]
    n = max(0, min(fits) if fits else 1)
    if cfg.sweep.max_concurrent_trials > 0:
        n = min(n, cfg.sweep.max_concurrent_trials)
    return n


# ---------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------

def make_plan(cfg: ExperimentConfig, command: str = "sweep", cluster: Optional[Cluster] = None) -> Plan:
    """The plan of ``command`` ('sweep' | 'train') for ``cfg``; reads the source's listing (never
    downloads) and the target cluster (:func:`target_cluster` unless given)."""
    plan = Plan()
    t, d, m = cfg.train, cfg.data, cfg.method
    cluster = cluster or target_cluster(cfg)

    # source and epoch length
    try:
        info = validate_source(d, download=False)
        n_train, n_eval, source_note = info.n_train, info.n_eval, "counted"
    except DataSourceError as err:
        n_train, n_eval = d.expected_train_images, None
        plan.warnings.append(f"the source cannot be read from here ({err}); "
                             + (f"the epoch length assumes data.expected_train_images={n_train}"
                                if n_train else "set data.expected_train_images to plan the epoch length"))
        source_note = "assumed" if n_train else "unknown"
    plan.add(f"recipe: {cfg.recipe or '(none)'}   command: {command}", [
        ("data", f"{d.name} {d.path or ''}".rstrip()),
        ("train images", f"{n_train:,} ({source_note})" if n_train else "unknown"),
        ("held-out images", f"{n_eval:,}" if n_eval is not None else "-"),
        ("model", f"{cfg.model.backbone} (patch {cfg.patch_size}, width {backbone_shape(cfg)[0]}, "
                  f"depth {backbone_shape(cfg)[1]}, {m.n_register_tokens} registers), method={m.name}"),
    ])

    # crops
    p = cfg.patch_size
    g, lg = d.global_size // p, d.local_size // p
    plan.add("crops", [
        ("global", f"2 x {d.global_size} px -> {g}x{g} patches"),
        ("local", f"{d.n_local} x {d.local_size} px -> {lg}x{lg} patches" if d.n_local else "none"),
        ("eval", f"{d.eval_size} px; k-NN bank {d.knn_bank_size or 'all'}, queries {d.knn_query_size or 'all'}"),
        ("augmentation", f"blur {d.blur}, photometric ops on the {'trainer GPU' if d.augment_on == 'gpu' else 'actors'}"),
    ])

    # batch, lr and schedules
    workers = max(t.num_workers, 1)
    spe = steps_per_epoch(cfg, n_train) if n_train else None
    total = spe * t.epochs if spe else None
    sched = method_door.schedule_summary(m.name, cfg.method_kwargs(), max(total or 1, 1), max(spe or 1, 1),
                                         t.global_batch_size)
    rows = [("global batch", f"{t.global_batch_size} images/step = {workers} worker{'s' * (workers > 1)} x "
                             f"{t.worker_batch_size}"),
            ("peak lr", f"{sched['peak_lr']:.3g} (method.base_lr={m.base_lr:g} x sqrt({t.global_batch_size}/"
                        f"{m.lr_reference_batch}))")]
    if spe is not None:
        if spe < 1:
            plan.errors.append(f"train.global_batch_size={t.global_batch_size} exceeds the {n_train} training "
                               f"images: no full step per epoch")
        rows += [("steps", f"{spe:,} per epoch x {t.epochs} epochs = {total:,}"),
                 ("lr warm-up", f"{sched['warmup_steps']:,} steps, then cosine to {sched['min_lr']:g}"),
                 ("teacher temperature", f"{sched['teacher_temp'][0]:g} -> {sched['teacher_temp'][1]:g} over "
                                         f"{sched['teacher_temp_warmup_steps']:,} steps"),
                 ("last layer frozen", f"{sched['freeze_last_layer_steps']:,} steps"),
                 ("weight decay", f"{sched['weight_decay'][0]:g} -> {sched['weight_decay'][1]:g}; teacher "
                                  f"momentum {sched['momentum'][0]:g} -> {sched['momentum'][1]:g}"),
                 ("k-NN, checkpoints", f"k-NN every {t.knn_every} epochs; checkpoint every "
                                       f"{t.checkpoint_every or spe:,} steps, keep {t.keep_checkpoints}")]
    plan.add("optimisation", rows)
    if total and sched["freeze_last_layer_steps"] >= total / 2:
        plan.warnings.append(f"the prototype layers stay frozen for {sched['freeze_last_layer_steps']:,} of the run's "
                             f"{total:,} steps (method.freeze_last_layer_epochs={m.freeze_last_layer_epochs:g}): "
                             "a short run needs method.freeze_last_layer_epochs=0 or a fraction of an epoch")
    plan.numbers.update(global_batch=t.global_batch_size, worker_batch=t.worker_batch_size, peak_lr=sched["peak_lr"],
                        steps_per_epoch=spe or 0, total_steps=total or 0, warmup_steps=sched["warmup_steps"],
                        teacher_temp_warmup_steps=sched["teacher_temp_warmup_steps"],
                        freeze_last_layer_steps=sched["freeze_last_layer_steps"])

    # resources and the cluster
    need = trial_resources(cfg)
    per_worker = f"{t.cpus_per_worker:g} CPU" + (f" + {t.gpus_per_worker:g} GPU" if t.use_gpu else "")
    errors = fit_errors(cfg, cluster.cpus, cluster.gpus, cluster.source.split(" (")[0])
    rows = [("per trial", f"{need['CPU']:g} CPUs, {need['GPU']:g} GPUs: {t.num_workers} DDP workers x "
                          f"{per_worker}, {d.num_actors} data actors x {d.cpus_per_actor:g} CPU "
                          f"(Ray Data cap {data_cpu_budget(d):g} CPUs)"),
            ("target", f"{cluster.source}: {cluster.cpus:g} CPUs, {cluster.gpus:g} GPUs"
                       + (f" ({cluster.accelerator})" if cluster.accelerator else ""))]
    if command == "sweep":
        n = concurrent_trials(cfg, cluster.cpus, cluster.gpus)
        rows.append(("trials", f"{cfg.sweep.num_samples} ({cfg.sweep.search}, scheduler {cfg.sweep.scheduler}), "
                               f"{min(n, cfg.sweep.num_samples)} at a time"))
        plan.numbers["concurrent_trials"] = min(n, cfg.sweep.num_samples)
    if t.use_gpu:
        rows.append(("GPU memory", memory_row(plan, cfg, cluster.accelerator or "H100")))
    plan.add("resources", rows)
    if errors:
        if cluster.live:
            plan.errors += errors
        else:
            plan.warnings += [e + " (set ray.address or RAY_ADDRESS to plan against your cluster)" for e in errors]

    # throughput
    deliver = d.num_actors * actor_images_per_s(cfg)
    consume = workers * worker_images_per_s(cfg, cluster.accelerator)
    rate = min(deliver, consume)
    device = (f"{cluster.accelerator or 'H100'} per worker" if t.use_gpu else f"{t.cpus_per_worker:g} CPU per worker")
    rows = [("data actors deliver", f"~{deliver:,.0f} images/s ({d.num_actors} x ~{actor_images_per_s(cfg):,.0f}"
                                    f" per actor at {crop_pixels(cfg):,} crop pixels/image)"),
            ("model consumes", f"~{consume:,.0f} images/s ({workers} x ~{consume / workers:,.0f}; "
                               f"{flops_per_image(cfg) / 1e9:,.1f} GFLOP/image, {device})")]
    if total:
        hours = total * t.global_batch_size / rate / 3600
        rows.append(("time", f"~{duration(hours)} per run: {total:,} steps at ~{rate:,.0f} images/s"))
        plan.numbers["hours"] = hours
        if command == "sweep" and plan.numbers.get("concurrent_trials"):
            waves = math.ceil(cfg.sweep.num_samples / plan.numbers["concurrent_trials"])
            rows.append(("sweep time", f"at most ~{duration(hours * waves)} ({waves} waves of trials; early "
                                       "stopping shortens it)"))
    plan.add("throughput (estimates from measured rates)", rows)
    plan.numbers.update(deliver_images_per_s=deliver, consume_images_per_s=consume)
    if deliver < consume:
        want = math.ceil(d.num_actors * consume / deliver)
        plan.warnings.append(f"data-bound: the actors deliver ~{deliver:,.0f} images/s, the model consumes ~"
                             f"{consume:,.0f}: about data.num_actors={want} would keep the workers fed"
                             + ("" if d.augment_on == "gpu" else " (or data.augment_on=gpu)"))

    # tracking and storage
    plan.add("tracking", [("MLflow", cfg.tracking_uri), ("storage", cfg.storage_path),
                          ("experiment", cfg.tracking.experiment)])
    multi_node = cluster.nodes > 1 or (t.use_gpu and workers * t.gpus_per_worker > 8)
    if multi_node:
        if cfg.tracking_uri.startswith(("sqlite:", "file:")):
            plan.warnings.append(f"MLflow URI {cfg.tracking_uri} is a local store: on a multi-node cluster runs "
                                 "logged on other nodes never reach it (tracking.uri=http://HOST:5000)")
        if "://" not in cfg.storage_path:
            plan.warnings.append(f"train.storage_path={cfg.storage_path} is local: it must be shared storage "
                                 "mounted on every node (NFS), or s3:// / gs://")
    if t.use_gpu and t.worker_batch_size < 16:
        plan.warnings.append(f"{t.worker_batch_size} images per GPU: KoLeo and the Sinkhorn targets see small "
                             "per-worker batches")
    if not t.use_gpu and cfg.recipe.startswith("imagenet"):
        plan.warnings.append("train.use_gpu=false: an ImageNet recipe on CPU workers will not finish")
    return plan

