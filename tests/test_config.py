"""Config composition and validation: bad values fail early, naming the key."""

import re
import subprocess
import sys
import time

import pytest

from conftest import REPO, compose


def test_quickstart_defaults_compose_and_map_onto_the_method():
    cfg = compose()
    assert cfg.data.name == "synthetic" and cfg.sweep.num_samples >= 4
    kwargs = cfg.method_kwargs()
    assert kwargs["img_size"] == cfg.data.global_size
    for key in ("koleo_weight", "mask_ratio", "n_register_tokens", "temperature_student", "temperature_teacher"):
        assert kwargs[key] == getattr(cfg.method, key)
    assert set(cfg.sweep.space) == {"koleo_weight", "mask_ratio", "n_register_tokens",
                                    "temperature_student", "temperature_teacher"}


def test_documented_overrides_reach_the_config():
    cfg = compose(["model=micro", "data=imagefolder", "data.path=/some/dir", "train.epochs=3",
                   "sweep.num_samples=2", "tracking.uri=sqlite:///rel/x.db", "method.koleo_weight=0.25",
                   "method.mask_ratio=0.4", "method.n_register_tokens=2", "method.temperature_student=0.2",
                   "method.temperature_teacher=0.05"])
    assert (cfg.model.depth, cfg.model.embed_dim, cfg.model.patch_size) == (2, 64, 8)
    assert cfg.data.name == "imagefolder" and cfg.data.path == "/some/dir"
    assert cfg.train.epochs == 3 and cfg.sweep.num_samples == 2
    assert (cfg.method.koleo_weight, cfg.method.mask_ratio, cfg.method.n_register_tokens,
            cfg.method.temperature_student, cfg.method.temperature_teacher) == (0.25, 0.4, 2, 0.2, 0.05)
    # Relative sqlite paths become absolute: Ray workers run in another directory.
    assert cfg.tracking_uri.startswith("sqlite:////") and cfg.tracking_uri.endswith("/rel/x.db")


NEW_METHOD_KEYS = {"mask_ratio_spread": 0.1, "mask_min_block_patches": 2, "mask_max_block_frac": 0.25,
                   "mask_seed": 7, "sinkhorn_iterations": 5, "lr_reference_batch": 256, "split_backward": False,
                   "lean_mlp": False}  # non-default values


def test_method_overrides_reach_the_built_method_config():
    from dataclasses import fields

    from dinov3.config import DINOv3Config

    cfg = compose([f"method.{k}={str(v).lower()}" for k, v in NEW_METHOD_KEYS.items()])
    built = DINOv3Config.from_dict(cfg.method_kwargs()).validate()
    for key, value in NEW_METHOD_KEYS.items():
        assert getattr(DINOv3Config(), key) != value, key  # an override, not the default
        assert getattr(built, key) == value and type(getattr(built, key)) is type(value), key
    assert built.mask_ratio_range == pytest.approx((0.2, 0.4))  # mask_ratio 0.3 -/+ 0.1
    # every method hyperparameter is settable from Hydra (img_size comes from data.global_size)
    assert {f.name for f in fields(DINOv3Config)} == set(cfg.method_kwargs())


def test_default_tracking_store_is_absolute_sqlite_at_repo_root():
    assert compose().tracking_uri == f"sqlite:///{REPO / 'mlflow.db'}"


@pytest.mark.parametrize("override,key", [
    ("method.mask_ratio=1.5", "method.mask_ratio"),
    ("method.temperature_teacher=0", "method.temperature_teacher"),
    ("method.koleo_weight=-1", "method.koleo_weight"),
    ("method.n_register_tokens=-2", "method.n_register_tokens"),
    ("method.mask_ratio_spread=-0.1", "method.mask_ratio_spread"),
    ("method.mask_min_block_patches=0", "method.mask_min_block_patches"),
    ("method.mask_max_block_frac=1.5", "method.mask_max_block_frac"),
    ("method.mask_max_block_frac=0", "method.mask_max_block_frac"),
    ("method.sinkhorn_iterations=0", "method.sinkhorn_iterations"),
    ("method.sinkhorn_iterations=2.5", "method.sinkhorn_iterations"),
    ("method.lr_reference_batch=0", "method.lr_reference_batch"),
    ("method.mask_seed=abc", "method.mask_seed"),
    ("method.split_backward=maybe", "method.split_backward"),
    # checked by the method's own config check (rayssl.method.CONFIG_CHECKS), before Ray
    ("method.min_lr=-1e-6", "method.min_lr=-1e-06: must be >= 0"),
    ("method.weight_decay_end=-0.1", "method.weight_decay_end=-0.1: must be >= 0"),
    ("method.patch_embed_lr_mult=-0.2", "method.patch_embed_lr_mult"),
    ("method.freeze_last_layer_epochs=-1", "method.freeze_last_layer_epochs"),
    ("method.gram_refresh_every=-5", "method.gram_refresh_every"),
    ("model.backbone=resnet50", "model.backbone='resnet50': must be a timm vit_"),
    ("model.pretrained_file=/nonexistent/vit.pth", "model.pretrained_file='/nonexistent/vit.pth': needs pretrained"),
    ("model.pretrained=true model.pretrained_file=/nonexistent/vit.pth",
     "model.pretrained_file='/nonexistent/vit.pth': no such file"),
    ("train.epochs=0", "train.epochs"),
    ("train.epochs=abc", "train.epochs"),
    ("data.global_size=30", "data.global_size"),
    ("data.blur=gaussian", "data.blur='gaussian': must be 'nominal', 'official' or 'none'"),
    # typos are config errors too, naming the key and the nearest known one
    ("train.batch_sise=3", "train.batch_sise: unknown key (did you mean train.global_batch_size?)"),
    ("method.koleo_wieght=0.2", "method.koleo_wieght: unknown key (did you mean method.koleo_weight?)"),
    ("model=vit_smal", "model=vit_smal: no such option"),
    ("experiment=imagenet", "experiment=imagenet: no such option"),
    # geometry: crops on the patch grid, enough patches, masks that mask something
    ("model=vit_small", "data.global_size=32: gives a 2x2 patch grid at patch size 16"),
    ("data.local_size=8", "data.local_size=8: gives a 1x1 patch grid at patch size 8"),
    ("data.local_size=12", "data.local_size=12: must be a multiple of the patch size 8"),
    ("method.mask_ratio=0.02 method.mask_ratio_spread=0", "method.mask_ratio=0.02: masks no patch"),
    ("method.mask_probability=0.01", "method.mask_probability=0.01: masks no crop"),
    # resources: the global batch divides over the workers; actors fit the trial's data CPUs
    ("train.global_batch_size=33 train.num_workers=2", "train.global_batch_size=33: must divide over train.num_workers=2"),
    ("train.global_batch_size=2 train.num_workers=2", "train.global_batch_size=2: gives 1 images per worker"),
    ("data.num_actors=4 data.max_cpus=1", "data.num_actors=4: x data.cpus_per_actor=0.5 needs 2 CPUs"),
    ("experiment=imagenet_vits16", "data.path=None: is required for data=imagefolder"),
    ("sweep.search=bayes", "sweep.search"),
    ("sweep.scheduler=hyperband", "sweep.scheduler"),
    ("sweep.space.mask_ratio.high=1.2", "sweep.space.mask_ratio"),
])
def test_invalid_values_raise_naming_the_key(override, key):
    from rayssl.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(key)):
        compose(override.split(" "))


def test_clip_grad_zero_turns_clipping_off():
    cfg = compose(["method.clip_grad=0"])
    assert cfg.method.clip_grad == 0


def test_early_stopping_needs_a_rung_before_the_last_epoch():
    from rayssl.config import ConfigError, check_sweep

    check_sweep(compose(["sweep.scheduler=asha_promotion", "sweep.grace_period=2", "train.epochs=3"]))
    check_sweep(compose(["sweep.grace_period=3", "train.epochs=3"]))  # no scheduler, no rungs
    for scheduler in ("asha", "asha_promotion"):
        cfg = compose([f"sweep.scheduler={scheduler}", "sweep.grace_period=3", "train.epochs=3"])  # fine for train.py
        with pytest.raises(ConfigError, match=r"sweep\.grace_period"):
            check_sweep(cfg)


@pytest.mark.parametrize("script,override,key", [
    ("sweep", "method.mask_ratio=1.5", "method.mask_ratio=1.5"),
    ("sweep", "train.batch_sise=3", "train.batch_sise: unknown key"),
    ("train", "model=vit_small", "data.global_size=32"),
    ("train", "train.global_batch_size=33 train.num_workers=2", "train.global_batch_size=33"),
    ("sweep", "data.num_actors=4 data.max_cpus=1", "data.num_actors=4"),
])
def test_cli_config_errors_exit_2_fast_before_anything_heavy(tmp_path, script, override, key):
    def run():
        start = time.monotonic()
        proc = subprocess.run([sys.executable, str(REPO / "experiments" / f"{script}.py"), *override.split(" "),
                               f"tracking.uri=sqlite:///{tmp_path}/m.db"],
                              capture_output=True, text=True, cwd=tmp_path, timeout=120)
        return proc, time.monotonic() - start

    proc, elapsed = run()
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"config error: {key}"), proc.stderr
    assert not (tmp_path / "m.db").exists(), "nothing may be written before validation passes"
    if elapsed >= 3:  # once more: a moment of load from other processes is not the CLI's cost
        elapsed = min(elapsed, run()[1])
    assert elapsed < 3, f"took {elapsed:.1f}s"


def test_validation_imports_no_torch_timm_or_ray():
    code = ("import sys; sys.path[:0] = [{repo!r}, {platform!r}]\n"
            "from rayssl.config import compose\n"
            "compose(['experiment=imagenet_vitl16', 'data.path=/x'])\n"
            "heavy = sorted(m for m in ('torch', 'timm', 'ray', 'mlflow', 'torchvision') if m in sys.modules)\n"
            "print(heavy)").format(repo=str(REPO), platform=str(REPO / "platform"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_defaults_live_in_the_schemas_and_every_preset_composes():
    """The YAML presets restate no schema default, and every preset and recipe composes against
    the typed schema (unknown keys and wrong types fail)."""
    import dataclasses

    import yaml

    from dinov3.config import DINOv3Config
    from rayssl import config

    defaults = {"model": config.ModelConfig(), "method": config.MethodConfig(), "data": config.DataConfig(),
                "train": config.TrainConfig(), "sweep": config.SweepConfig()}
    identity = ("name", "backbone")  # what a preset is, even where it is the default one
    for group, schema in defaults.items():
        for path in sorted((REPO / "conf" / group).glob("*.yaml")):
            values = {k: v for k, v in (yaml.safe_load(path.read_text()) or {}).items() if k != "defaults"}
            restated = [k for k, v in values.items() if k not in identity and getattr(schema, k, object()) == v]
            assert not restated, f"{path.name} restates schema defaults: {restated}"
            recipe = ["experiment=imagenet_vits16", "data.path=/x"] if "patch16" in str(values) else []
            assert compose(recipe + [f"{group}={path.stem}", "data.path=/x"]) is not None
    for path in sorted((REPO / "conf" / "experiment").glob("*.yaml")):
        assert compose([f"experiment={path.stem}", "data.path=/x"]).recipe == path.stem
    # the model + method groups are typed by the method's own config class, with its defaults
    fields = {f.name: f.default for f in dataclasses.fields(DINOv3Config) if f.name != "img_size"}
    schema = {**dataclasses.asdict(config.ModelConfig()), **dataclasses.asdict(config.MethodConfig())}
    schema.pop("name")
    assert schema == fields


def test_cli_rejects_missing_data_path_naming_it(tmp_path):
    missing = tmp_path / "no-such-dir"
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / "sweep.py"), "data=imagefolder",
                           f"data.path={missing}", f"tracking.uri=sqlite:///{tmp_path}/m.db"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert str(missing) in proc.stderr


def test_stdlib_platform_is_not_shadowed_from_repo_root():
    proc = subprocess.run([sys.executable, "-c", "import platform, sys; print(platform.system()); "
                           "print(platform.__file__)"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    system, path = proc.stdout.split()
    assert system == "Linux" or system in ("Darwin", "Windows")
    assert "site-packages" not in path and not path.startswith(str(REPO))
    assert not (REPO / "platform" / "__init__.py").exists()
