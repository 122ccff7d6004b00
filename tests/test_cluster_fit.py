"""A trial that can never fit the live Ray instance fails at once naming the keys and the
cluster's total, in a real sweep and in plan=true alike: never a sweep waiting in PENDING."""

import time

import pytest

from conftest import compose

pytestmark = pytest.mark.slow


def _cfg(tmp_path, *extra):
    return compose(["model=micro", f"tracking.uri=sqlite:///{tmp_path}/m.db", f"train.storage_path={tmp_path}/runs",
                    *extra])


def test_sweep_whose_trial_cannot_fit_fails_naming_the_keys(ray_session, tmp_path):
    from rayssl.config import ConfigError
    from rayssl.sweep import run_sweep

    too_many_cpus = _cfg(tmp_path, "train.num_workers=3", "train.cpus_per_worker=1", "train.global_batch_size=48")
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"train\.num_workers=3 x train\.cpus_per_worker=1 \+ data\.num_actors=1 x "
                                          r"data\.cpus_per_actor=0\.5 needs 3\.5 CPUs per trial; the Ray cluster "
                                          r"has 2 in total"):
        run_sweep(too_many_cpus)
    assert time.monotonic() - start < 60
    assert not (tmp_path / "m.db").exists()  # failed before any MLflow run was made

    gpus = _cfg(tmp_path, "train.use_gpu=true")
    with pytest.raises(ConfigError, match=r"train\.num_workers=1 x train\.gpus_per_worker=1 needs 1 GPUs per "
                                          r"trial; the Ray cluster has 0 in total"):
        run_sweep(gpus)


def test_plan_reads_the_live_cluster(ray_session, tmp_path):
    from rayssl.plan import make_plan

    fits = make_plan(_cfg(tmp_path, "ray.address=auto", "train.num_workers=1", "train.cpus_per_worker=0.5"), "sweep")
    assert not fits.errors and fits.numbers["concurrent_trials"] == 2  # 2 CPUs / (0.5 + 0.5)
    assert "live cluster at auto: 2 CPUs, 0 GPUs" in fits.render()
    no_fit = make_plan(_cfg(tmp_path, "ray.address=auto", "train.num_workers=3", "train.cpus_per_worker=1",
                            "train.global_batch_size=48"), "sweep")
    assert any("needs 3.5 CPUs per trial; live cluster at auto has 2 in total" in e for e in no_fit.errors), \
        no_fit.errors
