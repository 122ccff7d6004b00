"""rayssl.data sources without Ray: synthetic set, ImageFolder listing, decoding, Parquet
preparation, the CIFAR-10 tarball conversion and the shared CIFAR-10 copy."""

import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rayssl.data import DataSourceError, DataSpec, decode_image, validate_source
from rayssl.data import synthetic
from rayssl.data.cifar10 import convert_tarball, ensure_cifar10, md5sum
from rayssl.data.prepare import convert_imagefolder
from rayssl.data.sources import list_imagefolder, list_parquet

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
    info = validate_source(DataSpec(synthetic_n_train=100, synthetic_n_eval=20))
    assert (info.n_train, info.n_eval, len(info.class_names)) == (100, 20, 10)


# ---------------------------------------------------------------------------------------
# missing / empty sources
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["imagefolder", "parquet"])
def test_missing_path_names_it(tmp_path, name):
    missing = str(tmp_path / "nowhere" / "data")
    with pytest.raises(DataSourceError, match="nowhere/data"):
        validate_source(DataSpec(name=name, path=missing))


@pytest.mark.parametrize("name", ["imagefolder", "parquet"])
def test_empty_dir_names_it(tmp_path, name):
    (tmp_path / "empty" / "train" / "cls").mkdir(parents=True)
    with pytest.raises(DataSourceError, match=str(tmp_path / "empty")):
        validate_source(DataSpec(name=name, path=str(tmp_path / "empty")))


def test_missing_path_raises_before_ray():
    # In a fresh interpreter: this pytest run's shared Ray instance may already be up.
    code = (
        "import ray\n"
        "from rayssl.data import DataSourceError, DataSpec, build_train_dataset\n"
        "try:\n"
        "    build_train_dataset(DataSpec(name='imagefolder', path='/no/such/dir'), seed=0, epochs=1)\n"
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
    info = validate_source(DataSpec(name="imagefolder", path=str(root)))
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
    info = validate_source(DataSpec(name="parquet", path=str(out)))
    assert (info.n_train, info.n_eval, info.class_names) == (18, 6, ["a", "b", "c"])
    # idempotent: second run skips; a changed parameter rewrites
    assert convert_imagefolder(str(src), str(out), shard_size=7, progress=False).get("skipped_existing")
    man2 = convert_imagefolder(str(src), str(out), shard_size=7, resize=16, progress=False)
    assert not man2.get("skipped_existing")
    assert decode_image(pq.read_table(str(out / "train")).column("image")[0].as_py()).shape[:2] == (16, 16)


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
# CIFAR-10
# ---------------------------------------------------------------------------------------

def test_cifar10_tarball_conversion(tmp_path):
    import pyarrow.parquet as pq

    tarball = make_fake_cifar_tarball(tmp_path / "cifar-10-python.tar.gz")
    out = tmp_path / "cifar"
    man = convert_tarball(str(tarball), str(out), shard_size=8, progress=False)
    assert man["splits"]["train"]["rows"] == 20 and man["splits"]["test"]["rows"] == 6
    info = validate_source(DataSpec(name="parquet", path=str(out)))
    assert (info.n_train, info.n_eval) == (20, 6) and info.class_names[0] == "airplane"
    # pixels and labels survive (PNG is lossless)
    with tarfile.open(tarball) as tar:
        d = pickle.load(tar.extractfile("cifar-10-batches-py/data_batch_2"), encoding="bytes")
    t = pq.read_table(str(out / "train"))
    row = t.column("key").to_pylist().index("train/00005")  # batch 2, image 1
    img = decode_image(t.column("image")[row].as_py())
    assert np.array_equal(img, d[b"data"][1].reshape(3, 32, 32).transpose(1, 2, 0))
    assert t.column("label")[row].as_py() == d[b"labels"][1]


def test_cifar10_download_checks_md5(tmp_path):
    tarball = make_fake_cifar_tarball(tmp_path / "fake.tar.gz")
    url = tarball.as_uri()
    with pytest.raises(DataSourceError, match="md5"):
        ensure_cifar10(str(tmp_path / "bad"), url=url, md5="0" * 32)
    assert not (tmp_path / "bad" / "cifar-10-python.tar.gz").exists()
    out = ensure_cifar10(str(tmp_path / "good"), url=url, md5=md5sum(str(tarball)))
    info = validate_source(DataSpec(name="cifar10", path=out))
    assert (info.n_train, info.n_eval) == (20, 6)
    assert ensure_cifar10(str(tmp_path / "good"), url="http://unreachable.invalid/x", md5="0") == out  # cached


@pytest.mark.skipif(not (CIFAR10_DIR / "train").is_dir(),
                    reason=f"shared CIFAR-10 ImageFolder not found at {CIFAR10_DIR} (set DINOV3_CIFAR10_DIR)")
def test_shared_cifar10_counts():
    info = validate_source(DataSpec(name="imagefolder", path=str(CIFAR10_DIR)))
    assert (info.n_train, info.n_eval) == (50000, 10000)
    assert info.class_names == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                "ship", "truck"]
