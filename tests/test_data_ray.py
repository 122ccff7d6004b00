"""rayssl.data Ray pipelines on tiny data (on the pytest run's shared Ray instance)."""

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from rayssl.data import (DataSpec, build_eval_datasets, build_train_dataset, ray_data_limits,  # noqa: E402
                         skip_stats, validate_source)
from rayssl.data.prepare import convert_imagefolder  # noqa: E402
from test_data_sources import make_clean_imagefolder, make_odd_imagefolder  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def ray_instance(ray_session):
    yield ray_session


def _collect(ds):
    out = {"global": [], "local": [], "epoch": []}
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k in out:
            out[k].append(b[k])
    return {k: np.concatenate(v) for k, v in out.items()}


SYN = DataSpec(synthetic_n_train=48, synthetic_n_eval=20, map_batch_size=16, n_local=3)


def test_synthetic_train_stream_shapes_order_and_determinism():
    a = _collect(build_train_dataset(SYN, seed=7, epochs=2))
    assert a["global"].shape == (96, 2, 3, 32, 32) and a["global"].dtype == np.uint8
    assert a["local"].shape == (96, 3, 3, 16, 16) and a["local"].dtype == np.uint8
    assert a["epoch"].dtype == np.int64 and a["epoch"].tolist() == [0] * 48 + [1] * 48
    b = _collect(build_train_dataset(SYN, seed=7, epochs=2))
    assert np.array_equal(a["global"], b["global"]) and np.array_equal(a["local"], b["local"])
    # resuming at epoch 1 gives exactly epoch 1 of the full run
    r = _collect(build_train_dataset(SYN, seed=7, epochs=2, start_epoch=1))
    assert r["epoch"].tolist() == [1] * 48 and np.array_equal(r["global"], a["global"][48:])
    # another seed: other crops; epochs differ from each other
    c = _collect(build_train_dataset(SYN, seed=8, epochs=1))
    assert not np.array_equal(c["global"], a["global"][:48])
    assert not np.array_equal(a["global"][:48], a["global"][48:])


def test_synthetic_eval_datasets():
    bank, query = build_eval_datasets(DataSpec(synthetic_n_train=48, synthetic_n_eval=20, eval_size=32,
                                               knn_bank_size=30))
    b, q = bank.take_batch(1000), query.take_batch(1000)
    assert b["image"].shape == (30, 3, 32, 32) and b["image"].dtype == np.uint8
    assert q["image"].shape == (20, 3, 32, 32) and q["label"].dtype == np.int64
    assert sorted(set(q["label"].tolist())) == list(range(10))


def test_imagefolder_bad_files_counted_and_others_used(tmp_path):
    root = make_odd_imagefolder(tmp_path / "odd")
    spec = DataSpec(name="imagefolder", path=str(root), map_batch_size=8, n_local=2)
    n = validate_source(spec).n_train
    a = _collect(build_train_dataset(spec, seed=0, epochs=1))
    assert len(a["epoch"]) == n == 14  # the corrupt slot is refilled: epoch length is kept
    stats = skip_stats(spec)
    assert stats["skipped"] == 1 and stats["first_bad"] == ["a/corrupt.jpg"]
    bank, query = build_eval_datasets(spec)
    assert bank.count() == 13 and query.count() == 4  # eval drops the corrupt image
    assert skip_stats(spec)["skipped"] == 1  # the same bad file is counted once


def test_parquet_train_and_eval(tmp_path):
    src = make_clean_imagefolder(tmp_path / "src")
    out = tmp_path / "pq"
    convert_imagefolder(str(src), str(out), shard_size=5, progress=False)
    spec = DataSpec(name="parquet", path=str(out), map_batch_size=8, n_local=2)
    a = _collect(build_train_dataset(spec, seed=3, epochs=2))
    assert a["epoch"].tolist() == [0] * 18 + [1] * 18
    assert a["global"].shape == (36, 2, 3, 32, 32)
    b = _collect(build_train_dataset(spec, seed=3, epochs=2))
    assert np.array_equal(a["global"], b["global"]) and np.array_equal(a["local"], b["local"])
    bank, query = build_eval_datasets(spec)
    bb, qq = bank.take_batch(100), query.take_batch(100)
    assert bb["image"].shape == (18, 3, 32, 32) and sorted(bb["label"].tolist()) == [0] * 6 + [1] * 6 + [2] * 6
    assert sorted(qq["label"].tolist()) == [0, 0, 1, 1, 2, 2]


def test_ray_data_limits():
    opts = ray_data_limits(DataSpec(max_cpus=1))
    assert opts.preserve_order and opts.resource_limits.cpu == 1
    assert ray_data_limits(DataSpec()).preserve_order


def test_parquet_flat_dir_hash_split_stream(tmp_path):
    import os

    src = make_clean_imagefolder(tmp_path / "src", n_per_class=20)
    convert_imagefolder(str(src), str(tmp_path / "pq"), shard_size=100, progress=False)
    flat = tmp_path / "flat"
    flat.mkdir()
    os.replace(tmp_path / "pq" / "train" / "part-00000.parquet", flat / "part-00000.parquet")
    spec = DataSpec(name="parquet", path=str(flat), map_batch_size=16, n_local=1)
    info = validate_source(spec)
    a = _collect(build_train_dataset(spec, seed=0, epochs=1))
    assert len(a["epoch"]) == info.n_train
    bank, query = build_eval_datasets(spec)
    assert bank.count() == info.n_train and query.count() == info.n_eval
