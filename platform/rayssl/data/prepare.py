"""ImageFolder -> Parquet shards (image JPEG bytes, label, key) + classes.json + manifest.json.

Layout written under ``output``::

    classes.json                  ["class0", "class1", ...]
    manifest.json                 parameters, per-split counts, per-shard rows + sha256
    train/part-00000.parquet ...  columns image (binary), label (int64), key (string)
    test/part-00000.parquet ...   (the source's val/test split, or the held-out 10 %)

Rows are written in a seeded random order so every shard mixes classes (file-level
shuffling at read time is then enough). JPEG sources are copied byte for byte unless
``resize`` is given; other formats (and resized images) are re-encoded as JPEG.
Idempotent: when manifest.json matches the parameters and the source listing (every file's
path, size and mtime), and the shards are intact, nothing is written.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from rayssl.data.sources import DataSourceError, basename, decode_image, list_imagefolder, read_bytes

MANIFEST = "manifest.json"
CLASSES = "classes.json"
FORMAT_VERSION = 1
JPEG_QUALITY = 95


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def encode_jpeg(arr: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def resize_short_side(arr: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    h, w = arr.shape[:2]
    if min(h, w) == size:
        return arr
    s = size / min(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    return np.asarray(Image.fromarray(arr).resize((nw, nh), Image.BICUBIC))


def write_shards(rows: Iterable[Tuple[bytes, int, str]], out_dir: str, shard_size: int,
                 progress: Optional[Callable[[int], None]] = None) -> List[Dict]:
    """Write (image bytes, label, key) rows as Parquet shards; returns shard records."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(out_dir, exist_ok=True)
    shards: List[Dict] = []
    buf: List[Tuple[bytes, int, str]] = []

    def flush():
        name = f"part-{len(shards):05d}.parquet"
        path = os.path.join(out_dir, name)
        table = pa.table({"image": pa.array([r[0] for r in buf], pa.binary()),
                          "label": pa.array([r[1] for r in buf], pa.int64()),
                          "key": pa.array([r[2] for r in buf], pa.string())})
        tmp = path + ".tmp"
        pq.write_table(table, tmp, compression="none", row_group_size=min(len(buf), 1024))
        os.replace(tmp, path)
        shards.append({"file": name, "rows": len(buf), "bytes": os.path.getsize(path), "sha256": _sha256(path)})
        buf.clear()

    for row in rows:
        buf.append(row)
        if progress:
            progress(1)
        if len(buf) >= shard_size:
            flush()
    if buf:
        flush()
    return shards


def _listing_fingerprint(paths: Sequence[str], stamps: Sequence[str]) -> str:
    """Hash of every listed file's path, size and mtime: a file replaced under the same name
    changes it."""
    h = hashlib.sha256()
    for p, st in zip(paths, stamps, strict=True):
        h.update(p.encode())
        h.update(b"\0")
        h.update(st.encode())
        h.update(b"\0")
    return h.hexdigest()


def manifest_ok(output: str, params: Dict) -> bool:
    """True when output/manifest.json has these params and every shard is intact (size + sha256)."""
    path = os.path.join(output, MANIFEST)
    if not os.path.exists(path):
        return False
    try:
        with open(path) as f:
            man = json.load(f)
    except (OSError, ValueError):
        return False
    if man.get("params") != params or man.get("version") != FORMAT_VERSION:
        return False
    for split, rec in man.get("splits", {}).items():
        for s in rec["shards"]:
            p = os.path.join(output, split, s["file"])
            if not os.path.exists(p) or os.path.getsize(p) != s["bytes"] or _sha256(p) != s["sha256"]:
                return False
    return True


class _Progress:
    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="img", mininterval=1.0)
            except ImportError:
                pass

    def __call__(self, n: int, skipped: int = 0) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if skipped:
                self.bar.set_postfix(skipped=skipped, refresh=False)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def write_dataset(output: str, splits: Dict[str, Tuple[int, Iterator[Tuple[bytes, int, str]]]],
                  class_names: Sequence[str], params: Dict, shard_size: int, progress: bool = True,
                  extra: Optional[Dict] = None) -> Dict:
    """Write every split's rows, then classes.json and manifest.json (written last: its
    presence marks a complete dataset)."""
    os.makedirs(output, exist_ok=True)
    man_path = os.path.join(output, MANIFEST)
    if os.path.exists(man_path):
        os.remove(man_path)
    t0 = time.time()
    man = {"version": FORMAT_VERSION, "params": params, "classes": list(class_names), "splits": {}}
    for split, (total, rows) in splits.items():
        out_dir = os.path.join(output, split)
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        bar = _Progress(total, f"{split}", progress)
        counter = {"skipped": 0, "bad": []}
        shards = write_shards(_count_skips(rows, counter, bar), out_dir, shard_size)
        bar.close()
        man["splits"][split] = {"rows": sum(s["rows"] for s in shards), "skipped": counter["skipped"],
                                "first_bad": counter["bad"][:20], "shards": shards}
    if extra:
        man.update(extra)
    man["seconds"] = round(time.time() - t0, 2)
    with open(os.path.join(output, CLASSES), "w") as f:
        json.dump(list(class_names), f)
    with open(man_path + ".tmp", "w") as f:
        json.dump(man, f, indent=1)
    os.replace(man_path + ".tmp", man_path)
    return man


def _count_skips(rows, counter, progress: Callable[..., None]):
    """Rows with an image; the others are counted, their keys kept. The bar advances for both."""
    for r in rows:
        if r[0] is None:
            counter["skipped"] += 1
            counter["bad"].append(r[2])
            progress(1, counter["skipped"])
            continue
        progress(1, counter["skipped"])
        yield r


def convert_imagefolder(source: str, output: str, resize: Optional[int] = None, shard_size: int = 5000,
                        seed: int = 0, progress: bool = True, force: bool = False,
                        num_threads: int = 8) -> Dict:
    """ImageFolder (local path or URI) -> Parquet dataset under ``output``; returns the manifest.

    Skips the work (returns the existing manifest with ``"skipped_existing": True``) when
    the manifest matches. Undecodable images are left out and listed in the manifest.
    """
    lst = list_imagefolder.__wrapped__(source)  # a fresh listing: files may have changed since
    eval_name = basename(lst.eval_dir) if lst.eval_dir else "test"
    params = {"source": source, "resize": resize, "shard_size": int(shard_size), "seed": int(seed),
              "format": "jpeg", "listing": _listing_fingerprint(lst.train.paths + lst.eval.paths,
                                                                lst.train.stamps + lst.eval.stamps)}
    if not force and manifest_ok(output, params):
        with open(os.path.join(output, MANIFEST)) as f:
            man = json.load(f)
        man["skipped_existing"] = True
        return man

    def load(path: str) -> Optional[bytes]:
        try:
            data = read_bytes(path)
            if resize or not _is_jpeg(data):
                arr = decode_image(data)
                if resize:
                    arr = resize_short_side(arr, int(resize))
                return encode_jpeg(arr)
            decode_image(data)  # verify
            return data
        except Exception:  # noqa: BLE001 - bad image: skipped and recorded in the manifest
            return None

    def rows(table, split_seed):
        from concurrent.futures import ThreadPoolExecutor

        order = np.random.default_rng([seed, split_seed]).permutation(len(table)).tolist()
        with ThreadPoolExecutor(max_workers=num_threads) as pool:  # file reads are latency bound
            for start in range(0, len(order), 256):
                chunk = order[start:start + 256]
                for i, data in zip(chunk, pool.map(load, [table.paths[i] for i in chunk])):
                    yield data, int(table.labels[i]), table.keys[i]

    splits = {"train": (len(lst.train), rows(lst.train, 0)), eval_name: (len(lst.eval), rows(lst.eval, 1))}
    return write_dataset(output, splits, lst.class_names, params, shard_size, progress)


__all__ = ["convert_imagefolder", "write_dataset", "write_shards", "manifest_ok", "read_bytes"]
