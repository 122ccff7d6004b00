"""Data sources (driver side, no Ray): listing, validation, decoding, CIFAR-10 download.

Every source yields rows ``{"image": encoded bytes, "label": int64, "key": str}``:

* ``synthetic``: generated shapes (:mod:`rayssl.data.synthetic`), train + eval splits.
* ``imagefolder``: ``<path>/<class>/<img>`` or ``<path>/{train,val|test}/<class>/<img>``;
  local path or any pyarrow/fsspec URI. Without a val/test split, a deterministic
  10 % of the images (by a stable hash of their relative path) is held out.
* ``parquet``: shards with an ``image`` (bytes) column, optional ``label`` and ``key``
  (``<path>/{train,val|test}/*.parquet`` or a flat directory, held out by key hash).
* ``cifar10``: the official python tarball, downloaded once (md5-checked) into
  ``path`` and converted to Parquet shards there (:mod:`rayssl.data.cifar10`), then read
  as ``parquet``; :mod:`rayssl.data.catalog` dispatches over all four.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import posixpath
import re
import threading
import urllib.parse
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from rayssl.config import DataConfig
from rayssl.data.spec import DataSourceError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
EVAL_SPLIT_NAMES = ("val", "test", "validation")
HELD_OUT_MOD = 10  # 1 in 10 held out when a source has no eval split


# ---------------------------------------------------------------------------------------
# Hashing and decoding
# ---------------------------------------------------------------------------------------

def stable_hash(*parts) -> int:
    """63-bit hash of the parts' string forms, identical across processes and machines."""
    h = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0x7FFF_FFFF_FFFF_FFFF


def row_seed(seed: int, epoch: int, key: str) -> int:
    """Per-row RNG seed of the multi-crop transform: a function of (seed, epoch, key) only."""
    return stable_hash("rayssl-row", seed, epoch, key)


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> uint8 RGB array [H, W, 3]; raises on anything undecodable.

    Greyscale, palette, RGBA/LA (alpha dropped), CMYK, 16-bit and float images are converted
    to 8-bit RGB (16-bit scaled down, not clipped). Tiny images are returned as they are.
    """
    if not data:
        raise ValueError("empty image")
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        mode = img.mode
        if mode == "RGB":
            arr = np.array(img)
        elif mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            a = np.asarray(img)
            a = a.astype(np.float64)
            top = 65535.0 if (mode.startswith("I;16") or a.max() > 255) else 255.0
            a = np.clip(a * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)
            arr = np.repeat(a[..., None], 3, axis=2)
        elif mode == "F":
            a = np.asarray(img, dtype=np.float64)
            top = 1.0 if a.max() <= 1.0 else 255.0
            a = np.clip(a * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)
            arr = np.repeat(a[..., None], 3, axis=2)
        else:  # L, 1, P, PA, RGBA, LA, CMYK, YCbCr, LAB, HSV, ...
            if mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            arr = np.array(img.convert("RGB"))
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"unexpected decoded shape {arr.shape}")
    return np.ascontiguousarray(arr)


# ---------------------------------------------------------------------------------------
# File systems
# ---------------------------------------------------------------------------------------

def _is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _local(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path[len("file://"):] if path.startswith("file://") else path))


# Filesystems are resolved once per (scheme, bucket/host, query options) and process, not
# per file: pyarrow's FileSystem.from_uri does a network round trip for s3:// (the bucket's
# region lookup), and a dataset's images all live in a few buckets. The path inside the
# filesystem is derived from the URI by string operations, so listed names with spaces or
# other characters a URI parser rejects are read as they were listed.
_FS_LOCK = threading.Lock()
_FS_CACHE: Dict[Tuple[str, str, str], Tuple[Any, str, Any]] = {}  # key -> (fs, base path, fsspec fs|None)
_QUERY = re.compile(r"[^=&/?#]+=[^&/?#]*(?:&[^=&/?#]+=[^&/?#]*)*")
_URI_PATH = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/]|%[0-9A-Fa-f]{2})*")


def _reset_fs_cache() -> None:
    """Forget the filesystems (and the lock): a forked child must not share the parent's clients."""
    global _FS_LOCK, _FS_CACHE
    _FS_LOCK = threading.Lock()
    _FS_CACHE = {}


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_fs_cache)


def _split_uri(uri: str) -> Tuple[str, str, str, str]:
    """URI -> (scheme, netloc, path without its leading '/', query). A trailing ``?k=v&...``
    (no '/' in it) is the query: filesystem options such as ``region`` or ``endpoint_override``."""
    scheme, rest = uri.split("://", 1)
    rest, query = _strip_query(rest)
    netloc, _, path = rest.partition("/")
    return scheme, netloc, path, query


def _resolve_filesystem(scheme: str, netloc: str, query: str) -> Tuple[Any, str, Any]:
    """(pyarrow filesystem, its path of ``scheme://netloc/``, the fsspec filesystem it wraps or
    None) -- a network round trip for some schemes; called once per key and process (see
    :func:`_filesystem`)."""
    import pyarrow.fs as pafs

    base = f"{scheme}://{netloc}/" + (f"?{query}" if query else "")
    try:
        fs, inner = pafs.FileSystem.from_uri(base)
        return fs, inner, None
    except Exception:  # noqa: BLE001 - fall back to fsspec for schemes pyarrow lacks
        import fsspec

        fs, root = fsspec.core.url_to_fs(base)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), root, fs


@functools.lru_cache(maxsize=16)
def _filesystem_of_chained_url(uri: str):
    """fsspec chained URLs (``simplecache::s3://...``): resolved per URL, as they nest."""
    import pyarrow.fs as pafs
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), root


def _filesystem(uri: str):
    """(pyarrow FileSystem, path inside it) for a URI; fsspec wrapped when pyarrow lacks it.

    The filesystem is cached per (scheme, netloc, query) in this process (thread safe; reset
    in a forked child). For filesystems pyarrow resolved, a path that is a valid URI path has
    its %XX escapes decoded (as ``FileSystem.from_uri`` does), any other path is taken as is;
    fsspec filesystems map the URI to their path themselves (``_strip_protocol``, a string
    operation, as ``fsspec.core.url_to_fs`` does).
    """
    if "::" in uri:
        return _filesystem_of_chained_url(uri)
    scheme, netloc, path, query = _split_uri(uri)
    key = (scheme, netloc, query)
    entry = _FS_CACHE.get(key)
    if entry is None:
        with _FS_LOCK:
            entry = _FS_CACHE.get(key)
            if entry is None:
                entry = _resolve_filesystem(scheme, netloc, query)
                _FS_CACHE[key] = entry
    fs, base, fsspec_fs = entry
    if fsspec_fs is not None:
        return fs, fsspec_fs._strip_protocol(f"{scheme}://{netloc}/{path}")
    if "%" in path and _URI_PATH.fullmatch(path):
        path = urllib.parse.unquote(path)
    if not path:
        inner = base
    else:
        inner = (base if not base or base.endswith("/") else base + "/") + path
    return fs, (inner.rstrip("/") or inner[:1])


def read_bytes(path: str) -> bytes:
    """Whole file as bytes: local path or URI."""
    if not _is_uri(path):
        with open(_local(path), "rb") as f:
            return f.read()
    fs, inner = _filesystem(path)
    with fs.open_input_stream(inner) as f:
        return f.read()


def _list_tree(root: str) -> Tuple[Optional[str], List[str], List[str]]:
    """(error, subdirectory names, file names) of one directory (local or URI)."""
    if not _is_uri(root):
        root = _local(root)
        if not os.path.isdir(root):
            return ("does not exist" if not os.path.exists(root) else "is not a directory"), [], []
        dirs, files = [], []
        with os.scandir(root) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                (dirs if e.is_dir() else files).append(e.name)
        return None, sorted(dirs), sorted(files)
    import pyarrow.fs as pafs

    try:
        fs, inner = _filesystem(root)
        info = fs.get_file_info(inner)
        if info.type == pafs.FileType.NotFound:
            return "does not exist", [], []
        infos = fs.get_file_info(pafs.FileSelector(inner, recursive=False))
    except Exception as err:  # noqa: BLE001
        return f"cannot be listed ({err})", [], []
    dirs = sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.Directory)
    files = sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.File)
    return None, [d for d in dirs if not d.startswith(".")], [f for f in files if not f.startswith(".")]


def _join(root: str, *names: str) -> str:
    """root/names...; a URI's trailing ``?k=v`` filesystem options stay at the end."""
    if _is_uri(root):
        head, query = _strip_query(root)
        return posixpath.join(head.rstrip("/"), *names) + (f"?{query}" if query else "")
    return os.path.join(_local(root), *names)


def _strip_query(uri: str) -> Tuple[str, str]:
    """(URI without its trailing ``?k=v&...`` filesystem options, those options or '')."""
    head, sep, tail = uri.rpartition("?")
    return (head, tail) if sep and _QUERY.fullmatch(tail) else (uri, "")


def basename(path: str) -> str:
    """Last path component of a local path or URI (ignoring a URI's query)."""
    return posixpath.basename(_strip_query(path)[0].rstrip("/")) if _is_uri(path) else os.path.basename(path.rstrip(os.sep))


def _walk_images(root: str) -> List[Tuple[str, str]]:
    """(relative path, "size:mtime_ns" stamp) of every image file below root (recursive,
    sorted). The stamp comes with the listing (no extra request per file on object stores)."""
    if not _is_uri(root):
        root = _local(root)
        out = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel = os.path.relpath(dirpath, root)
            for f in filenames:
                if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                    try:
                        st = os.stat(os.path.join(dirpath, f))
                        stamp = f"{st.st_size}:{st.st_mtime_ns}"
                    except OSError:  # a dangling link: listed, then skipped and counted when read
                        stamp = "?"
                    out.append((f if rel == "." else os.path.join(rel, f), stamp))
        return sorted(out)
    import pyarrow.fs as pafs

    fs, inner = _filesystem(root)
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
    base = inner.rstrip("/") + "/"
    return sorted((i.path[len(base):], f"{i.size}:{i.mtime_ns}") for i in infos
                  if i.type == pafs.FileType.File and i.path.lower().endswith(IMAGE_EXTENSIONS)
                  and not posixpath.basename(i.path).startswith("."))


# ---------------------------------------------------------------------------------------
# ImageFolder
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FileTable:
    """A listed split: full paths, labels, stable keys."""

    paths: Tuple[str, ...]
    labels: Tuple[int, ...]
    keys: Tuple[str, ...]
    stamps: Tuple[str, ...] = ()  # "size:mtime_ns" per file, as listed (change detection)

    def __len__(self) -> int:
        return len(self.paths)

    def to_arrow(self):
        import pyarrow as pa

        return pa.table({"path": pa.array(self.paths, pa.string()), "label": pa.array(self.labels, pa.int64()),
                         "key": pa.array(self.keys, pa.string())})


@dataclass(frozen=True)
class ImageFolderListing:
    root: str
    class_names: Tuple[str, ...]
    train: FileTable
    eval: FileTable
    train_dir: str
    eval_dir: Optional[str]


def _class_files(split_root: str) -> Dict[str, List[Tuple[str, str]]]:
    """{class: [(relative path 'class/...', stamp), ...]} of one split directory."""
    err, dirs, _ = _list_tree(split_root)
    if err:
        raise DataSourceError(f"data.path={split_root}: {err}")
    out = {}
    for d in dirs:
        rel = _walk_images(_join(split_root, d))
        if rel:
            out[d] = [(posixpath.join(d, r.replace(os.sep, "/")), stamp) for r, stamp in rel]
    return out


@functools.lru_cache(maxsize=8)
def list_imagefolder(path: str) -> ImageFolderListing:
    """List an ImageFolder (cached per path). Raises DataSourceError naming the path."""
    if not path:
        raise DataSourceError("data.path is required for data=imagefolder")
    err, dirs, _ = _list_tree(path)
    if err:
        raise DataSourceError(f"data.path={path}: {err}")
    train_dir, eval_dir = path, None
    if "train" in dirs:
        train_dir = _join(path, "train")
        for name in EVAL_SPLIT_NAMES:
            if name in dirs:
                eval_dir = _join(path, name)
                break
    train_files = _class_files(train_dir)
    if not train_files:
        raise DataSourceError(f"data.path={path}: no images found in class sub-folders of {train_dir} "
                              f"(expected <class>/<image>{'|'.join(IMAGE_EXTENSIONS[:3])}...)")
    class_names = tuple(sorted(train_files))
    index = {c: i for i, c in enumerate(class_names)}

    def table(split_root: str, files: Dict[str, List[Tuple[str, str]]], keep=None) -> FileTable:
        paths, labels, keys, stamps = [], [], [], []
        for c in class_names:
            for rel, stamp in files.get(c, ()):
                if keep is not None and not keep(rel):
                    continue
                paths.append(_join(split_root, *rel.split("/")))
                labels.append(index[c])
                keys.append(rel)
                stamps.append(stamp)
        return FileTable(tuple(paths), tuple(labels), tuple(keys), tuple(stamps))

    if eval_dir is not None:
        ev_files = _class_files(eval_dir)
        train, ev = table(train_dir, train_files), table(eval_dir, ev_files)
    else:  # deterministic held-out split by hash of the relative path
        held = lambda rel: stable_hash("held-out", rel) % HELD_OUT_MOD == 0  # noqa: E731
        train = table(train_dir, train_files, keep=lambda r: not held(r))
        ev = table(train_dir, train_files, keep=held)
    return ImageFolderListing(path, class_names, train, ev, train_dir, eval_dir)


# ---------------------------------------------------------------------------------------
# Parquet
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ParquetListing:
    root: str
    class_names: Tuple[str, ...]
    train_files: Tuple[str, ...]
    eval_files: Tuple[str, ...]
    n_train: int
    n_eval: int
    has_label: bool
    has_key: bool
    hash_split: bool  # no eval split on disk: rows held out by key hash
    eval_dir: Optional[str] = None  # <path>/{val,test,validation} beside train/, if there (may hold no shards)


def _parquet_files(root: str) -> List[str]:
    err, _, files = _list_tree(root)
    if err:
        return []
    return [_join(root, f) for f in files if f.endswith(".parquet")]


def open_parquet(path: str):
    import pyarrow.parquet as pq

    if _is_uri(path):
        fs, inner = _filesystem(path)
        return pq.ParquetFile(fs.open_input_file(inner))
    return pq.ParquetFile(_local(path))


def _count_rows(files: Sequence[str]) -> int:
    return sum(open_parquet(f).metadata.num_rows for f in files)


def held_out(key: str) -> bool:
    return stable_hash("held-out", key) % HELD_OUT_MOD == 0


@functools.lru_cache(maxsize=8)
def list_parquet(path: str) -> ParquetListing:
    if not path:
        raise DataSourceError("data.path is required for data=parquet")
    err, dirs, _ = _list_tree(path)
    if err:
        raise DataSourceError(f"data.path={path}: {err}")
    train_files, eval_files = _parquet_files(_join(path, "train")) if "train" in dirs else [], []
    eval_dir = None
    if train_files:
        for name in EVAL_SPLIT_NAMES:
            if name in dirs:
                eval_dir = _join(path, name)
                eval_files = _parquet_files(eval_dir)
                break
    else:
        train_files = _parquet_files(path)
    if not train_files:
        raise DataSourceError(f"data.path={path}: no .parquet shards found (expected {path}/train/*.parquet "
                              f"or {path}/*.parquet; write them with experiments/prepare_data.py)")
    schema = open_parquet(train_files[0]).schema_arrow
    if "image" not in schema.names:
        raise DataSourceError(f"data.path={path}: {train_files[0]} has no 'image' column (columns: {schema.names})")
    has_label, has_key = "label" in schema.names, "key" in schema.names
    class_names: Tuple[str, ...] = ()
    for meta in (_join(path, "classes.json"),):
        try:
            class_names = tuple(json.loads(read_bytes(meta)))
        except Exception:  # noqa: BLE001 - optional file
            pass
    hash_split = not eval_files
    if hash_split:
        n_eval = 0
        n_all = 0
        for f in train_files:
            pf = open_parquet(f)
            col = pf.read(columns=["key"] if has_key else ["image"]).column(0).to_pylist()
            n_all += len(col)
            n_eval += sum(held_out(k if has_key else "blake2b:" + hashlib.blake2b(k, digest_size=8).hexdigest()) for k in col)
        n_train = n_all - n_eval
    else:
        n_train, n_eval = _count_rows(train_files), _count_rows(eval_files)
    if n_train == 0 and hash_split and n_eval:
        raise DataSourceError(f"data.path={path}: the hash split held out all {n_eval} rows, none are left to "
                              f"train on; add rows, or a val/ split beside train/")
    if n_train == 0:
        raise DataSourceError(f"data.path={path}: the parquet shards hold no rows")
    if not class_names and has_label:
        labels = set()
        for f in train_files[:4]:
            labels.update(open_parquet(f).read(columns=["label"]).column(0).to_pylist())
        class_names = tuple(str(i) for i in range(int(max(labels)) + 1)) if labels else ()
    return ParquetListing(path, class_names, tuple(train_files), tuple(eval_files), n_train, n_eval,
                          has_label, has_key, hash_split, eval_dir)


# ---------------------------------------------------------------------------------------
# validate_source
# ---------------------------------------------------------------------------------------

def resolve_spec(spec) -> DataConfig:
    """The data config from a :class:`DataConfig` or the plain dict a Ray actor receives."""
    if isinstance(spec, DataConfig):
        return spec
    if dataclasses.is_dataclass(spec):
        spec = dataclasses.asdict(spec)
    return DataConfig(**spec)


_HASH_SPLIT_HOW = (f"with no val/, test/ or validation/ folder beside train/, 1 in {HELD_OUT_MOD} train "
                   f"images is held out by a hash of its key instead")


def check_imagefolder_splits(lst: ImageFolderListing) -> None:
    """Both splits non-empty: the k-NN evaluation (after Ray started) needs held-out images."""
    path = lst.root
    if lst.eval_dir is not None and not len(lst.eval):
        other = sorted(set(_class_files(lst.eval_dir)) - set(lst.class_names))
        what = (f"no images of the train classes (its class folders {', '.join(other[:8])}"
                f"{' ...' if len(other) > 8 else ''} are not in {lst.train_dir})" if other
                else "no images in class sub-folders (expected <class>/<image>)")
        raise DataSourceError(
            f"data.path={path}: the eval split {lst.eval_dir} holds {what}; put <class>/<image> files there "
            f"with the class names of {lst.train_dir}, or remove that folder ({_HASH_SPLIT_HOW})")
    if lst.eval_dir is None and not len(lst.eval):
        raise DataSourceError(
            f"data.path={path}: no eval split folder, and the hash split (1 in {HELD_OUT_MOD} images, by a "
            f"hash of its path) held out none of the {len(lst.train)} images; add one as "
            f"{_join(path, 'val')}/<class>/<image> with the train images under {_join(path, 'train')}/<class>/, "
            f"or add images")
    if not len(lst.train):
        raise DataSourceError(f"data.path={path}: the hash split held out all {len(lst.eval)} images, none are "
                              f"left to train on; add images or an eval split folder "
                              f"({_join(path, 'train')}/ and {_join(path, 'val')}/)")


def check_parquet_splits(lst: ParquetListing) -> None:
    path = lst.root
    if lst.eval_dir is not None and not lst.eval_files:
        raise DataSourceError(
            f"data.path={path}: the eval split {lst.eval_dir} holds no .parquet shards (or cannot be listed); "
            f"write the held-out rows there ({lst.eval_dir}/*.parquet), or remove that folder ({_HASH_SPLIT_HOW})")
    if lst.n_eval == 0 and not lst.hash_split:
        raise DataSourceError(
            f"data.path={path}: the eval split {lst.eval_dir} holds .parquet shards with no rows; write the "
            f"held-out rows there, or remove that folder ({_HASH_SPLIT_HOW})")
    if lst.n_eval == 0:
        raise DataSourceError(
            f"data.path={path}: no eval split, and the hash split (1 in {HELD_OUT_MOD} rows, by key) held out "
            f"none of the {lst.n_train} rows; write the held-out rows as {_join(path, 'val')}/*.parquet "
            f"beside {_join(path, 'train')}/*.parquet (experiments/prepare_data.py writes both), or add rows")
