"""Typed config: the one place where a composed Hydra config becomes objects.

Every default lives once, in a schema: the dataclasses below for the platform's groups
(``data``, ``train``, ``sweep``, ``tracking``, ``ray``, ``eval``), and the method's own config
class for ``model`` + ``method`` (``dinov3.DINOv3Config``, reached through :mod:`rayssl.method`).
The schemas are registered in Hydra's ConfigStore as ``schema`` (the first entry of
``conf/config.yaml``'s defaults), so the YAML presets and recipes under ``conf/`` only say what
they change, and composing them is type-checked key by key: a typo or a value of the wrong
type fails while composing.

:func:`compose` turns command-line overrides into a validated :class:`ExperimentConfig`,
raising :class:`ConfigError` (``<key>: <reason>``) before any Ray work. Validation imports
no torch, timm or Ray. Everything below this module sees dataclasses or plain dicts, never
OmegaConf objects.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from rayssl import method as method_door

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"
SCHEMA_NAME = "schema"  # the ConfigStore entry conf/config.yaml starts from


class ConfigError(ValueError):
    """A config key or value is invalid; the message starts with the key."""


# ---------------------------------------------------------------------------------------
# Schemas: the platform's groups
# ---------------------------------------------------------------------------------------

@dataclass
class DataConfig:
    """Where images come from (the source groups set only these keys: name, path, source
    details), the crops made of them and the CPU actors making them (set by the recipe)."""

    name: str = "synthetic"  # synthetic | imagefolder | parquet | cifar10
    path: Optional[str] = None  # directory or URI (s3://, gs://); cache directory for cifar10
    expected_train_images: Optional[int] = None  # plan=true's epoch length when the source is unreadable from here
    # crop geometry (recipe section 3): always from the recipe, never from a source
    global_size: int = 224
    local_size: int = 96
    n_local: int = 8
    eval_size: int = 224
    blur: str = "nominal"  # nominal (recipe table) | official (what released models were trained with) | none
    augment_on: str = "cpu"  # cpu: actors make finished crops | gpu: photometric ops on the trainer's device
    # multi-crop actors, per trial
    num_actors: int = 8
    cpus_per_actor: float = 1.0
    map_batch_size: int = 32  # rows per map_batches call
    max_cpus: Optional[float] = None  # Ray Data's CPU cap per trial (null: num_actors * cpus_per_actor)
    read_concurrency: Optional[int] = None  # read tasks in flight (null: one per 4 actors); raise for slow object storage
    # k-NN evaluation sets
    knn_bank_size: Optional[int] = 10000  # null: every labelled train image
    knn_query_size: Optional[int] = 2000  # null: every held-out image
    # the generated source (data=synthetic)
    synthetic_n_train: int = 2048
    synthetic_n_eval: int = 512
    synthetic_image_size: int = 32
    synthetic_seed: int = 0


@dataclass
class TrainConfig:
    epochs: int = 100
    global_batch_size: int = 1024  # images per optimizer step over all workers: the recipe's unit
    num_workers: int = 1  # DDP workers (Ray Train); 0 runs the loop in the driver process
    # Micro-batches per step on each worker: the same global batch, lr and schedule in less memory
    # (Sinkhorn centring and KoLeo then see micro-batches; the plan estimates memory per GPU).
    accumulate: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    precision: str = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU | bf16 | fp32
    compile: bool = False
    seed: int = 0
    log_every: int = 50  # steps per telemetry window
    knn_every: int = 1  # epochs
    knn_k: int = 20
    checkpoint_every: int = 0  # steps; 0 = at the end of every epoch
    keep_checkpoints: int = 2
    max_failures: int = 0  # worker-group restarts from the last checkpoint (-1: forever)
    prefetch_batches: int = 2
    storage_path: Optional[str] = None  # null: $RAYSSL_STORAGE_PATH, else <repo>/ray_results
    run_name: Optional[str] = None  # a fixed name: re-running it resumes the run
    resume_from: Optional[str] = None  # start a new run from any checkpoint directory
    system_metrics: bool = True  # MLflow system metrics (CPU, memory, GPU) from rank 0

    @property
    def worker_batch_size(self) -> int:
        """Images per worker and step: the global batch over the workers (0 workers: one)."""
        return self.global_batch_size // max(self.num_workers, 1)

    @property
    def micro_batch_size(self) -> int:
        """Images per forward pass: the worker's batch over ``accumulate``."""
        return self.worker_batch_size // self.accumulate


@dataclass
class SweepConfig:
    name: str = "sweep"
    num_samples: int = 4
    search: str = "random"  # random | grid | optuna
    scheduler: str = "none"  # none | asha (stops trials) | asha_promotion (pauses and promotes)
    metric: str = "knn_top1"
    mode: str = "max"
    grace_period: int = 1
    reduction_factor: int = 2
    max_concurrent_trials: int = 0  # 0: as many as the cluster fits
    seed: int = 0
    run_name: Optional[str] = None  # fixed name: re-running it resumes the sweep (Tuner.restore)
    retry_failed: bool = False  # on resume, also re-run trials that failed
    space: Dict[str, Any] = field(default_factory=dict)  # method.* key -> {type: choice|grid|uniform|loguniform|randint, ...}


@dataclass
class TrackingConfig:
    uri: Optional[str] = None  # null: $MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db
    experiment: str = "dinov3-ray"
    register_model_name: Optional[str] = "dinov3-ray-best"  # the best trial's model (null: none)


@dataclass
class RayConfig:
    address: Optional[str] = None  # null: $RAY_ADDRESS / the job's cluster, else a local instance
    num_cpus: Optional[int] = None  # a local instance's CPUs (null: all)
    # The cluster grows beyond the nodes up now and its autoscaler reports no maximum (KubeRay's
    # v1 autoscaler): a trial larger than the nodes up now waits for nodes instead of failing.
    autoscaling: bool = False


@dataclass
class EvalConfig:
    """experiments/evaluate.py only."""

    batch_size: int = 256
    knn_k: List[int] = field(default_factory=lambda: [10, 20, 100])
    linear_probe: bool = True
    probe_epochs: int = 100
    device: str = "auto"  # auto: cuda when available


# The model and method groups are typed by the method's own config class (its fields and
# defaults), split by the method's list of network fields.
ModelConfig, MethodConfig = method_door.config_schemas()


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: Optional[str] = None  # experiments/evaluate.py: a Ray checkpoint dir or runs:/ID/model
    plan: bool = False  # print the launch plan and exit (no training)
    recipe: str = ""  # the experiment=... recipe it was composed from (set by compose)

    # ---- derived values, computed in one place ----
    # Unset values fall back to the env vars a cluster driver sends every worker
    # (rayssl/cluster.py), so all nodes resolve the same store, not their own copy's.
    @property
    def tracking_uri(self) -> str:
        return resolve_tracking_uri(self.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI"))

    @property
    def storage_path(self) -> str:
        path = self.train.storage_path or os.environ.get("RAYSSL_STORAGE_PATH") or str(REPO_ROOT / "ray_results")
        return path if "://" in path else os.path.abspath(os.path.expanduser(path))  # s3://, gs:// as given

    @property
    def patch_size(self) -> int:
        """The backbone's patch size: ``model.patch_size``, else the one in its timm name."""
        return resolve_patch_size(self.model.backbone, self.model.patch_size)

    def method_kwargs(self) -> Dict[str, Any]:
        """Plain keyword arguments for the method's builder (model + method groups)."""
        kwargs = dataclasses.asdict(self.model)
        kwargs.update({k: v for k, v in dataclasses.asdict(self.method).items() if k != "name"})
        kwargs["img_size"] = self.data.global_size
        return kwargs

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


SEARCH_TYPES = ("choice", "grid", "uniform", "loguniform", "randint")
SCHEDULERS = ("none", "asha", "asha_promotion")
SOURCES = ("synthetic", "imagefolder", "parquet", "cifar10")
MIN_GLOBAL_GRID = 4  # patches per side of a global crop
MIN_LOCAL_GRID = 2


def resolve_tracking_uri(uri: Optional[str]) -> str:
    """Absolute MLflow URI: Ray workers chdir elsewhere, so relative paths would split the store."""
    if not uri:
        return f"sqlite:///{REPO_ROOT / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    if "://" not in uri:  # a bare directory: MLflow file store
        return "file://" + os.path.abspath(os.path.expanduser(uri))
    return uri


def resolve_patch_size(backbone: str, patch_size: Optional[int]) -> int:
    if patch_size:
        return int(patch_size)
    m = re.search(r"patch(\d+)", backbone)
    if m is None:
        raise ConfigError(f"model.patch_size=None: set it (no patch size in model.backbone={backbone!r})")
    return int(m.group(1))


# ---------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------

def _check(cond: bool, key: str, msg: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r}: {msg}")


def validate(cfg: ExperimentConfig) -> None:
    """Value, geometry and resource checks that types alone cannot express; each error
    names its key. The method's own check (through rayssl.method) covers model/method."""
    _validate_method_values(cfg)
    check_data(cfg.data)
    _validate_train(cfg.train)
    _validate_geometry(cfg)
    _validate_resources(cfg)
    _validate_sweep(cfg)


def _validate_method_values(cfg: ExperimentConfig) -> None:
    try:
        method_door.check_config(cfg.method.name, cfg.method_kwargs())
    except method_door.MethodConfigError as err:
        if err.field in ("img_size",):
            raise ConfigError(f"data.global_size={err.value!r}: {err.rule}") from None
        group = "model" if err.field in {f.name for f in dataclasses.fields(ModelConfig)} else "method"
        raise ConfigError(f"{group}.{err.field}={err.value!r}: {err.rule}") from None
    except ValueError as err:  # a method without field-level errors
        raise ConfigError(f"method.name={cfg.method.name!r}: {err}") from None
    if cfg.model.embed_dim is not None and cfg.model.num_heads is not None:
        _check(cfg.model.embed_dim % cfg.model.num_heads == 0, "model.embed_dim",
               f"must be divisible by model.num_heads={cfg.model.num_heads}", cfg.model.embed_dim)


def check_data(d: DataConfig) -> None:
    """The data group's own checks (also run by the data layer on configs built in code)."""
    _check(d.name in SOURCES, "data.name", f"must be one of {', '.join(SOURCES)}", d.name)
    _check(d.name == "synthetic" or bool(d.path), "data.path", f"is required for data={d.name}", d.path)
    _check(d.expected_train_images is None or d.expected_train_images >= 1, "data.expected_train_images",
           "must be >= 1 or null", d.expected_train_images)
    _check(d.n_local >= 0, "data.n_local", "must be >= 0", d.n_local)
    _check(d.blur in ("nominal", "official", "none"), "data.blur", "must be 'nominal', 'official' or 'none'", d.blur)
    _check(d.augment_on in ("cpu", "gpu"), "data.augment_on", "must be 'cpu' or 'gpu'", d.augment_on)
    _check(d.num_actors >= 1, "data.num_actors", "must be >= 1", d.num_actors)
    _check(d.cpus_per_actor > 0, "data.cpus_per_actor", "must be > 0", d.cpus_per_actor)
    _check(d.map_batch_size >= 1, "data.map_batch_size", "must be >= 1", d.map_batch_size)
    _check(d.max_cpus is None or d.max_cpus > 0, "data.max_cpus", "must be > 0 or null", d.max_cpus)
    _check(d.read_concurrency is None or d.read_concurrency >= 1, "data.read_concurrency", "must be >= 1 or null",
           d.read_concurrency)
    for key in ("knn_bank_size", "knn_query_size"):
        _check(getattr(d, key) is None or getattr(d, key) >= 1, f"data.{key}", "must be >= 1 or null",
               getattr(d, key))
    _check(d.synthetic_n_train >= 16, "data.synthetic_n_train", "must be >= 16", d.synthetic_n_train)
    _check(d.synthetic_n_eval >= 1, "data.synthetic_n_eval", "must be >= 1", d.synthetic_n_eval)


def _validate_train(t: TrainConfig) -> None:
    _check(t.epochs >= 1, "train.epochs", "must be >= 1", t.epochs)
    _check(t.num_workers >= 0, "train.num_workers", "must be >= 0", t.num_workers)
    workers = max(t.num_workers, 1)
    _check(t.global_batch_size % workers == 0, "train.global_batch_size",
           f"must divide over train.num_workers={t.num_workers} (per-worker batch "
           f"{t.global_batch_size / workers:g})", t.global_batch_size)
    _check(t.worker_batch_size >= 2, "train.global_batch_size",
           f"gives {t.worker_batch_size} images per worker over train.num_workers={t.num_workers}; "
           "at least 2 (KoLeo needs a neighbour)", t.global_batch_size)
    _check(t.accumulate >= 1 and t.worker_batch_size % t.accumulate == 0, "train.accumulate",
           f"must be >= 1 and divide the {t.worker_batch_size} images per worker", t.accumulate)
    _check(t.micro_batch_size >= 2, "train.accumulate",
           f"leaves {t.micro_batch_size} images per micro-batch; at least 2 (KoLeo needs a neighbour)", t.accumulate)
    _check(t.cpus_per_worker >= 0, "train.cpus_per_worker", "must be >= 0", t.cpus_per_worker)
    _check(not t.use_gpu or t.gpus_per_worker > 0, "train.gpus_per_worker", "must be > 0 with train.use_gpu",
           t.gpus_per_worker)
    _check(t.precision in ("auto", "bf16", "fp32"), "train.precision", "must be auto, bf16 or fp32", t.precision)
    for key in ("log_every", "knn_every", "knn_k", "keep_checkpoints"):
        _check(getattr(t, key) >= 1, f"train.{key}", "must be >= 1", getattr(t, key))
    _check(t.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0 (0: every epoch)", t.checkpoint_every)
    _check(t.max_failures >= -1, "train.max_failures", "must be >= -1 (-1: retry forever)", t.max_failures)
    _check(t.prefetch_batches >= 0, "train.prefetch_batches", "must be >= 0", t.prefetch_batches)
    if t.resume_from is not None:
        _check(os.path.exists(os.path.expanduser(t.resume_from)) or "://" in t.resume_from,
               "train.resume_from", "no such checkpoint directory", t.resume_from)


def _validate_geometry(cfg: ExperimentConfig) -> None:
    """Crops the model can learn from: enough patches per crop, sizes on the patch grid, and
    a mask ratio that masks at least one patch."""
    d, p = cfg.data, cfg.patch_size
    for key, size in (("global_size", d.global_size), ("local_size", d.local_size), ("eval_size", d.eval_size)):
        _check(size % p == 0, f"data.{key}", f"must be a multiple of the patch size {p} ({_patch_key(cfg)})", size)
    g = d.global_size // p
    _check(g >= MIN_GLOBAL_GRID, "data.global_size",
           f"gives a {g}x{g} patch grid at patch size {p} ({_patch_key(cfg)}); a global crop needs at least "
           f"{MIN_GLOBAL_GRID}x{MIN_GLOBAL_GRID} patches (>= {MIN_GLOBAL_GRID * p} px): pick a recipe "
           "(experiment=...) whose crops fit the model", d.global_size)
    if d.n_local > 0:
        lg = d.local_size // p
        _check(lg >= MIN_LOCAL_GRID, "data.local_size",
               f"gives a {lg}x{lg} patch grid at patch size {p} ({_patch_key(cfg)}); a local crop needs at least "
               f"{MIN_LOCAL_GRID}x{MIN_LOCAL_GRID} patches (>= {MIN_LOCAL_GRID * p} px)", d.local_size)
    m = cfg.method
    if m.ibot_weight > 0:
        n_patches = g * g
        crops = 2 * cfg.train.micro_batch_size
        if m.mask_strategy == "random":
            most = int(round(n_patches * m.mask_ratio))
        else:
            _check(int(crops * m.mask_probability) >= 1, "method.mask_probability",
                   f"masks no crop of a worker batch ({crops} global crops); iBOT needs masked patches",
                   m.mask_probability)
            hi = min(max(m.mask_ratio + m.mask_ratio_spread, 0.0), 0.95)
            most = int(n_patches * hi)
        _check(most >= 1, "method.mask_ratio",
               f"masks no patch of a {g}x{g} grid (at most {most}); iBOT needs masked patches "
               "(raise it, or set method.ibot_weight=0)", m.mask_ratio)


def _patch_key(cfg: ExperimentConfig) -> str:
    return f"model.patch_size={cfg.model.patch_size}" if cfg.model.patch_size else f"model.backbone={cfg.model.backbone}"


def data_cpu_budget(d: DataConfig) -> float:
    """Logical CPUs a trial's Ray Data may use: ``max_cpus``, else what its actors hold."""
    return float(d.max_cpus) if d.max_cpus is not None else float(d.num_actors * d.cpus_per_actor)


def trial_resources(cfg: ExperimentConfig) -> Dict[str, float]:
    """Logical resources one training run holds: its Train workers plus its Ray Data actors."""
    t = cfg.train
    workers = max(t.num_workers, 1)
    return {"CPU": workers * t.cpus_per_worker + data_cpu_budget(cfg.data),
            "GPU": workers * t.gpus_per_worker if t.use_gpu else 0.0}


def _validate_resources(cfg: ExperimentConfig) -> None:
    d = cfg.data
    if d.max_cpus is not None:
        _check(d.num_actors * d.cpus_per_actor <= d.max_cpus + 1e-9, "data.num_actors",
               f"x data.cpus_per_actor={d.cpus_per_actor:g} needs {d.num_actors * d.cpus_per_actor:g} CPUs, more "
               f"than the trial's data.max_cpus={d.max_cpus:g}", d.num_actors)


def check_sweep(cfg: ExperimentConfig) -> None:
    """What only a sweep needs (its command checks it before any Ray work): an early-stopping
    scheduler's first rung before the last epoch."""
    s, t = cfg.sweep, cfg.train
    if s.scheduler != "none":
        _check(s.grace_period < t.epochs, "sweep.grace_period",
               f"must be < train.epochs ({t.epochs}) for an early-stopping scheduler", s.grace_period)


def _validate_sweep(cfg: ExperimentConfig) -> None:
    s = cfg.sweep
    _check(s.num_samples >= 1, "sweep.num_samples", "must be >= 1", s.num_samples)
    _check(s.search in ("random", "grid", "optuna"), "sweep.search", "must be random, grid or optuna", s.search)
    _check(s.scheduler in SCHEDULERS, "sweep.scheduler", f"must be one of {', '.join(SCHEDULERS)}", s.scheduler)
    _check(s.mode in ("max", "min"), "sweep.mode", "must be max or min", s.mode)
    _check(s.grace_period >= 1, "sweep.grace_period", "must be >= 1", s.grace_period)
    _check(s.reduction_factor >= 2, "sweep.reduction_factor", "must be >= 2", s.reduction_factor)
    _check(s.max_concurrent_trials >= 0, "sweep.max_concurrent_trials", "must be >= 0 (0: auto)",
           s.max_concurrent_trials)
    method_fields = {f.name for f in dataclasses.fields(MethodConfig)} - {"name"}
    for name, spec in s.space.items():
        key = f"sweep.space.{name}"
        _check(name in method_fields, key, f"is not a method.* hyperparameter ({', '.join(sorted(method_fields))})",
               name)
        _check(isinstance(spec, dict) and spec.get("type") in SEARCH_TYPES, f"{key}.type",
               f"must be one of {', '.join(SEARCH_TYPES)}", spec.get("type") if isinstance(spec, dict) else spec)
        if spec["type"] in ("choice", "grid"):
            _check(isinstance(spec.get("values"), list) and len(spec["values"]) > 0, f"{key}.values",
                   "must be a non-empty list", spec.get("values"))
            values = spec["values"]
        else:
            _check("low" in spec and "high" in spec and spec["low"] < spec["high"], key, "needs low < high", spec)
            _check(spec["type"] != "loguniform" or spec["low"] > 0, f"{key}.low", "must be > 0 for loguniform",
                   spec.get("low"))
            values = [spec["low"], spec["high"]]
        for v in values:  # every reachable value must itself be a valid setting
            try:
                trial = with_overrides(cfg, {name: v})
                _validate_method_values(trial)
                _validate_geometry(trial)
            except ConfigError as err:
                raise ConfigError(f"{key}: value {v!r} is invalid: {err}") from None
    if s.search == "grid":
        _check(all(sp["type"] in ("choice", "grid") for sp in s.space.values()), "sweep.space",
               "grid search needs choice/grid entries only", list(s.space))
    if s.search == "optuna":
        _check(all(sp["type"] != "grid" for sp in s.space.values()), "sweep.space", "optuna cannot take grid entries",
               list(s.space))


# ---------------------------------------------------------------------------------------
# Composition
# ---------------------------------------------------------------------------------------

def register_schema() -> None:
    """Register :class:`ExperimentConfig` in Hydra's ConfigStore as ``schema`` (idempotent), which
    ``conf/config.yaml`` starts from; :func:`compose` does it first."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=ExperimentConfig)


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> ExperimentConfig:
    """``conf/<config_name>.yaml`` with Hydra command-line ``overrides`` -> a validated config.

    Raises :class:`ConfigError` naming the key, for typos and bad types (while composing)
    as for bad values (while validating).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_schema()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            raw = hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_composition_message(err, overrides)) from None
    finally:
        GlobalHydra.instance().clear()
    recipe = raw.hydra.runtime.choices.get("experiment") or ""
    return load_config(raw, recipe=recipe)


def load_config(raw: Any, recipe: Optional[str] = None) -> ExperimentConfig:
    """A composed Hydra/OmegaConf config (or a plain dict) -> validated :class:`ExperimentConfig`."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        if isinstance(raw, DictConfig) and "hydra" in raw:
            raw = OmegaConf.masked_copy(raw, [k for k in raw if k != "hydra"])
        merged = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), raw)
        plain = OmegaConf.to_container(merged, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise ConfigError(_omegaconf_message(err)) from None
    cfg = from_dict(plain)
    if recipe is not None:
        cfg.recipe = recipe
    validate(cfg)
    return cfg


def _omegaconf_message(err: Exception) -> str:
    key = getattr(err, "full_key", None) or ""
    msg = str(getattr(err, "msg", err)).splitlines()[0]
    if "not in" in msg and key:  # an unknown key: suggest the nearest known one
        return f"{key}: unknown key{_suggestion(key)}"
    return f"{key}: {msg}" if key else msg


def _composition_message(err: Exception, overrides: Sequence[str]) -> str:
    cause = err
    while cause.__cause__ is not None or cause.__context__ is not None:
        nxt = cause.__cause__ or cause.__context__
        if getattr(nxt, "full_key", None):
            return _omegaconf_message(nxt)
        cause = nxt
    if getattr(err, "full_key", None):
        return _omegaconf_message(err)
    text = str(err)
    m = re.search(r"Could not override '([\w.]+)'", text)
    if m and "No match in the defaults list" in text:
        return f"{m.group(1)}: not a config group (a key needs its group: e.g. train.{m.group(1)})"
    m = re.search(r"Could not find '([\w]+)/([\w.-]+)'", text)
    if m:
        group, option = m.groups()
        choices = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")) if (CONF_DIR / group).is_dir() else []
        return f"{group}={option}: no such option (available: {', '.join(choices)})"
    m = re.search(r"Key '(\w+)' (?:is )?not in (?:struct mode|'\w+')", text)
    o = re.search(r"Could not override '([\w.]+)'", text) or re.search(r"Could not append to config\. An item is "
                                                                       r"already at '([\w.]+)'", text)
    if m and o:
        return f"{o.group(1)}: unknown key{_suggestion(o.group(1))}"
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _suggestion(full_key: str) -> str:
    """' (did you mean group.key?)' for a mistyped ``group.key``, or ''."""
    group, _, name = full_key.rpartition(".")
    schema = {f.name: f.type for f in dataclasses.fields(ExperimentConfig)}
    known: List[str] = []
    if group in schema:
        known = [f.name for f in dataclasses.fields(_group_class(group))]
    elif not group:
        known = list(schema)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f" (did you mean {group + '.' if group else ''}{close[0]}?)" if close else ""


def _group_class(group: str):
    return typing.get_type_hints(ExperimentConfig)[group]


def from_dict(d: Dict[str, Any]) -> ExperimentConfig:
    """Plain dict (as shipped to Ray workers) -> ExperimentConfig, without validation."""
    kwargs: Dict[str, Any] = {}
    hints = typing.get_type_hints(ExperimentConfig)
    for f in dataclasses.fields(ExperimentConfig):
        if f.name not in d:
            continue
        cls = hints[f.name]
        if dataclasses.is_dataclass(cls):
            sub = dict(d.get(f.name) or {})
            known = {g.name for g in dataclasses.fields(cls)}
            unknown = sorted(set(sub) - known)
            if unknown:
                raise ConfigError(f"{f.name}.{unknown[0]}: unknown key{_suggestion(f'{f.name}.{unknown[0]}')}")
            kwargs[f.name] = cls(**sub)
        else:
            kwargs[f.name] = d[f.name]
    unknown = sorted(set(d) - set(hints))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key{_suggestion(unknown[0])}")
    return ExperimentConfig(**kwargs)


def with_overrides(cfg: ExperimentConfig, method_overrides: Dict[str, Any]) -> ExperimentConfig:
    """A copy of cfg with method.* values replaced (one Tune trial's sample)."""
    return dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, **method_overrides))


def flat_params(cfg: ExperimentConfig, groups: Sequence[str] = ("model", "method", "data", "train")) -> Dict[str, Any]:
    """group.key -> value, for MLflow parameters."""
    out = {}
    for g in groups:
        for k, v in dataclasses.asdict(getattr(cfg, g)).items():
            out[f"{g}.{k}"] = v
    out["recipe"] = cfg.recipe
    return out


def steps_per_epoch(cfg: ExperimentConfig, n_train: int) -> int:
    """Optimizer steps per pass over ``n_train`` images at the global batch (drop last)."""
    return n_train // cfg.train.global_batch_size


def peak_lr(cfg: ExperimentConfig) -> float:
    """The method's peak learning rate at this global batch (its own scaling rule)."""
    return method_door.peak_lr(cfg.method.name, cfg.method_kwargs(), cfg.train.global_batch_size)


__all__ = ["ConfigError", "ExperimentConfig", "DataConfig", "TrainConfig", "SweepConfig", "TrackingConfig",
           "RayConfig", "EvalConfig", "ModelConfig", "MethodConfig", "compose", "load_config", "from_dict",
           "validate", "check_data", "check_sweep", "with_overrides", "flat_params", "trial_resources", "data_cpu_budget", "steps_per_epoch",
           "peak_lr"]
