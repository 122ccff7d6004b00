"""rayssl.data sources without Ray: synthetic set, ImageFolder listing, decoding, Parquet
preparation, the CIFAR-10 tarball conversion and the shared CIFAR-10 copy."""

import io
import json
import os
import pickle
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import data_spec
from rayssl.data import DataSourceError, decode_image, validate_source
from rayssl.data import synthetic
from rayssl.data.cifar10 import convert_tarball, ensure_cifar10, md5sum
from rayssl.data.prepare import convert_imagefolder
from rayssl.data import sources
from rayssl.data.sources import held_out, list_imagefolder, list_parquet, read_bytes

REPO = Path(__file__).resolve().parents[1]
CIFAR10_DIR = Path(os.environ.get("DINOV3_CIFAR10_DIR", REPO.parent / "shared" / "data" / "cifar10"))


# ---------------------------------------------------------------------------------------
# helpers (also used by test_data_ray.py)
# ---------------------------------------------------------------------------------------

def _rgb(seed, h=40, w=40):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path: Path, img: Image.Image, fmt: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)


def make_odd_imagefolder(root: Path) -> Path:
    """train/{a,b} with 4 normal JPEGs each plus one corrupt, a greyscale, an RGBA, a CMYK,
    a 16-bit PNG and an 8x8 image; test/{a,b} with 2 normal images each; a .txt (ignored)."""
    for split, n in (("train", 4), ("test", 2)):
        for ci, c in enumerate("ab"):
            for i in range(n):
                _save(root / split / c / f"rgb{i}.jpg", Image.fromarray(_rgb(100 * ci + i + (50 if split == "test" else 0))), "JPEG")
    t = root / "train"
    (t / "a" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 3)
    _save(t / "a" / "gray.png", Image.fromarray(_rgb(7)[..., 0]), "PNG")
    _save(t / "a" / "rgba.png", Image.fromarray(np.dstack([_rgb(8), np.full((40, 40), 128, np.uint8)]), "RGBA"), "PNG")
    _save(t / "b" / "cmyk.jpg", Image.fromarray(_rgb(9)).convert("CMYK"), "JPEG")
    _save(t / "b" / "sixteen.png", Image.fromarray((np.arange(1600, dtype=np.uint16).reshape(40, 40) * 40)), "PNG")
    _save(t / "b" / "tiny.png", Image.fromarray(_rgb(10, 8, 8)), "PNG")
    (t / "b" / "notes.txt").write_text("not an image")
    return root


def make_clean_imagefolder(root: Path, n_per_class=6, classes="abc", size=24) -> Path:
    for split, n in (("train", n_per_class), ("val", 2)):
        for ci, c in enumerate(classes):
            for i in range(n):
                arr = _rgb(1000 * ci + i + (500 if split == "val" else 0), size, size)
                _save(root / split / c / f"{i:03d}.jpg", Image.fromarray(arr), "JPEG")
    return root


def make_fake_cifar_tarball(path: Path, n_per_batch=4, n_test=6) -> Path:
    rng = np.random.default_rng(0)
    members = {}
    for i in range(1, 6):
        members[f"data_batch_{i}"] = {b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                                      b"labels": [int(x) for x in rng.integers(0, 10, n_per_batch)]}
    members["test_batch"] = {b"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8),
                             b"labels": [int(x) for x in rng.integers(0, 10, n_test)]}
    members["batches.meta"] = {b"label_names": [c.encode() for c in
                                                ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                                 "horse", "ship", "truck"]]}
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in members.items():
            data = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# ---------------------------------------------------------------------------------------
# synthetic
# ---------------------------------------------------------------------------------------

def test_synthetic_deterministic_and_balanced():
    a = [synthetic.render_index(3, "train", i, 32) for i in range(40)]
    b = [synthetic.render_index(3, "train", i, 32) for i in range(40)]
    c = [synthetic.render_index(4, "train", i, 32) for i in range(40)]
    e = [synthetic.render_index(3, "eval", i, 32) for i in range(40)]
    assert all(np.array_equal(x[0], y[0]) for x, y in zip(a, b))
    assert not any(np.array_equal(x[0], y[0]) for x, y in zip(a, c))
    assert not any(np.array_equal(x[0], y[0]) for x, y in zip(a, e))
    t = synthetic.synthetic_table(3, "train", 200, 32)
    assert t.num_rows == 200 and t.column_names == ["image", "label", "key"]
    counts = np.bincount(t.column("label").to_numpy(), minlength=10)
    assert (counts == 20).all()
    img = decode_image(t.column("image")[0].as_py())
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert np.array_equal(img, a[0][0]) or synthetic.render_index(3, "train", 0, 32)[1] == 0
    assert len(set(t.column("key").to_pylist())) == 200


def test_synthetic_colour_does_not_give_the_class():
    # mean image colour per class is about the same: colour alone cannot separate classes
    t = synthetic.synthetic_table(0, "train", 1000, 32)
    imgs = np.stack([decode_image(b) for b in t.column("image").to_pylist()]).astype(np.float32)
    labels = t.column("label").to_numpy()
    means = np.stack([imgs[labels == k].mean(axis=(0, 1, 2)) for k in range(10)])
    assert np.ptp(means, axis=0).max() < 25  # out of 255


def test_validate_synthetic():
    info = validate_source(data_spec(synthetic_n_train=100, synthetic_n_eval=20))
    assert (info.n_train, info.n_eval, len(info.class_names)) == (100, 20, 10)


# ---------------------------------------------------------------------------------------
# missing / empty sources
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["imagefolder", "parquet"])
def test_missing_path_names_it(tmp_path, name):
    missing = str(tmp_path / "nowhere" / "data")
    with pytest.raises(DataSourceError, match="nowhere/data"):
        validate_source(data_spec(name=name, path=missing))


@pytest.mark.parametrize("name", ["imagefolder", "parquet"])
def test_empty_dir_names_it(tmp_path, name):
    (tmp_path / "empty" / "train" / "cls").mkdir(parents=True)
    with pytest.raises(DataSourceError, match=str(tmp_path / "empty")):
        validate_source(data_spec(name=name, path=str(tmp_path / "empty")))


def test_missing_path_raises_before_ray():
    # In a fresh interpreter: this pytest run's shared Ray instance may already be up.
    code = (
        "import ray\n"
        "from rayssl.config import DataConfig\n"
        "from rayssl.data import DataSourceError, build_train_dataset\n"
        "try:\n"
        "    build_train_dataset(DataConfig(name='imagefolder', path='/no/such/dir'), seed=0, epochs=1)\n"
        "except DataSourceError as err:\n"
        "    assert '/no/such/dir' in str(err), err\n"
        "else:\n"
        "    raise SystemExit('no DataSourceError')\n"
        "assert not ray.is_initialized(), 'Ray was started'\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "platform")])})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------
# ImageFolder listing and decoding of odd files
# ---------------------------------------------------------------------------------------

def test_imagefolder_listing(tmp_path):
    root = make_odd_imagefolder(tmp_path / "odd")
    info = validate_source(data_spec(name="imagefolder", path=str(root)))
    assert info.class_names == ["a", "b"]
    assert info.n_train == 4 * 2 + 6 and info.n_eval == 4  # notes.txt is not listed
    lst = list_imagefolder(str(root))
    assert "a/corrupt.jpg" in lst.train.keys and not any(k.endswith(".txt") for k in lst.train.keys)


def test_imagefolder_without_eval_split_holds_out_deterministically(tmp_path):
    root = tmp_path / "flat"
    for c in "ab":
        for i in range(40):
            _save(root / c / f"{i}.png", Image.fromarray(_rgb(i, 8, 8)), "PNG")
    lst = list_imagefolder(str(root))
    assert len(lst.train) + len(lst.eval) == 80 and 0 < len(lst.eval) < 20
    assert not set(lst.train.keys) & set(lst.eval.keys)
    list_imagefolder.cache_clear()
    assert list_imagefolder(str(root)).eval.keys == lst.eval.keys


def test_decode_odd_formats(tmp_path):
    root = make_odd_imagefolder(tmp_path / "odd")
    t = root / "train"
    for rel in ("a/gray.png", "a/rgba.png", "b/cmyk.jpg", "b/sixteen.png", "b/tiny.png", "a/rgb0.jpg"):
        arr = decode_image((t / rel).read_bytes())
        assert arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype == np.uint8, rel
    assert decode_image((t / "b/tiny.png").read_bytes()).shape == (8, 8, 3)
    six = decode_image((t / "b/sixteen.png").read_bytes())
    assert six.max() > 200 and six.min() < 10  # scaled from 16 bits, not clipped to white
    for bad in (b"", b"\xff\xd8\xff\xe0 garbage", b"GIF89a\x00", (t / "a/rgb0.jpg").read_bytes()[:100]):
        with pytest.raises(Exception):
            decode_image(bad)


# ---------------------------------------------------------------------------------------
# prepare_data -> Parquet round trip
# ---------------------------------------------------------------------------------------

def test_prepare_parquet_round_trip(tmp_path):
    import pyarrow.parquet as pq

    src = make_clean_imagefolder(tmp_path / "src")
    out = tmp_path / "pq"
    man = convert_imagefolder(str(src), str(out), shard_size=7, progress=False)
    assert man["splits"]["train"]["rows"] == 18 and man["splits"]["val"]["rows"] == 6
    assert len(man["splits"]["train"]["shards"]) == 3
    assert json.loads((out / "classes.json").read_text()) == ["a", "b", "c"]
    # same images, same labels, byte for byte (JPEG sources are copied)
    lst = list_imagefolder(str(src))
    want = {k: (Path(p).read_bytes(), y) for k, p, y in zip(lst.train.keys, lst.train.paths, lst.train.labels)}
    table = pq.read_table(str(out / "train"))
    got = {k: (im, y) for k, im, y in zip(table.column("key").to_pylist(), table.column("image").to_pylist(),
                                           table.column("label").to_pylist())}
    assert got == want
    assert table.column("label").to_pylist() != sorted(table.column("label").to_pylist())  # shuffled rows
    info = validate_source(data_spec(name="parquet", path=str(out)))
    assert (info.n_train, info.n_eval, info.class_names) == (18, 6, ["a", "b", "c"])
    # idempotent: second run skips; a changed parameter rewrites
    assert convert_imagefolder(str(src), str(out), shard_size=7, progress=False).get("skipped_existing")
    man2 = convert_imagefolder(str(src), str(out), shard_size=7, resize=16, progress=False)
    assert not man2.get("skipped_existing")
    assert decode_image(pq.read_table(str(out / "train")).column("image")[0].as_py()).shape[:2] == (16, 16)


def test_prepare_rewrites_when_a_file_is_replaced_under_its_name(tmp_path):
    import pyarrow.parquet as pq

    src = make_clean_imagefolder(tmp_path / "src")
    out = tmp_path / "pq"
    convert_imagefolder(str(src), str(out), shard_size=7, progress=False)
    assert convert_imagefolder(str(src), str(out), shard_size=7, progress=False).get("skipped_existing")
    new = src / "train" / "b" / "002.jpg"
    _save(new, Image.fromarray(_rgb(77, 30, 20)), "JPEG")  # same name, other image
    man = convert_imagefolder(str(src), str(out), shard_size=7, progress=False)
    assert not man.get("skipped_existing")
    table = pq.read_table(str(out / "train"))
    row = table.column("key").to_pylist().index("b/002.jpg")
    assert table.column("image")[row].as_py() == new.read_bytes()


def test_prepare_progress_counts_skipped_rows():
    from rayssl.data.prepare import _count_skips

    calls, counter = [], {"skipped": 0, "bad": []}
    rows = [(b"x", 0, "a/1"), (None, 0, "a/2"), (b"y", 1, "b/1"), (None, 1, "b/2"), (None, 1, "b/3")]
    kept = list(_count_skips(iter(rows), counter, lambda n, skipped=0: calls.append((n, skipped))))
    assert [r[2] for r in kept] == ["a/1", "b/1"]
    assert counter == {"skipped": 3, "bad": ["a/2", "b/2", "b/3"]}
    assert sum(n for n, _ in calls) == len(rows) and calls[-1] == (1, 3)


def test_uri_join_keeps_filesystem_options_last():
    q = "region=us-east-1&endpoint_override=localhost:9"
    assert sources._join(f"s3://bkt/data?{q}", "train", "a b.jpg") == f"s3://bkt/data/train/a b.jpg?{q}"
    assert sources._join("s3://bkt/data/", "val") == "s3://bkt/data/val"
    assert sources.basename(f"s3://bkt/data/val?{q}") == "val" and sources.basename("/x/val/") == "val"
    assert sources._split_uri(sources._join(f"s3://bkt/data?{q}", "train")) == ("s3", "bkt", "data/train", q)


def test_prepare_skips_corrupt(tmp_path):
    src = make_odd_imagefolder(tmp_path / "odd")
    man = convert_imagefolder(str(src), str(tmp_path / "pq"), shard_size=100, progress=False)
    assert man["splits"]["train"]["skipped"] == 1 and man["splits"]["train"]["first_bad"] == ["a/corrupt.jpg"]
    assert man["splits"]["train"]["rows"] == 13


def test_parquet_flat_dir_hash_split(tmp_path):
    src = make_clean_imagefolder(tmp_path / "src", n_per_class=20)
    convert_imagefolder(str(src), str(tmp_path / "pq"), shard_size=100, progress=False)
    flat = tmp_path / "flat"
    flat.mkdir()
    os.replace(tmp_path / "pq" / "train" / "part-00000.parquet", flat / "part-00000.parquet")
    lst = list_parquet(str(flat))
    assert lst.hash_split and lst.n_train + lst.n_eval == 60 and 0 < lst.n_eval < 20


# ---------------------------------------------------------------------------------------
# URIs: one filesystem per bucket, not per file
# ---------------------------------------------------------------------------------------

def _jpeg(seed) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_rgb(seed, 16, 16)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def count_resolves(monkeypatch):
    """Fresh filesystem cache; counts calls to the (real) resolver per key."""
    calls = {}
    real = sources._resolve_filesystem

    def counting(scheme, netloc, query):
        calls[(scheme, netloc, query)] = calls.get((scheme, netloc, query), 0) + 1
        return real(scheme, netloc, query)

    monkeypatch.setattr(sources, "_FS_CACHE", {})
    monkeypatch.setattr(sources, "_resolve_filesystem", counting)
    return calls


@pytest.fixture
def memfs():
    import uuid

    import fsspec

    fs = fsspec.filesystem("memory")
    tag = uuid.uuid4().hex[:8]
    buckets = [f"bucket-a-{tag}", f"bucket-b-{tag}"]
    yield fs, buckets
    for b in buckets:
        if fs.exists(f"/{b}"):
            fs.rm(f"/{b}", recursive=True)


def test_memory_uri_filesystem_resolved_once_per_bucket(memfs, count_resolves):
    """ImageFolder in one memory:// bucket, Parquet in another, listed and read through the
    public functions (also from threads): one resolution per bucket, bytes as written."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, (ba, bb) = memfs
    written = {}
    for split, n in (("train", 5), ("val", 2)):
        for ci, c in enumerate(("cat", "dog")):
            for i in range(n):
                data = _jpeg(100 * ci + i + (50 if split == "val" else 0))
                fs.pipe(f"/{ba}/ds/{split}/{c}/img {i}.jpg", data)  # a space: read as listed
                written[f"memory://{ba}/ds/{split}/{c}/img {i}.jpg"] = data
    fs.pipe(f"/{ba}/ds/train/cat/readme.txt", b"not an image")
    root = f"memory://{ba}/ds"
    info = validate_source(data_spec(name="imagefolder", path=root))
    assert (info.n_train, info.n_eval, info.class_names) == (10, 4, ["cat", "dog"])
    lst = list_imagefolder(root)
    paths = lst.train.paths + lst.eval.paths
    assert sorted(paths) == sorted(written)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(read_bytes, paths))
    assert got == [written[p] for p in paths]
    assert decode_image(got[0]).shape == (16, 16, 3)

    for split, n in (("train", 7), ("val", 3)):
        t = pa.table({"image": [_jpeg(i) for i in range(n)], "label": [i % 2 for i in range(n)],
                      "key": [f"{split}/{i}" for i in range(n)]})
        buf = io.BytesIO()
        pq.write_table(t, buf)
        fs.pipe(f"/{bb}/pq/{split}/part-00000.parquet", buf.getvalue())
    fs.pipe(f"/{bb}/pq/classes.json", json.dumps(["cat", "dog"]).encode())
    info = validate_source(data_spec(name="parquet", path=f"memory://{bb}/pq"))
    assert (info.n_train, info.n_eval, info.class_names) == (7, 3, ["cat", "dog"])
    assert list_parquet(f"memory://{bb}/pq").eval_files == (f"memory://{bb}/pq/val/part-00000.parquet",)
    assert read_bytes(f"memory://{bb}/pq/classes.json") == json.dumps(["cat", "dog"]).encode()

    assert count_resolves == {("memory", ba, ""): 1, ("memory", bb, ""): 1}


def test_pyarrow_uri_filesystem_cached_per_bucket(count_resolves):
    """pyarrow's mock:// filesystem (a new, empty one per FileSystem.from_uri call, and a path
    without the host): files written through one bucket's filesystem are listed and read
    back, so listing and reading reuse it; another bucket gets its own."""
    import pyarrow.fs as pafs

    written = {}
    for bucket, n in (("one", 3), ("two", 2)):
        fs, inner = sources._filesystem(f"mock://{bucket}/")
        assert isinstance(fs, pafs._MockFileSystem) and inner == ""
        for split in ("train", "test"):
            for c in "ab":
                fs.create_dir(f"ds/{split}/{c}", recursive=True)
                for i in range(n):
                    data = _jpeg(len(written))
                    with fs.open_output_stream(f"ds/{split}/{c}/{i}.jpg") as f:
                        f.write(data)
                    written[f"mock://{bucket}/ds/{split}/{c}/{i}.jpg"] = data
    for bucket, n in (("one", 3), ("two", 2)):
        info = validate_source(data_spec(name="imagefolder", path=f"mock://{bucket}/ds"))
        assert (info.n_train, info.n_eval) == (2 * n, 2 * n)
        lst = list_imagefolder(f"mock://{bucket}/ds")
        for p in lst.train.paths + lst.eval.paths:
            assert read_bytes(p) == written[p]
    assert count_resolves == {("mock", "one", ""): 1, ("mock", "two", ""): 1}


def test_uri_paths_derived_without_reparsing(count_resolves):
    """Path inside the filesystem from the URI: bucket kept, %XX decoded only in a valid URI
    path (as FileSystem.from_uri does), raw names (spaces) kept; query = filesystem options."""
    pafs = pytest.importorskip("pyarrow.fs")
    if not hasattr(pafs, "S3FileSystem"):
        pytest.skip("pyarrow built without S3")
    q = "region=us-east-1&endpoint_override=localhost:9"  # no region lookup, nothing contacted
    got = [sources._filesystem(f"s3://bkt/{p}?{q}")[1] for p in ("a/b c.jpg", "my%20data/x.jpg", "", "d/")]
    assert got == ["bkt/a/b c.jpg", "bkt/my data/x.jpg", "bkt", "bkt/d"]
    assert count_resolves == {("s3", "bkt", q): 1}


# ---------------------------------------------------------------------------------------
# empty eval splits fail validation (the k-NN evaluation would crash after Ray started)
# ---------------------------------------------------------------------------------------

def test_synthetic_without_eval_images():
    with pytest.raises(DataSourceError, match="synthetic_n_eval=0"):
        validate_source(data_spec(synthetic_n_train=10, synthetic_n_eval=0))


@pytest.mark.parametrize("name", ["val", "test", "validation"])
def test_imagefolder_empty_eval_dir_names_it(tmp_path, name):
    root = make_clean_imagefolder(tmp_path / "src", n_per_class=2)
    os.rename(root / "val", root / "gone")
    (root / name / "a").mkdir(parents=True)
    (root / name / "b" / "notes.txt").parent.mkdir()
    (root / name / "b" / "notes.txt").write_text("not an image")
    with pytest.raises(DataSourceError, match=re.escape(f"eval split {root / name} holds no images")) as err:
        validate_source(data_spec(name="imagefolder", path=str(root)))
    assert "remove that folder" in str(err.value) and "hash" in str(err.value)


def test_imagefolder_eval_dir_of_other_classes(tmp_path):
    root = make_clean_imagefolder(tmp_path / "src", n_per_class=2, classes="ab")
    os.rename(root / "val" / "a", root / "val" / "x")
    os.rename(root / "val" / "b", root / "val" / "y")
    with pytest.raises(DataSourceError, match=re.escape(str(root / "val"))) as err:
        validate_source(data_spec(name="imagefolder", path=str(root)))
    assert "x, y are not in" in str(err.value)


def _names_held(held: bool, n: int, cls: str, ext: str = ".png"):
    out = [f"{i}{ext}" for i in range(1000) if held_out(f"{cls}/{i}{ext}") == held]
    return out[:n]


def test_imagefolder_hash_split_holding_out_nothing(tmp_path):
    root = tmp_path / "flat"
    for c in "ab":
        for i, f in enumerate(_names_held(False, 3, c)):
            _save(root / c / f, Image.fromarray(_rgb(i, 8, 8)), "PNG")
    with pytest.raises(DataSourceError, match=re.escape(str(root))) as err:
        validate_source(data_spec(name="imagefolder", path=str(root)))
    assert "held out none of the 6 images" in str(err.value) and str(root / "val") in str(err.value)


def test_imagefolder_hash_split_holding_out_everything(tmp_path):
    root = tmp_path / "flat"
    for i, f in enumerate(_names_held(True, 2, "a")):
        _save(root / "a" / f, Image.fromarray(_rgb(i, 8, 8)), "PNG")
    with pytest.raises(DataSourceError, match="held out all 2 images"):
        validate_source(data_spec(name="imagefolder", path=str(root)))


def test_memory_uri_empty_eval_dir_names_it(memfs, count_resolves):
    fs, (ba, _) = memfs
    fs.pipe(f"/{ba}/ds/train/a/0.jpg", _jpeg(0))
    fs.mkdir(f"/{ba}/ds/val/a")
    fs.pipe(f"/{ba}/ds/val/a/.hidden.jpg", _jpeg(1))
    with pytest.raises(DataSourceError, match=re.escape(f"eval split memory://{ba}/ds/val holds no images")):
        validate_source(data_spec(name="imagefolder", path=f"memory://{ba}/ds"))


def _prepared_parquet(tmp_path) -> Path:
    out = tmp_path / "pq"
    convert_imagefolder(str(make_clean_imagefolder(tmp_path / "src", n_per_class=2)), str(out), progress=False)
    assert validate_source(data_spec(name="parquet", path=str(out))).n_eval == 6
    list_parquet.cache_clear()
    return out


def test_parquet_eval_dir_without_shards_names_it(tmp_path):
    out = _prepared_parquet(tmp_path)
    for f in (out / "val").iterdir():
        f.unlink()
    with pytest.raises(DataSourceError, match=re.escape(f"eval split {out / 'val'} holds no .parquet shards")):
        validate_source(data_spec(name="parquet", path=str(out)))


def test_parquet_eval_shards_without_rows_names_them(tmp_path):
    import pyarrow.parquet as pq

    out = _prepared_parquet(tmp_path)
    for f in (out / "val").iterdir():
        pq.write_table(pq.read_table(f).slice(0, 0), f)
    with pytest.raises(DataSourceError, match=re.escape(f"eval split {out / 'val'} holds .parquet shards with no rows")):
        validate_source(data_spec(name="parquet", path=str(out)))


def test_parquet_hash_split_holding_out_nothing(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    flat = tmp_path / "flat"
    flat.mkdir()
    keys = [k for k in (f"k{i}" for i in range(100)) if not held_out(k)][:4]
    pq.write_table(pa.table({"image": [_jpeg(i) for i in range(4)], "key": keys}), flat / "part-00000.parquet")
    with pytest.raises(DataSourceError, match=re.escape(str(flat))) as err:
        validate_source(data_spec(name="parquet", path=str(flat)))
    assert "held out none of the 4 rows" in str(err.value) and str(flat / "val") in str(err.value)


# ---------------------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------------------

def test_cifar10_tarball_conversion(tmp_path):
    import pyarrow.parquet as pq

    tarball = make_fake_cifar_tarball(tmp_path / "cifar-10-python.tar.gz")
    out = tmp_path / "cifar"
    man = convert_tarball(str(tarball), str(out), shard_size=8, progress=False)
    assert man["splits"]["train"]["rows"] == 20 and man["splits"]["test"]["rows"] == 6
    info = validate_source(data_spec(name="parquet", path=str(out)))
    assert (info.n_train, info.n_eval) == (20, 6) and info.class_names[0] == "airplane"
    # JPEG bytes (quality 95) of the right pixels, and the labels
    with tarfile.open(tarball) as tar:
        d = pickle.load(tar.extractfile("cifar-10-batches-py/data_batch_2"), encoding="bytes")
    t = pq.read_table(str(out / "train"))
    row = t.column("key").to_pylist().index("train/00005")  # batch 2, image 1
    data = t.column("image")[row].as_py()
    assert data[:3] == b"\xff\xd8\xff"  # JPEG SOI marker
    pixels = d[b"data"][1].reshape(3, 32, 32).transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95)
    assert np.array_equal(decode_image(data), decode_image(buf.getvalue()))
    assert t.column("label")[row].as_py() == d[b"labels"][1]


def test_cifar10_download_checks_md5(tmp_path):
    tarball = make_fake_cifar_tarball(tmp_path / "fake.tar.gz")
    url = tarball.as_uri()
    with pytest.raises(DataSourceError, match="md5"):
        ensure_cifar10(str(tmp_path / "bad"), url=url, md5="0" * 32)
    assert not (tmp_path / "bad" / "cifar-10-python.tar.gz").exists()
    out = ensure_cifar10(str(tmp_path / "good"), url=url, md5=md5sum(str(tarball)))
    info = validate_source(data_spec(name="cifar10", path=out))
    assert (info.n_train, info.n_eval) == (20, 6)
    assert ensure_cifar10(str(tmp_path / "good"), url="http://unreachable.invalid/x", md5="0") == out  # cached


@pytest.mark.skipif(not (CIFAR10_DIR / "train").is_dir(),
                    reason=f"shared CIFAR-10 ImageFolder not found at {CIFAR10_DIR} (set DINOV3_CIFAR10_DIR)")
def test_shared_cifar10_counts():
    info = validate_source(data_spec(name="imagefolder", path=str(CIFAR10_DIR)))
    assert (info.n_train, info.n_eval) == (50000, 10000)
    assert info.class_names == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                "ship", "truck"]
