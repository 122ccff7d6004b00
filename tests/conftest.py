"""Shared fixtures: one Ray instance per pytest run, Hydra composition, data locations."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
for p in (str(REPO), str(REPO / "platform")):
    if p not in sys.path:
        sys.path.insert(0, p)

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def cifar10_dir() -> Path:
    return Path(os.environ.get("DINOV3_CIFAR10_DIR", REPO.parent / "shared" / "data" / "cifar10"))


def compose(overrides=()):
    """The same composition as experiments/*.py, validated into an ExperimentConfig."""
    from rayssl.config import compose as compose_config

    return compose_config(list(overrides))


def data_spec(**overrides):
    """A data config at the quickstart's scale (32/16 px crops, 4 locals, one actor), as the data
    tests use it; ``overrides`` are DataConfig fields."""
    from rayssl.config import DataConfig

    base = dict(global_size=32, local_size=16, n_local=4, eval_size=32, num_actors=1, map_batch_size=64,
                knn_bank_size=None, knn_query_size=None)
    return DataConfig(**{**base, **overrides})


@pytest.fixture(scope="session")
def ray_session():
    """A local 2-CPU Ray instance shared by every test that needs Ray (ray.init costs 15-30 s)."""
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        pythonpath = os.pathsep.join([str(REPO), str(REPO / "platform"), os.environ.get("PYTHONPATH", "")])
        ray.init(num_cpus=2, runtime_env={"env_vars": {"PYTHONPATH": pythonpath.rstrip(os.pathsep),
                                                       "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}},
                 logging_level="WARNING")
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def sweep_runs(client, experiment: str, n_children: int):
    """(parent, children) of the one sweep in ``experiment``; asserts the nesting."""
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == n_children, (len(parents), len(children))
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    return parents[0], children
