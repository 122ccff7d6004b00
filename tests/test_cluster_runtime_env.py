"""rayssl.cluster: the runtime_env a driver sends when it joins a cluster (no Ray start)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, compose

JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in (JOB_ENV, "MLFLOW_TRACKING_URI", "RAYSSL_STORAGE_PATH"):
        monkeypatch.delenv(key, raising=False)


def test_ships_both_packages_and_the_resolved_stores():
    from rayssl.cluster import cluster_runtime_env

    cfg = compose(["tracking.uri=http://mlflow:5000", "train.storage_path=s3://bucket/runs"])
    env = cluster_runtime_env(cfg, {"env_vars": {"MLFLOW_TRACKING_URI": "x", "PYTHONPATH": "/local/only"}})
    assert [Path(p).name for p in env["py_modules"]] == ["dinov3", "rayssl"]
    assert all(Path(p, "__init__.py").is_file() for p in env["py_modules"])
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["env_vars"]["RAYSSL_STORAGE_PATH"] == "s3://bucket/runs"
    assert "PYTHONPATH" not in env["env_vars"]


def test_leaves_the_jobs_own_keys_so_ray_can_merge(monkeypatch):
    from ray.runtime_env.runtime_env import _merge_runtime_env
    from rayssl.cluster import cluster_runtime_env

    job = {"working_dir": "gcs://_ray_pkg_abc.zip",
           "env_vars": {"MLFLOW_TRACKING_URI": "http://team:5000", "PYTHONWARNINGS": "ignore"}}
    monkeypatch.setenv(JOB_ENV, json.dumps({"runtime_env": job, "metadata": {}}))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://team:5000")  # the job's env_vars reach its driver
    cfg = compose([])
    assert cfg.tracking_uri == "http://team:5000"
    env = cluster_runtime_env(cfg, {"env_vars": {"MLFLOW_TRACKING_URI": cfg.tracking_uri,
                                                 "PYTHONWARNINGS": "ignore::DeprecationWarning"}})
    assert "MLFLOW_TRACKING_URI" not in env["env_vars"] and "PYTHONWARNINGS" not in env["env_vars"]
    assert "RAYSSL_STORAGE_PATH" in env["env_vars"] and "py_modules" in env
    assert _merge_runtime_env(job, env) is not None  # ray.init would raise on a conflict

    job_with_modules = dict(job, py_modules=["gcs://_ray_pkg_def.zip"])
    monkeypatch.setenv(JOB_ENV, json.dumps({"runtime_env": job_with_modules}))
    env = cluster_runtime_env(cfg, {})
    assert "py_modules" not in env and "excludes" not in env
    assert _merge_runtime_env(job_with_modules, env) is not None


def test_unset_config_values_fall_back_to_the_runtime_env_vars(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    monkeypatch.setenv("RAYSSL_STORAGE_PATH", "gs://bucket/dinov3")
    cfg = compose([])
    assert cfg.tracking_uri == "http://mlflow.internal:5000"
    assert cfg.storage_path == "gs://bucket/dinov3"
    explicit = compose(["tracking.uri=http://other:5000", "train.storage_path=/mnt/nfs/runs"])
    assert explicit.tracking_uri == "http://other:5000" and explicit.storage_path == "/mnt/nfs/runs"


def test_py_modules_package_as_importable_top_level_packages(tmp_path):
    """What Ray uploads for each py_module: the package directory itself at the zip's top."""
    from ray._private.runtime_env.packaging import create_package
    from rayssl.cluster import package_dirs

    for path in package_dirs():
        name = Path(path).name
        zip_path = tmp_path / f"{name}.zip"
        create_package(path, zip_path, include_gitignore=True, include_parent_dir=True,
                       excludes=["__pycache__", "*.pyc"])
        names = zipfile.ZipFile(zip_path).namelist()
        assert f"{name}/__init__.py" in names
        assert not any("__pycache__" in n for n in names)
    assert Path(package_dirs(["rayssl"])[0]) == (REPO / "platform" / "rayssl").resolve()


def test_warns_about_node_local_stores_on_multi_node_clusters(caplog):
    from rayssl.cluster import check_shared_storage

    cfg = compose(["train.storage_path=/tmp/local_runs"])
    with caplog.at_level("WARNING", logger="rayssl"):
        check_shared_storage(cfg, 1)
        assert not caplog.records
        check_shared_storage(cfg, 3)
    text = caplog.text
    assert "MLflow server" in text and "shared" in text
