"""rayssl.data Ray pipelines on tiny data (on the pytest run's shared Ray instance)."""

import dataclasses

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

from conftest import data_spec  # noqa: E402
from rayssl.data import (build_knn_dataset, build_train_dataset, ray_data_limits,  # noqa: E402
                         read_concurrency, skip_stats, validate_source)
from rayssl.data.prepare import convert_imagefolder  # noqa: E402
from test_data_sources import make_clean_imagefolder, make_odd_imagefolder  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def ray_instance(ray_session):
    yield ray_session


def _knn_splits(ds):
    """(bank, query) columns of a k-NN dataset, split by its ``knn_split`` column."""
    from rayssl.data import KNN_BANK, KNN_QUERY

    rows = ds.take_batch(100_000)
    split = rows["knn_split"]
    assert set(split.tolist()) <= {KNN_BANK, KNN_QUERY}
    return tuple({k: v[split == tag] for k, v in rows.items()} for tag in (KNN_BANK, KNN_QUERY))


def _collect(ds):
    out = {"global": [], "local": [], "epoch": []}
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k in out:
            out[k].append(b[k])
    return {k: np.concatenate(v) for k, v in out.items()}


SYN = data_spec(synthetic_n_train=48, synthetic_n_eval=20, map_batch_size=16, n_local=3)


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
    knn = build_knn_dataset(data_spec(synthetic_n_train=48, synthetic_n_eval=20, eval_size=32, knn_bank_size=30))
    b, q = _knn_splits(knn)
    assert b["image"].shape == (30, 3, 32, 32) and b["image"].dtype == np.uint8
    assert q["image"].shape == (20, 3, 32, 32) and q["label"].dtype == np.int64
    assert sorted(set(q["label"].tolist())) == list(range(10))


def test_imagefolder_bad_files_counted_and_others_used(tmp_path):
    root = make_odd_imagefolder(tmp_path / "odd")
    spec = data_spec(name="imagefolder", path=str(root), map_batch_size=8, n_local=2)
    n = validate_source(spec).n_train
    a = _collect(build_train_dataset(spec, seed=0, epochs=1))
    assert len(a["epoch"]) == n == 14  # the corrupt slot is refilled: epoch length is kept
    stats = skip_stats(spec)
    assert stats["skipped"] == 1 and stats["first_bad"] == ["a/corrupt.jpg"]
    bank, query = _knn_splits(build_knn_dataset(spec))
    assert len(bank["label"]) == 13 and len(query["label"]) == 4  # eval drops the corrupt image
    assert skip_stats(spec)["skipped"] == 1  # the same bad file is counted once


def test_parquet_train_and_eval(tmp_path):
    src = make_clean_imagefolder(tmp_path / "src")
    out = tmp_path / "pq"
    convert_imagefolder(str(src), str(out), shard_size=5, progress=False)
    spec = data_spec(name="parquet", path=str(out), map_batch_size=8, n_local=2)
    a = _collect(build_train_dataset(spec, seed=3, epochs=2))
    assert a["epoch"].tolist() == [0] * 18 + [1] * 18
    assert a["global"].shape == (36, 2, 3, 32, 32)
    b = _collect(build_train_dataset(spec, seed=3, epochs=2))
    assert np.array_equal(a["global"], b["global"]) and np.array_equal(a["local"], b["local"])
    bb, qq = _knn_splits(build_knn_dataset(spec))
    assert bb["image"].shape == (18, 3, 32, 32) and sorted(bb["label"].tolist()) == [0] * 6 + [1] * 6 + [2] * 6
    assert sorted(qq["label"].tolist()) == [0, 0, 1, 1, 2, 2]


def test_ray_data_limits():
    opts = ray_data_limits(data_spec(max_cpus=1))
    assert opts.preserve_order and opts.resource_limits.cpu == 1
    # no max_cpus: capped at what the actor pool holds, the amount a trial reserves for data
    default = ray_data_limits(data_spec(num_actors=3, cpus_per_actor=0.5))
    assert default.preserve_order and default.resource_limits.cpu == 1.5


def test_read_concurrency_default_and_override():
    assert read_concurrency(data_spec(num_actors=1)) == 1
    assert read_concurrency(data_spec(num_actors=9)) == 3  # one per 4 actors, rounded up
    assert read_concurrency(data_spec(num_actors=2, read_concurrency=5)) == 5


def _max_overlap(intervals):
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    cur = best = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


def test_train_stream_reads_one_shard_at_a_time_in_map_batch_blocks(tmp_path):
    """Read tasks (0 CPUs) never run more than ``read_concurrency`` at once, every (epoch,
    shard) is one read task, and the stream's blocks hold at most one map batch of crops."""
    import time

    from ray.util.state import list_tasks

    src = make_clean_imagefolder(tmp_path / "src")
    out = tmp_path / "pq"
    convert_imagefolder(str(src), str(out), shard_size=3, progress=False)  # 18 train rows: 6 shards
    spec = data_spec(name="parquet", path=str(out), map_batch_size=4, n_local=2, num_actors=1, read_concurrency=1)
    t0_ms = time.time() * 1000
    blocks = [len(b["epoch"]) for b in build_train_dataset(spec, seed=0, epochs=2).iter_batches(batch_size=None)]
    assert sum(blocks) == 36 and max(blocks) <= 4, blocks  # default 128 MiB blocks: a task's whole output

    reads = []
    for _ in range(60):  # task events reach the state API about once a second
        reads = [t for t in list_tasks(detail=True, limit=10000, raise_on_missing_output=False)
                 if t.name.startswith("ReadParquetUnits") and (t.creation_time_ms or 0) >= t0_ms
                 and t.state == "FINISHED"]
        if len(reads) >= 12:
            break
        time.sleep(1)
    assert len(reads) == 12, [t.name for t in reads]  # 2 epochs x 6 shards, not split further
    assert _max_overlap([(t.start_time_ms, t.end_time_ms) for t in reads]) == 1


def test_parquet_rows_reshuffled_every_epoch_reproducibly(tmp_path):
    """Local shuffle: a shard's rows come in a new (seed, epoch) order each epoch."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rayssl.data.pipeline import _read_unit

    path = str(tmp_path / "part-0.parquet")
    keys = [f"k{i:03d}" for i in range(300)]
    pq.write_table(pa.table({"image": [k.encode() for k in keys], "key": keys}), path, row_group_size=64)

    def order(seed, epoch):
        tables = list(_read_unit(path, epoch, ["image", "key"], False, False, False, shuffle_seed=seed))
        assert all(t.column("epoch").to_pylist() == [epoch] * t.num_rows for t in tables)
        return [k for t in tables for k in t.column("key").to_pylist()]

    e0, e1 = order(5, 0), order(5, 1)
    assert sorted(e0) == sorted(e1) == keys  # every row once per epoch
    assert e0 != keys and e1 != keys and e0 != e1
    assert order(5, 0) == e0 and order(6, 0) != e0  # reproducible, seeded
    # eval reads (no epoch) keep the file order
    assert [k for t in _read_unit(path, None, ["key"], False, False, False, shuffle_seed=5)
            for k in t.column("key").to_pylist()] == keys


def test_all_bad_batches_keep_every_row(tmp_path):
    """A batch with no decodable image: its rows are filled from the actor's recent images,
    or, before the actor has decoded anything, carried over to its first good batch."""
    import io

    from PIL import Image

    from rayssl.data.pipeline import MultiCropWorker

    def jpeg(v):
        buf = io.BytesIO()
        Image.fromarray(np.full((40, 40, 3), v, np.uint8)).save(buf, "JPEG")
        return buf.getvalue()

    spec = data_spec(name="parquet", path=str(tmp_path), n_local=2)
    threads = torch.get_num_threads()
    w = MultiCropWorker(spec=dataclasses.asdict(spec), seed=0, start_epoch=0, n_rows=0, counter_name="rayssl_test_bad_rows")
    torch.set_num_threads(threads)  # the actor class pins its process to 1 thread; not this one

    def batch(datas, keys):
        return {"image": np.array(datas, dtype=object), "key": np.array(keys), "epoch": np.zeros(len(keys), np.int64)}

    bad = b"not an image"
    first = w(batch([bad, bad, bad], ["x0", "x1", "x2"]))  # nothing decoded yet: owed
    assert len(first["global"]) == 0
    second = w(batch([jpeg(50), jpeg(200)], ["g0", "g1"]))
    assert len(second["global"]) == 2 + 3 and second["epoch"].tolist() == [0] * 5
    third = w(batch([bad, bad], ["y0", "y1"]))  # recent good images stand in
    assert len(third["global"]) == 2 and third["global"].std() > 0
    # a stand-in's crops are seeded by the bad row's key: a different crop from the good row's
    assert not np.array_equal(second["global"][3], second["global"][0])
    assert ray.get(ray.get_actor("rayssl_test_bad_rows").stats.remote())["skipped"] == 5


def test_skips_counted_per_run(tmp_path):
    """Two runs on one source count their bad images apart (concurrent trials)."""
    root = make_odd_imagefolder(tmp_path / "odd")
    spec = data_spec(name="imagefolder", path=str(root), map_batch_size=8, n_local=1)
    a = _collect(build_train_dataset(spec, seed=0, epochs=2, run_key="run-a"))
    assert len(a["epoch"]) == 28
    assert skip_stats(spec, run_key="run-a")["events"] == 2  # the corrupt file, once per epoch
    assert skip_stats(spec, run_key="run-b") == {"skipped": 0, "events": 0, "first_bad": []}
    _collect(build_train_dataset(spec, seed=0, epochs=1, run_key="run-b"))
    assert skip_stats(spec, run_key="run-b")["events"] == 1
    assert skip_stats(spec, run_key="run-a")["events"] == 2


def test_parquet_flat_dir_hash_split_stream(tmp_path):
    import os

    src = make_clean_imagefolder(tmp_path / "src", n_per_class=20)
    convert_imagefolder(str(src), str(tmp_path / "pq"), shard_size=100, progress=False)
    flat = tmp_path / "flat"
    flat.mkdir()
    os.replace(tmp_path / "pq" / "train" / "part-00000.parquet", flat / "part-00000.parquet")
    spec = data_spec(name="parquet", path=str(flat), map_batch_size=16, n_local=1)
    info = validate_source(spec)
    a = _collect(build_train_dataset(spec, seed=0, epochs=1))
    assert len(a["epoch"]) == info.n_train
    bank, query = _knn_splits(build_knn_dataset(spec))
    assert len(bank["label"]) == info.n_train and len(query["label"]) == info.n_eval


def test_gpu_augment_stream_gives_the_cpu_stream_crops():
    """data.augment_on=gpu: the actors ship geometric crops + packed photometric parameters;
    the trainer's batched photometric ops (here on CPU tensors, per consumed batch) give
    exactly the cpu stream's crops, row for row, over two epochs."""
    from dinov3.augment import N_PHOTO_PARAMS, apply_photometric_batch
    from rayssl.data.pipeline import MultiCropWorker

    base = dict(synthetic_n_train=40, synthetic_n_eval=20, map_batch_size=16, n_local=3, blur="official",
                synthetic_image_size=48)
    cpu = _collect(build_train_dataset(data_spec(**base), seed=11, epochs=2))
    got = {"global": [], "local": [], "epoch": []}
    for b in build_train_dataset(data_spec(**base, augment_on="gpu"), seed=11, epochs=2).iter_torch_batches(
            batch_size=24):
        assert b["global_params"].dtype == torch.float32 and b["global_params"].shape[1:] == (2, N_PHOTO_PARAMS)
        assert b["local_params"].shape[1:] == (3, N_PHOTO_PARAMS) and b["global"].dtype == torch.uint8
        g, loc = apply_photometric_batch(b["global"], b["local"], b["global_params"], b["local_params"])
        got["global"].append(g.numpy())
        got["local"].append(loc.numpy())
        got["epoch"].append(b["epoch"].numpy())
    got = {k: np.concatenate(v) for k, v in got.items()}
    assert got["epoch"].tolist() == cpu["epoch"].tolist() == [0] * 40 + [1] * 40
    assert np.array_equal(got["global"], cpu["global"]) and np.array_equal(got["local"], cpu["local"])

    # an all-bad first batch: empty columns of the same dtypes and trailing shapes
    threads = torch.get_num_threads()
    w = MultiCropWorker(spec=dataclasses.asdict(data_spec(name="parquet", n_local=3, augment_on="gpu")), seed=0,
                        counter_name="rayssl_test_gpu_aug_bad_rows")
    torch.set_num_threads(threads)
    out = w({"image": np.array([b"not an image"], dtype=object), "key": np.array(["x"]),
             "epoch": np.zeros(1, np.int64)})
    assert out["global_params"].shape == (0, 2, N_PHOTO_PARAMS) and out["local_params"].dtype == np.float32
    with pytest.raises(ValueError, match="augment_on"):
        build_train_dataset(data_spec(**base, augment_on="tpu"), seed=0, epochs=1)
