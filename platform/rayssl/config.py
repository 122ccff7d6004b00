"""Typed config schemas: the one place where Hydra config becomes objects.

Every entry script calls :func:`load_config` first. It merges the composed Hydra
config into these dataclasses (type errors name the key), checks values (range
errors name the key) and returns a plain :class:`ExperimentConfig`, before any
Ray work starts. Everything below this module sees dataclasses or plain dicts,
never OmegaConf objects.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO_ROOT = Path(__file__).resolve().parents[2]


class ConfigError(ValueError):
    """A config value is invalid; the message names the key."""


@dataclass
class ModelConfig:
    backbone: str = "vit_small_patch16_224"
    patch_size: int = 16
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    drop_path_rate: float = 0.1
    layerscale_init: Optional[float] = 1e-5  # null: no LayerScale (short runs of small models learn faster)
    pretrained: bool = False
    pretrained_file: Optional[str] = None  # a local checkpoint for pretrained=true (no hub download)
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    n_cls_prototypes: int = 65536
    n_patch_prototypes: int = 8192


@dataclass
class MethodConfig:
    name: str = "dinov3"
    koleo_weight: float = 0.1
    mask_ratio: float = 0.3
    n_register_tokens: int = 4
    temperature_student: float = 0.1
    temperature_teacher: float = 0.07
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    mask_strategy: str = "block"
    mask_probability: float = 0.5
    mask_ratio_spread: float = 0.2  # block ratios span mask_ratio -/+ this (clipped to [0, 0.95])
    mask_min_block_patches: int = 4
    mask_max_block_frac: float = 0.5  # of the patch grid
    mask_seed: int = 0  # + rank: each worker's mask generator
    sinkhorn_iterations: int = 3
    teacher_temp_warmup_start: float = 0.04
    teacher_temp_warmup_frac: float = 0.3
    base_lr: float = 4e-3
    lr_reference_batch: int = 1024  # peak lr = base_lr * sqrt(global batch / this)
    min_lr: float = 1e-6
    lr_warmup_frac: float = 0.1
    weight_decay_start: float = 0.04
    weight_decay_end: float = 0.4
    momentum_start: float = 0.992
    momentum_end: float = 1.0
    clip_grad: float = 3.0
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    freeze_last_layer_epochs: float = 1.0
    gram_weight: float = 0.0
    gram_start_step: int = 0
    gram_refresh_every: int = 0
    gram_max_refreshes: int = 0
    # memory / speed only (same losses and gradients)
    split_backward: bool = True  # one backward per crop group: about half the student's activation memory
    lean_mlp: bool = True  # fused, activation-lean MLP branch in fp32 training


@dataclass
class DataConfig:
    name: str = "synthetic"
    path: Optional[str] = None
    global_size: int = 32
    local_size: int = 16
    n_local: int = 4
    blur: str = "nominal"
    eval_size: int = 32
    num_actors: int = 1
    cpus_per_actor: float = 1.0
    map_batch_size: int = 64
    max_cpus: Optional[float] = None
    read_concurrency: Optional[int] = None
    knn_bank_size: Optional[int] = None
    knn_query_size: Optional[int] = None
    synthetic_n_train: int = 2048
    synthetic_n_eval: int = 512
    synthetic_image_size: int = 32
    synthetic_seed: int = 0


@dataclass
class TrainConfig:
    epochs: int = 4
    batch_size: int = 64
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    precision: str = "auto"
    compile: bool = False
    seed: int = 0
    log_every: int = 10
    knn_every: int = 1
    knn_k: int = 20
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    max_failures: int = 0
    prefetch_batches: int = 2
    storage_path: Optional[str] = None
    run_name: Optional[str] = None
    resume_from: Optional[str] = None
    system_metrics: bool = True
    fault_injection_step: int = 0


@dataclass
class SweepConfig:
    name: str = "quickstart"
    num_samples: int = 4
    search: str = "random"
    scheduler: str = "none"
    metric: str = "knn_top1"
    mode: str = "max"
    grace_period: int = 1
    reduction_factor: int = 2
    max_concurrent_trials: int = 0
    seed: int = 0
    run_name: Optional[str] = None  # fixed name: re-running it resumes the sweep (Tuner.restore)
    retry_failed: bool = False  # on resume, also re-run trials that failed (not only unfinished ones)
    space: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TrackingConfig:
    uri: Optional[str] = None
    experiment: str = "dinov3-ray"
    register_model_name: Optional[str] = None  # register the best trial's model under this name


@dataclass
class RayConfig:
    address: Optional[str] = None
    num_cpus: Optional[int] = None


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)

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


def resolve_tracking_uri(uri: Optional[str]) -> str:
    """Absolute MLflow URI: Ray workers chdir elsewhere, so relative paths would split the store."""
    if not uri:
        return f"sqlite:///{REPO_ROOT / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    if "://" not in uri:  # a bare directory: MLflow file store
        return "file://" + os.path.abspath(os.path.expanduser(uri))
    return uri


def _check(cond: bool, key: str, msg: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r}: {msg}")


def validate(cfg: ExperimentConfig) -> None:
    """Range checks that types alone cannot express; each error names its key."""
    _validate_method(cfg.method)
    d, t, s = cfg.data, cfg.train, cfg.sweep
    m = cfg.method

    mdl = cfg.model
    _check(mdl.patch_size > 0, "model.patch_size", "must be > 0", mdl.patch_size)
    _check(0.0 <= mdl.drop_path_rate < 1.0, "model.drop_path_rate", "must be in [0, 1)", mdl.drop_path_rate)
    _check(mdl.layerscale_init is None or mdl.layerscale_init > 0, "model.layerscale_init", "must be null or > 0",
           mdl.layerscale_init)
    for key in ("n_cls_prototypes", "n_patch_prototypes", "head_hidden_dim", "head_bottleneck_dim"):
        _check(getattr(mdl, key) > 0, f"model.{key}", "must be > 0", getattr(mdl, key))
    if mdl.embed_dim is not None and mdl.num_heads is not None:
        _check(mdl.embed_dim % mdl.num_heads == 0, "model.embed_dim", f"must be divisible by model.num_heads={mdl.num_heads}", mdl.embed_dim)

    _check(d.name in ("synthetic", "imagefolder", "parquet", "cifar10"), "data.name",
           "must be one of synthetic, imagefolder, parquet, cifar10", d.name)
    _check(d.name == "synthetic" or bool(d.path), "data.path", f"is required for data={d.name}", d.path)
    _check(d.global_size % mdl.patch_size == 0, "data.global_size", f"must be a multiple of model.patch_size={mdl.patch_size}", d.global_size)
    _check(d.local_size % mdl.patch_size == 0, "data.local_size", f"must be a multiple of model.patch_size={mdl.patch_size}", d.local_size)
    _check(d.eval_size % mdl.patch_size == 0, "data.eval_size", f"must be a multiple of model.patch_size={mdl.patch_size}", d.eval_size)
    _check(d.n_local >= 0, "data.n_local", "must be >= 0", d.n_local)
    _check(d.blur in ("nominal", "official"), "data.blur", "must be 'nominal' or 'official'", d.blur)
    _check(d.num_actors >= 1, "data.num_actors", "must be >= 1", d.num_actors)
    _check(0 < d.cpus_per_actor, "data.cpus_per_actor", "must be > 0", d.cpus_per_actor)
    _check(d.map_batch_size >= 1, "data.map_batch_size", "must be >= 1", d.map_batch_size)
    _check(d.read_concurrency is None or d.read_concurrency >= 1, "data.read_concurrency", "must be >= 1 or null",
           d.read_concurrency)
    _check(d.synthetic_n_train >= 16, "data.synthetic_n_train", "must be >= 16", d.synthetic_n_train)

    _check(t.epochs >= 1, "train.epochs", "must be >= 1", t.epochs)
    _check(t.batch_size >= 2, "train.batch_size", "must be >= 2 (KoLeo needs a neighbour)", t.batch_size)
    _check(t.num_workers >= 0, "train.num_workers", "must be >= 0", t.num_workers)
    _check(t.cpus_per_worker >= 0, "train.cpus_per_worker", "must be >= 0", t.cpus_per_worker)
    _check(t.precision in ("auto", "bf16", "fp32"), "train.precision", "must be auto, bf16 or fp32", t.precision)
    _check(t.log_every >= 1, "train.log_every", "must be >= 1", t.log_every)
    _check(t.knn_every >= 1, "train.knn_every", "must be >= 1", t.knn_every)
    _check(t.knn_k >= 1, "train.knn_k", "must be >= 1", t.knn_k)
    _check(t.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0 (0: every epoch)", t.checkpoint_every)
    _check(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1", t.keep_checkpoints)
    _check(t.max_failures >= -1, "train.max_failures", "must be >= -1 (-1: retry forever)", t.max_failures)
    if t.resume_from is not None:
        _check(os.path.exists(os.path.expanduser(t.resume_from)) or "://" in t.resume_from,
               "train.resume_from", "no such checkpoint directory", t.resume_from)

    _check(s.num_samples >= 1, "sweep.num_samples", "must be >= 1", s.num_samples)
    _check(s.search in ("random", "grid", "optuna"), "sweep.search", "must be random, grid or optuna", s.search)
    _check(s.scheduler in SCHEDULERS, "sweep.scheduler", f"must be one of {', '.join(SCHEDULERS)}", s.scheduler)
    _check(s.mode in ("max", "min"), "sweep.mode", "must be max or min", s.mode)
    _check(s.grace_period >= 1, "sweep.grace_period", "must be >= 1", s.grace_period)
    _check(s.reduction_factor >= 2, "sweep.reduction_factor", "must be >= 2", s.reduction_factor)
    if s.scheduler != "none":
        _check(s.grace_period < t.epochs, "sweep.grace_period",
               f"must be < train.epochs ({t.epochs}) for an early-stopping scheduler", s.grace_period)
    _check(s.max_concurrent_trials >= 0, "sweep.max_concurrent_trials", "must be >= 0 (0: auto)", s.max_concurrent_trials)
    method_fields = {f.name for f in dataclasses.fields(MethodConfig)} - {"name"}
    for name, spec in s.space.items():
        key = f"sweep.space.{name}"
        _check(name in method_fields, key, f"is not a method.* hyperparameter ({', '.join(sorted(method_fields))})", name)
        _check(isinstance(spec, dict) and spec.get("type") in SEARCH_TYPES, f"{key}.type",
               f"must be one of {', '.join(SEARCH_TYPES)}", spec.get("type") if isinstance(spec, dict) else spec)
        if spec["type"] in ("choice", "grid"):
            _check(isinstance(spec.get("values"), list) and len(spec["values"]) > 0, f"{key}.values", "must be a non-empty list", spec.get("values"))
            values = spec["values"]
        else:
            _check("low" in spec and "high" in spec and spec["low"] < spec["high"], key, "needs low < high", spec)
            _check(spec["type"] != "loguniform" or spec["low"] > 0, f"{key}.low", "must be > 0 for loguniform", spec.get("low"))
            values = [spec["low"], spec["high"]]
        for v in values:  # every reachable value must itself be a valid method setting
            try:
                _validate_method(dataclasses.replace(m, **{name: v}))
            except ConfigError as err:
                raise ConfigError(f"{key}: value {v!r} is invalid: {err}") from None
    if s.search == "grid":
        _check(all(sp["type"] in ("choice", "grid") for sp in s.space.values()), "sweep.space",
               "grid search needs choice/grid entries only", list(s.space))
    if s.search == "optuna":
        _check(all(sp["type"] != "grid" for sp in s.space.values()), "sweep.space", "optuna cannot take grid entries", list(s.space))
    _validate_with_method(cfg)


def _validate_with_method(cfg: ExperimentConfig) -> None:
    """The method's own check of the model/method values it receives (e.g. DINOv3Config), so
    nothing a key can break waits until a trial builds the model; errors name the key."""
    import re

    from rayssl.method import check_method_config

    try:
        check_method_config(cfg.method.name, cfg.method_kwargs())
    except ValueError as err:
        msg = str(err)
        m = re.match(r"\w+\.(\w+)=(.*?): (.*)", msg)
        if m is None:
            raise ConfigError(f"method.name={cfg.method.name!r}: {msg}") from None
        field_name, value, rule = m.groups()
        group = "model" if field_name in {f.name for f in dataclasses.fields(ModelConfig)} else "method"
        if field_name == "img_size":
            group, field_name = "data", "global_size"
        raise ConfigError(f"{group}.{field_name}={value}: {rule}") from None


def _validate_method(m: MethodConfig) -> None:
    _check(0.0 <= m.mask_ratio < 1.0, "method.mask_ratio", "must be in [0, 1)", m.mask_ratio)
    _check(0.0 <= m.mask_probability <= 1.0, "method.mask_probability", "must be in [0, 1]", m.mask_probability)
    _check(m.mask_strategy in ("block", "random"), "method.mask_strategy", "must be 'block' or 'random'", m.mask_strategy)
    _check(m.mask_ratio_spread >= 0, "method.mask_ratio_spread", "must be >= 0", m.mask_ratio_spread)
    _check(0.0 < m.mask_max_block_frac <= 1.0, "method.mask_max_block_frac", "must be in (0, 1]", m.mask_max_block_frac)
    for key in ("mask_min_block_patches", "sinkhorn_iterations", "lr_reference_batch"):
        _check(getattr(m, key) >= 1, f"method.{key}", "must be >= 1", getattr(m, key))
    for key in ("koleo_weight", "dino_weight", "ibot_weight", "gram_weight"):
        _check(getattr(m, key) >= 0, f"method.{key}", "must be >= 0", getattr(m, key))
    for key in ("temperature_student", "temperature_teacher", "teacher_temp_warmup_start", "base_lr"):
        _check(getattr(m, key) > 0, f"method.{key}", "must be > 0", getattr(m, key))
    _check(m.clip_grad >= 0, "method.clip_grad", "must be >= 0 (0: no clipping)", m.clip_grad)
    _check(0 <= m.n_register_tokens <= 64, "method.n_register_tokens", "must be in [0, 64]", m.n_register_tokens)
    for key in ("momentum_start", "momentum_end"):
        _check(0.0 <= getattr(m, key) <= 1.0, f"method.{key}", "must be in [0, 1]", getattr(m, key))
    for key in ("lr_warmup_frac", "teacher_temp_warmup_frac"):
        _check(0.0 <= getattr(m, key) <= 1.0, f"method.{key}", "must be in [0, 1]", getattr(m, key))
    _check(0 < m.layerwise_decay <= 1.0, "method.layerwise_decay", "must be in (0, 1]", m.layerwise_decay)


def load_config(raw: Any) -> ExperimentConfig:
    """Hydra/OmegaConf config (or plain dict) -> validated :class:`ExperimentConfig`.

    Raises :class:`ConfigError` naming the offending key.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), raw)
        if "hydra" in merged:
            merged.pop("hydra")
        plain = OmegaConf.to_container(merged, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or ""
        first_line = str(getattr(err, "msg", err)).splitlines()[0]
        raise ConfigError(f"{key}: {first_line}" if key else first_line) from None
    cfg = from_dict(plain)
    validate(cfg)
    return cfg


def from_dict(d: Dict[str, Any]) -> ExperimentConfig:
    """Plain dict (as shipped to Ray workers) -> ExperimentConfig, without validation."""
    kwargs = {}
    for name, cls in typing.get_type_hints(ExperimentConfig).items():
        sub = dict(d.get(name) or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(sub) - known
        if unknown:
            raise ConfigError(f"{name}.{sorted(unknown)[0]}: unknown key (known: {', '.join(sorted(known))})")
        kwargs[name] = cls(**sub)
    return ExperimentConfig(**kwargs)


def with_overrides(cfg: ExperimentConfig, method_overrides: Dict[str, Any]) -> ExperimentConfig:
    """A copy of cfg with method.* values replaced (one Tune trial's sample)."""
    return dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, **method_overrides))


def flat_params(cfg: ExperimentConfig, groups: List[str] = ("model", "method", "data", "train")) -> Dict[str, Any]:
    """group.key -> value, for MLflow parameters."""
    out = {}
    for g in groups:
        for k, v in dataclasses.asdict(getattr(cfg, g)).items():
            out[f"{g}.{k}"] = v
    return out
