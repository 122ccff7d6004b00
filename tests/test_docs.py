"""Every `python experiments/...` command the docs show (README.md, the docstrings of
experiments/*.py, platform/cluster/*) composes, validates and plans (plan=true, no training,
exit 0); the GPU recipes resolve to what they claim. Fast: no Ray, no network."""

from __future__ import annotations

import ast
import math
import re
import shlex
from pathlib import Path

import pytest
import yaml

from conftest import compose

REPO = Path(__file__).resolve().parents[1]
CONFIG_SCRIPTS = {"sweep": "sweep", "train": "train", "evaluate": "evaluate"}


def _doc_texts():
    yield "README.md", (REPO / "README.md").read_text()
    for script in sorted((REPO / "experiments").glob("*.py")):
        yield str(script.relative_to(REPO)), ast.get_docstring(ast.parse(script.read_text())) or ""
    for path in sorted((REPO / "platform" / "cluster").iterdir()):
        if path.suffix == ".py" or not path.is_file():
            continue
        text = path.read_text()  # commands in comments; YAML values below
        yield str(path.relative_to(REPO)), "\n".join(re.sub(r"^\s*#\s?", "", line) for line in text.splitlines()
                                                     if line.lstrip().startswith("#"))
        if path.suffix == ".yaml":  # commands in YAML values (a RayJob's entrypoint)
            entry = (yaml.safe_load(text) or {}).get("spec", {}).get("entrypoint")
            if entry:
                yield f"{path.relative_to(REPO)}:entrypoint", entry


def documented_commands():
    """(where, script name, arguments) of every `python experiments/X.py ...` in the docs."""
    found = []
    for where, text in _doc_texts():
        text = re.sub(r"\\\n\s*", " ", text)  # line continuations
        for m in re.finditer(r"python3? experiments/(\w+)\.py([^\n`]*)", text):
            args = []
            for token in shlex.split(m.group(2), comments=True):
                if token in ("&&", "||", "|", ";", "&"):
                    break
                args.append(token)
            found.append((where, m.group(1), args))
    return found


COMMANDS = documented_commands()


def test_the_docs_show_the_real_paths():
    where = {w.split(":")[0] for w, _, _ in COMMANDS}
    assert {"README.md", "experiments/sweep.py", "experiments/train.py", "platform/cluster/aws.yaml",
            "platform/cluster/kuberay-rayjob.yaml"} <= where
    recipes = {a.split("=", 1)[1] for _, _, args in COMMANDS for a in args if a.startswith("experiment=")}
    assert {"imagenet_vits16", "cifar10"} <= recipes, recipes
    # the GPU and cluster commands name a recipe: never the quickstart's 32 px crops on a ViT-S/16
    for w, script, args in COMMANDS:
        if any(a.startswith(("data.path=s3://", "data.path=/data/imagenet")) for a in args):
            assert any(a.startswith("experiment=imagenet") for a in args), (w, args)


@pytest.mark.parametrize("where,script,args", COMMANDS, ids=[f"{w}:{s}:{' '.join(a)[:60]}" for w, s, a in COMMANDS])
def test_documented_command_plans(where, script, args, capsys, monkeypatch):
    assert (REPO / "experiments" / f"{script}.py").is_file(), script
    if script not in CONFIG_SCRIPTS:  # benchmarks and prepare_data: their own tests run them
        return
    from rayssl.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # plan against this machine, never a placeholder host
    from rayssl.data import DataSourceError, catalog

    listing = catalog.validate_source

    def no_placeholder_buckets(spec, download=True):  # placeholder buckets: no round trip to S3
        if "://" in str(spec.path or ""):
            raise DataSourceError(f"data.path={spec.path}: not listed in this test")
        return listing(spec, download)

    monkeypatch.setattr(catalog, "validate_source", no_placeholder_buckets)
    help_only = "--help" in args
    argv = args if help_only else [a for a in args if not a.startswith("plan=")] + ["plan=true"]
    status = main(CONFIG_SCRIPTS[script], argv, {}, config_name="evaluate" if script == "evaluate" else "config")
    out = capsys.readouterr()
    assert status == 0, f"{where}: {script} {' '.join(args)}\n{out.err}\n{out.out}"
    if help_only:
        assert "experiment=" in out.out and "imagenet_vits16" in out.out
    else:
        assert "global batch" in out.out and "peak lr" in out.out


IMAGENET = 1281167


@pytest.mark.parametrize("recipe,model,batch,epochs,workers", [
    ("imagenet_vits16", "vit_small_patch16_224", 1024, 100, 8),
    ("imagenet_vitb16", "vit_base_patch16_224", 1024, 100, 8),
    ("imagenet_vitl16", "vit_large_patch16_dinov3", 2048, 200, 32),
])
def test_gpu_recipes_resolve_to_what_they_claim(recipe, model, batch, epochs, workers):
    from rayssl.plan import Cluster, make_plan

    cfg = compose([f"experiment={recipe}", "data.path=/nonexistent/imagenet"])
    d, m, t = cfg.data, cfg.method, cfg.train
    assert (cfg.model.backbone, cfg.patch_size) == (model, 16)
    assert (d.global_size, d.local_size, d.n_local, d.eval_size) == (224, 96, 8, 224)
    assert m.name == "dinov3" and t.use_gpu and t.precision == "auto"
    assert (t.global_batch_size, t.epochs, t.num_workers, t.worker_batch_size) == (batch, epochs, workers,
                                                                                   batch // workers)
    plan = make_plan(cfg, "train", Cluster("a test cluster", cpus=4096, gpus=64, live=True))
    assert not plan.errors, plan.errors
    n = plan.numbers
    steps = IMAGENET // batch * epochs
    assert n["total_steps"] == steps and n["steps_per_epoch"] == IMAGENET // batch
    assert n["peak_lr"] == pytest.approx(1e-3 * math.sqrt(batch / 1024))
    assert n["warmup_steps"] == int(0.1 * steps) and n["teacher_temp_warmup_steps"] == int(0.3 * steps)
    # the recipe's schedule, by the DINOv3 schedule's own definitions
    assert (m.temperature_teacher, m.teacher_temp_warmup_start) == (0.07, 0.04)
    assert (m.momentum_start, m.momentum_end, m.weight_decay_start, m.weight_decay_end) == (0.992, 1.0, 0.04, 0.4)
    assert (m.koleo_weight, m.clip_grad, m.layerwise_decay, m.patch_embed_lr_mult) == (0.1, 3.0, 0.9, 0.2)


def test_vitl16_is_metas_released_imagenet_recipe():
    """dinov3/configs/train/vitl_im1k_lin834.yaml: 125k iterations (100 official epochs of 1,250) at
    batch 2048, warm-up 10 and teacher-temperature 30 of those epochs, last layer frozen 1, no
    registers, qkv bias, 65536 prototypes in both heads, blur as released."""
    from rayssl.plan import Cluster, make_plan

    cfg = compose(["experiment=imagenet_vitl16", "data.path=/nonexistent/imagenet"])
    n = make_plan(cfg, "train", Cluster("32 GPUs", cpus=512, gpus=32, live=True)).numbers
    assert n["total_steps"] == 125_000 and n["warmup_steps"] == 12_500
    assert n["teacher_temp_warmup_steps"] == 37_500 and n["freeze_last_layer_steps"] == 1_250
    mdl, m = cfg.model, cfg.method
    assert (m.n_register_tokens, mdl.qkv_bias, mdl.n_cls_prototypes, mdl.n_patch_prototypes) == (0, True, 65536, 65536)
    assert (mdl.drop_path_rate, mdl.layerscale_init, mdl.head_hidden_dim, mdl.head_bottleneck_dim) == (0.3, 1e-5, 2048, 256)
    assert (m.mask_probability, m.mask_ratio - m.mask_ratio_spread, m.mask_ratio + m.mask_ratio_spread) == \
        pytest.approx((0.5, 0.1, 0.5))
    assert cfg.data.blur == "official" and cfg.train.compile


def test_cifar10_recipe_gives_a_useful_patch_grid():
    cfg = compose(["experiment=cifar10"])
    assert cfg.data.name == "cifar10" and cfg.patch_size == 4
    assert (cfg.data.global_size // 4, cfg.data.local_size // 4) == (8, 4)
    assert cfg.data.n_local == 6 and cfg.train.num_workers == 1 and cfg.train.use_gpu


def test_plan_warns_when_a_worker_share_does_not_fit_its_gpu_and_names_the_fix():
    from rayssl.plan import Cluster, make_plan

    h100s = Cluster("8 H100", cpus=256, gpus=8, accelerator="H100", live=True)
    eight = compose(["experiment=imagenet_vitl16", "data.path=/x", "train.num_workers=8"])
    warned = make_plan(eight, "train", h100s)
    assert warned.numbers["gpu_memory_gib"] > 80
    assert any("more than an H100's 80 GiB: train.accumulate=2" in w for w in warned.warnings), warned.warnings
    fits = make_plan(compose(["experiment=imagenet_vitl16", "data.path=/x", "train.num_workers=8",
                              "train.accumulate=2"]), "train", h100s)
    assert fits.numbers["gpu_memory_gib"] < 72 and not any("GiB of GPU memory" in w for w in fits.warnings)
    # the same schedule either way
    assert fits.numbers["total_steps"] == warned.numbers["total_steps"] == 125_000
    assert fits.numbers["peak_lr"] == warned.numbers["peak_lr"]
