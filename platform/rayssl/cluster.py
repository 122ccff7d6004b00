"""Joining an existing Ray cluster: what every worker needs to run this project.

Nodes of a cluster may never have had the project installed. ``ray job submit
--working-dir .`` ships the checkout and puts it first on the workers' PYTHONPATH,
which makes ``dinov3`` importable but not ``rayssl`` (it lives under ``platform/``,
and ``platform`` must stay a plain directory: a package of that name would shadow
the stdlib module on every worker). So the driver ships both packages as runtime_env
``py_modules`` (content-hashed zips, cached per node) and sends the resolved MLflow
tracking URI and storage path as ``env_vars``, which
:attr:`rayssl.config.ExperimentConfig.tracking_uri` / ``storage_path`` read when the
config leaves them unset. Keys the job's own runtime_env (``ray job submit
--runtime-env ...``) already sets are left to it: Ray refuses to merge conflicting keys.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

from rayssl.config import ExperimentConfig

log = logging.getLogger("rayssl")

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
STORAGE_PATH_ENV = "RAYSSL_STORAGE_PATH"
PACKAGES = ("dinov3", "rayssl")
# Set by Ray's job supervisor for a submitted job's driver: {"runtime_env": {...}, ...}.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def package_dirs(names=PACKAGES) -> List[str]:
    """Directories of the packages this driver imports (the submitted copy in a Ray job)."""
    out = []
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"cannot locate package {name!r} to ship to the Ray cluster")
        out.append(str(Path(list(spec.submodule_search_locations)[0]).resolve()))
    return out


def job_runtime_env() -> Dict[str, Any]:
    """The runtime_env of the submitted job this driver runs in ({} outside a job)."""
    raw = os.environ.get(JOB_CONFIG_ENV)
    if not raw:
        return {}
    try:
        return dict(json.loads(raw).get("runtime_env") or {})
    except (ValueError, AttributeError):
        return {}


def cluster_runtime_env(cfg: ExperimentConfig, base: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """runtime_env for ``ray.init`` when joining an existing cluster (job or ``ray.address``).

    ``base`` (e.g. ``{"env_vars": {...}}``) is extended with ``py_modules`` for ``dinov3``
    and ``rayssl`` plus the tracking URI and storage path; whatever the job's runtime_env
    already sets is dropped here so that Ray can merge the two.
    """
    env = {k: v for k, v in (base or {}).items()}
    env_vars = dict(env.get("env_vars") or {})
    env_vars.update({TRACKING_URI_ENV: cfg.tracking_uri, STORAGE_PATH_ENV: cfg.storage_path})
    env_vars.pop("PYTHONPATH", None)  # local paths mean nothing on other nodes
    env["env_vars"] = env_vars
    env["py_modules"] = package_dirs()
    env["excludes"] = ["__pycache__", "*.pyc"]

    job = job_runtime_env()
    job_vars = job.get("env_vars") or {}
    for key in list(env_vars):
        if key in job_vars:
            if str(job_vars[key]) != str(env_vars[key]):
                log.warning("job runtime_env sets %s=%s; this run resolved %s (explicit values in the "
                            "config win, the env var is only a fallback)", key, job_vars[key], env_vars[key])
            del env_vars[key]
    for key in [k for k in env if k != "env_vars" and k in job]:
        log.info("runtime_env %s comes from the job's runtime_env", key)
        del env[key]
    if "py_modules" not in env:
        env.pop("excludes", None)  # only used to package py_modules here
    return env


def check_shared_storage(cfg: ExperimentConfig, n_nodes: int) -> None:
    """Warn when a multi-node run logs or checkpoints to node-local places."""
    if n_nodes <= 1:
        return
    uri = cfg.tracking_uri
    if uri.startswith(("sqlite:", "file:")):
        log.warning("tracking URI %s is a local store on a %d-node cluster: runs logged on other nodes "
                    "write to their own disks. Use an MLflow server (tracking.uri=http://HOST:5000).",
                    uri, n_nodes)
    if "://" not in cfg.storage_path:
        log.warning("train.storage_path=%s is a local path on a %d-node cluster: it must be shared "
                    "storage mounted on every node (NFS), or use s3:// / gs://.", cfg.storage_path, n_nodes)
