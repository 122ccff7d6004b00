"""CIFAR-10 from the official python tarball: download (md5-checked), cache, convert to Parquet.

``ensure_cifar10(dir)`` leaves ``dir/{train,test}/*.parquet`` (JPEG bytes, quality 95, as
prepare_data writes any ImageFolder),
``dir/classes.json`` and ``dir/manifest.json``; the tarball is kept in ``dir`` so a
re-conversion needs no network. Nothing happens when the manifest is already complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tarfile
import urllib.request
from typing import Dict, Iterator, Optional, Tuple

import numpy as np

from rayssl.data.prepare import JPEG_QUALITY, MANIFEST, encode_jpeg, manifest_ok, write_dataset
from rayssl.data.spec import DataSourceError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
TARBALL = "cifar-10-python.tar.gz"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"


def md5sum(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: str, md5: Optional[str], timeout: float = 60.0) -> str:
    """Download url to dest (atomic rename) and verify md5; a cached file with the right md5 is reused."""
    if os.path.exists(dest) and (md5 is None or md5sum(dest) == md5):
        return dest
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    tmp = dest + ".part"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            while True:
                chunk = r.read(1 << 20)
                if not chunk:
                    break
                f.write(chunk)
    except OSError as err:
        raise DataSourceError(f"could not download {url} to {dest}: {err}") from err
    got = md5sum(tmp)
    if md5 is not None and got != md5:
        os.remove(tmp)
        raise DataSourceError(f"{url}: md5 {got} != expected {md5} (corrupt or changed download)")
    os.replace(tmp, dest)
    return dest


def _members(tar: tarfile.TarFile) -> Dict[str, tarfile.TarInfo]:
    return {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}


def _load_batch(tar: tarfile.TarFile, member: tarfile.TarInfo) -> Tuple[np.ndarray, np.ndarray]:
    d = pickle.load(tar.extractfile(member), encoding="bytes")
    data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = np.asarray(d.get(b"labels", d.get(b"fine_labels")), dtype=np.int64)
    return data, labels


def convert_tarball(tarball: str, output: str, shard_size: int = 10000, progress: bool = True,
                    seed: int = 0, force: bool = False) -> Dict:
    """CIFAR-10 python tarball -> Parquet dataset (train/test) under output; returns the manifest."""
    params = {"source": "cifar10", "tarball_md5": md5sum(tarball), "shard_size": int(shard_size),
              "seed": int(seed), "format": "jpeg", "jpeg_quality": JPEG_QUALITY}
    if not force and manifest_ok(output, params):
        with open(os.path.join(output, MANIFEST)) as f:
            return json.load(f)
    with tarfile.open(tarball, "r:gz") as tar:
        members = _members(tar)
        missing = [n for n in TRAIN_BATCHES + (TEST_BATCH, "batches.meta") if n not in members]
        if missing:
            raise DataSourceError(f"{tarball}: not a CIFAR-10 python tarball (missing {missing})")
        meta = pickle.load(tar.extractfile(members["batches.meta"]), encoding="bytes")
        class_names = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[b"label_names"]]
        train = [_load_batch(tar, members[n]) for n in TRAIN_BATCHES]
        test = _load_batch(tar, members[TEST_BATCH])
    train_x = np.concatenate([t[0] for t in train])
    train_y = np.concatenate([t[1] for t in train])

    def rows(x: np.ndarray, y: np.ndarray, split: str, split_seed: int) -> Iterator:
        order = np.random.default_rng([seed, split_seed]).permutation(len(x))
        for i in order:
            yield encode_jpeg(x[i]), int(y[i]), f"{split}/{i:05d}"

    splits = {"train": (len(train_x), rows(train_x, train_y, "train", 0)),
              "test": (len(test[0]), rows(test[0], test[1], "test", 1))}
    return write_dataset(output, splits, class_names, params, shard_size, progress)


def is_prepared(cache_dir: str) -> bool:
    """Whether ``cache_dir`` already holds the converted CIFAR-10 (its manifest says so)."""
    man = os.path.join(os.path.abspath(os.path.expanduser(cache_dir)), MANIFEST)
    try:
        with open(man) as f:
            return json.load(f).get("params", {}).get("source") == "cifar10"
    except (OSError, ValueError):
        return False


def ensure_cifar10(cache_dir: str, shard_size: int = 10000, progress: bool = False, force: bool = False,
                   url: str = CIFAR10_URL, md5: str = CIFAR10_MD5) -> str:
    """Parquet directory of CIFAR-10 under cache_dir, downloading/converting when needed."""
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
    if not force and is_prepared(cache_dir):
        return cache_dir
    tarball = download(url, os.path.join(cache_dir, TARBALL), md5)
    convert_tarball(tarball, cache_dir, shard_size=shard_size, progress=progress, force=force)
    return cache_dir
