"""Ray Data pipelines: the multi-epoch multi-crop train stream and the k-NN eval sets.

Train stream design (``build_train_dataset``)
--------------------------------------------
* synthetic / imagefolder ("indexed" sources): the driver lists the rows once (paths or
  PNG bytes + labels + keys) into one Arrow table put in the object store. The dataset is
  ``ray.data.range((epochs - start_epoch) * n)``: global row index ``g`` is epoch
  ``start_epoch + g // n``, position ``g % n`` in that epoch's permutation (seeded by
  ``(seed, epoch)``: a full per-epoch shuffle for free, no per-epoch listing). The CPU
  actors map indices to rows, read the file bytes, decode and multi-crop.
* parquet / cifar10: one ordered read over (epoch, shard) units, the shards of each epoch
  in a ``(seed, epoch)``-shuffled order and the rows of each shard in a ``(seed, epoch,
  shard)``-shuffled order (local shuffle: a read task holds one shard; prepare_data also
  writes the rows in a random order, so every shard mixes classes), with an ``epoch`` column (:class:`ParquetUnitsDatasource`, pyarrow
  reads in 0-CPU read tasks; see there why not ``read_parquet`` + ``union``); the same
  CPU actors decode and multi-crop.
* Every row's crops come from a ``torch.Generator`` seeded by ``row_seed(seed, epoch, key)``:
  the same (seed, epoch) gives identical crops whatever the actor, batch or block layout.
* Epoch order needs ``preserve_order``: it is set on the returned dataset's context and in
  :func:`ray_data_limits` (pass that to ``ray.train.DataConfig(execution_options=...)``,
  which otherwise replaces the dataset's options).

Bad images (undecodable/corrupt/truncated) never crash the stream: the row is skipped and
counted, and its slot is filled by another good image of the same batch, or, when the whole
batch is bad, by one of the actor's last good images (crops still seeded by the bad row's
key); an actor that has not decoded any image yet carries the rows over to its first good
batch. Every epoch keeps exactly ``n_train`` rows and the step count of the train loop stays
exact. Greyscale, palette, RGBA, CMYK, 16-bit and tiny
images are converted to RGB and used. Skips are counted in a small named actor per
source and run (``run_key``: concurrent trials on one source count apart, and a trial's
counter lives as long as that trial): :func:`skip_stats` -> ``{"skipped": distinct bad images, "events": total skips,
"first_bad": [keys...]}`` (log ``skipped`` as metric ``data_skipped``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from rayssl import method as method_door
from rayssl.config import DataConfig, check_data, data_cpu_budget
from rayssl.data.catalog import parquet_dir, validate_source
from rayssl.data.sources import (DataSourceError, decode_image, held_out, list_imagefolder, list_parquet,
                                 open_parquet, read_bytes, resolve_spec, row_seed, stable_hash)
from rayssl.data.spec import KNN_BANK, KNN_QUERY

log = logging.getLogger("rayssl.data")

MAX_BAD_KEYS = 1000  # distinct bad keys remembered by the counter
RECENT_IMAGES = 8  # decoded images an actor keeps to stand in for an all-bad batch


def content_key(data: bytes) -> str:
    """Row key for sources without a key column: a hash of the encoded bytes."""
    return "blake2b:" + hashlib.blake2b(data, digest_size=8).hexdigest()


# ---------------------------------------------------------------------------------------
# Skip counter
# ---------------------------------------------------------------------------------------

def _source_id(spec: DataConfig) -> str:
    return f"{spec.name}:{spec.path if spec.name != 'synthetic' else spec.synthetic_seed}"


def skip_counter_name(spec, run_key: str = "") -> str:
    """Name of the named actor counting bad images of this source in run ``run_key``."""
    spec = resolve_spec(spec)
    return "rayssl_data_skips_" + format(stable_hash(_source_id(spec), run_key), "x")


class _SkipCounter:
    def __init__(self):
        self.events = 0
        self.bad: Dict[str, None] = {}
        self.n_distinct = 0

    def add(self, keys: List[str]) -> None:
        self.events += len(keys)
        for k in keys:
            if k not in self.bad:
                self.n_distinct += 1
                if len(self.bad) < MAX_BAD_KEYS:
                    self.bad[k] = None

    def stats(self) -> Dict[str, Any]:
        return {"skipped": self.n_distinct, "events": self.events, "first_bad": list(self.bad)[:20]}


_COUNTERS: Dict[Tuple[str, str], Any] = {}  # strong refs: a named actor is collected with its last handle


def _get_or_create_counter(name: str):
    import ray

    slot = (name, ray.get_runtime_context().get_job_id())  # a re-initialised Ray starts afresh
    if slot in _COUNTERS:  # keep the first (owning) handle: dropping it would kill the actor
        return _COUNTERS[slot]
    cls = ray.remote(num_cpus=0, max_restarts=0)(_SkipCounter)
    handle = cls.options(name=name, get_if_exists=True).remote()
    _COUNTERS[slot] = handle
    return handle


def skip_stats(spec, run_key: str = "") -> Dict[str, Any]:
    """Bad-image counts of a source so far: ``{"skipped", "events", "first_bad"}``.

    Callable from the driver or any Ray worker of the same job (e.g. rank 0 of the
    train loop, to log ``data_skipped``). Zeros when nothing was counted yet.
    """
    import ray

    try:
        actor = ray.get_actor(skip_counter_name(spec, run_key))
        return ray.get(actor.stats.remote(), timeout=30)
    except Exception:  # noqa: BLE001 - no counter yet / gone with its owner
        return {"skipped": 0, "events": 0, "first_bad": []}


class _Reporter:
    """Actor-side handle on the counter (lazy; failures never reach the data path)."""

    def __init__(self, name: str):
        self.name, self.handle, self.local = name, None, 0

    def add(self, keys: List[str]) -> None:
        if not keys:
            return
        self.local += len(keys)
        log.warning("skipped %d undecodable image(s), e.g. %s", len(keys), keys[0])
        try:
            import ray

            if self.handle is None:
                self.handle = _get_or_create_counter(self.name)
            # Blocking (bad images are rare): a fire-and-forget call can be lost when Ray Data
            # tears the actor pool down right after the last batch.
            ray.get(self.handle.add.remote(list(keys)), timeout=30)
        except Exception as err:  # noqa: BLE001 - counting must never break the data path
            log.warning("could not report skipped images to %s: %s", self.name, err)


# ---------------------------------------------------------------------------------------
# Row tables (driver side)
# ---------------------------------------------------------------------------------------

def _indexed_table(spec: DataConfig, split: str):
    """Arrow table (image|path, label, key) of an indexed source split ('train'|'eval')."""
    if spec.name == "synthetic":
        from rayssl.data.synthetic import synthetic_table

        n = spec.synthetic_n_train if split == "train" else spec.synthetic_n_eval
        return synthetic_table(int(spec.synthetic_seed), split, int(n), int(spec.synthetic_image_size))
    lst = list_imagefolder(spec.path)
    return (lst.train if split == "train" else lst.eval).to_arrow()


def _parquet_listing(spec: DataConfig):
    return list_parquet(parquet_dir(spec))


def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng(stable_hash("epoch-order", seed, epoch)).permutation(n)


# ---------------------------------------------------------------------------------------
# Actors / batch functions
# ---------------------------------------------------------------------------------------

class MultiCropWorker:
    """``map_batches`` callable class: rows -> decoded -> multi-crop uint8 columns.

    Input batches are either index batches (``id``: global row index into the indexed
    table) or Parquet rows (``image``, ``key``, ``epoch``).

    ``spec.augment_on="cpu"``: columns ``global`` uint8 [B,2,3,G,G], ``local`` uint8
    [B,n,3,L,L] (finished crops), ``epoch``. ``"gpu"``: ``global`` / ``local`` hold the
    geometric crops only (random-resized-crop + resize), plus ``global_params`` float32
    [B,2,P] and ``local_params`` float32 [B,n,P] (P = ``dinov3.augment.N_PHOTO_PARAMS``);
    the trainer finishes them with ``dinov3.augment.apply_photometric_batch`` (same crops
    as the cpu mode for the same rows, bitwise on CPU tensors).
    """

    def __init__(self, spec: Dict[str, Any], seed: int, start_epoch: int = 0, n_rows: int = 0,
                 table_ref=None, counter_name: Optional[str] = None):
        import torch

        torch.set_num_threads(1)
        self.spec = resolve_spec(spec)
        self.on_gpu = self.spec.augment_on == "gpu"
        self.seed, self.start_epoch, self.n = int(seed), int(start_epoch), int(n_rows)
        s = self.spec
        self.aug = method_door.transforms().MultiCropAugmentation(global_size=s.global_size, local_size=s.local_size,
                                         n_local=s.n_local, blur=s.blur)
        self.reporter = _Reporter(counter_name or skip_counter_name(s))
        self.keys = self.labels = self.images = self.paths = None
        if table_ref is not None:
            import ray

            table = ray.get(table_ref) if isinstance(table_ref, ray.ObjectRef) else table_ref
            self.keys = table.column("key").to_pylist()
            if "image" in table.column_names:
                self.images = table.column("image").to_pylist()
            else:
                self.paths = table.column("path").to_pylist()
        self._orders: Dict[int, np.ndarray] = {}
        self._recent: List = []  # a few recently decoded images: stand-ins for an all-bad batch
        self._owed: List[Tuple[str, int]] = []  # (key, epoch) of bad rows not replaced yet

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) >= 2:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = _epoch_order(self.n, self.seed, epoch)
        return self._orders[epoch]

    def _rows(self, batch: Dict[str, np.ndarray]) -> Tuple[List, List[str], np.ndarray]:
        if "id" in batch:  # indexed source
            g = np.asarray(batch["id"], dtype=np.int64)
            epochs = self.start_epoch + g // self.n
            pos = g % self.n
            datas, keys = [], []
            for e, p in zip(epochs.tolist(), pos.tolist()):
                i = int(self._order(e)[p])
                keys.append(self.keys[i])
                if self.images is not None:
                    datas.append(self.images[i])
                else:
                    try:
                        datas.append(read_bytes(self.paths[i]))
                    except Exception:  # noqa: BLE001 - unreadable file: counted as bad
                        datas.append(None)
            return datas, keys, epochs
        datas = list(batch["image"])
        if "key" in batch:
            keys = [str(k) for k in batch["key"]]
        else:
            keys = [content_key(d) if d is not None else "" for d in datas]
        return datas, keys, np.asarray(batch["epoch"], dtype=np.int64)

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        import torch

        datas, keys, epochs = self._rows(batch)
        images: List[Optional[torch.Tensor]] = []
        bad: List[int] = []
        for i, d in enumerate(datas):
            try:
                images.append(torch.from_numpy(decode_image(d)).permute(2, 0, 1))
            except Exception:  # noqa: BLE001 - corrupt / truncated / not an image
                images.append(None)
                bad.append(i)
        good = [im for im in images if im is not None]
        if good:
            self._recent = good[-RECENT_IMAGES:]
        pool = good or self._recent
        if bad:
            self.reporter.add([keys[i] for i in bad])
            if pool:
                for j, i in enumerate(bad):
                    images[i] = pool[j % len(pool)]
            else:  # no image decoded by this actor yet: owe these rows to its first good batch
                self._owed += [(keys[i], int(epochs[i])) for i in bad]
                keep = [i for i in range(len(images)) if images[i] is not None]
                images, keys, epochs = [images[i] for i in keep], [keys[i] for i in keep], epochs[keep]
        if self._owed and pool:
            images += [pool[j % len(pool)] for j in range(len(self._owed))]
            keys += [k for k, _ in self._owed]
            epochs = np.concatenate([np.asarray(epochs, dtype=np.int64),
                                     np.asarray([e for _, e in self._owed], dtype=np.int64)])
            self._owed = []
        gens = []
        for i in range(len(images)):
            gen = torch.Generator()
            gen.manual_seed(row_seed(self.seed, int(epochs[i]), keys[i]))
            gens.append(gen)
        s = self.spec
        extra = {}
        if images and self.on_gpu:  # geometric part only; photometric ops as parameters
            g, loc, gp, lp = self.aug.geometric_batch(images, gens)
            out_g, out_l = g.numpy(), loc.numpy()
            extra = {"global_params": gp.numpy(), "local_params": lp.numpy()}
        elif images:
            g, loc = self.aug.batch(images, gens)
            out_g, out_l = g.numpy(), loc.numpy()
        else:
            out_g = np.empty((0, 2, 3, s.global_size, s.global_size), dtype=np.uint8)
            out_l = np.empty((0, s.n_local, 3, s.local_size, s.local_size), dtype=np.uint8)
        if self.on_gpu and not images:
            n_params = method_door.transforms().N_PHOTO_PARAMS
            extra = {"global_params": np.empty((0, 2, n_params), dtype=np.float32),
                     "local_params": np.empty((0, s.n_local, n_params), dtype=np.float32)}
        return {"global": out_g, "local": out_l, **extra, "epoch": np.asarray(epochs, dtype=np.int64)}


class EvalWorker:
    """``map_batches`` callable: rows (image bytes | path, label) -> EvalTransform uint8 + label."""

    def __init__(self, size: int, counter_name: str):
        import torch

        torch.set_num_threads(1)
        self.tf = method_door.transforms().EvalTransform(size)
        self.size = size
        self.reporter = _Reporter(counter_name)

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        import torch

        n = len(batch["label"])
        out = np.empty((n, 3, self.size, self.size), dtype=np.uint8)
        ok = np.zeros(n, dtype=bool)
        bad = []
        for i in range(n):
            try:
                data = batch["image"][i] if "image" in batch else read_bytes(str(batch["path"][i]))
                img = torch.from_numpy(decode_image(data)).permute(2, 0, 1)
                out[i] = self.tf(img).numpy()
                ok[i] = True
            except Exception:  # noqa: BLE001
                bad.append(str(batch["key"][i]) if "key" in batch else str(i))
        self.reporter.add(bad)
        return {"image": out[ok], "label": np.asarray(batch["label"], dtype=np.int64)[ok],
                "knn_split": np.asarray(batch["knn_split"], dtype=np.int64)[ok]}


# ---------------------------------------------------------------------------------------
# Public builders
# ---------------------------------------------------------------------------------------

def ray_data_limits(spec) -> "Any":
    """ExecutionOptions for ``ray.train.DataConfig(execution_options=...)``.

    Caps Ray Data's CPU budget at :func:`data_cpu_budget` and keeps the row order
    (``preserve_order=True``: the train stream is in epoch order).
    """
    from ray.data import ExecutionOptions, ExecutionResources

    spec = resolve_spec(spec)
    opts = ExecutionOptions(preserve_order=True)
    opts.resource_limits = ExecutionResources(cpu=data_cpu_budget(spec))
    return opts


def read_concurrency(spec) -> int:
    """Read tasks in flight: ``read_concurrency``, else one per 4 multi-crop actors (>= 1).

    Read tasks request 0 CPUs, so without a cap Ray Data starts one per shard at once, each
    in a fresh worker process: on a 2-CPU node that took the stream 13-17 s (Parquet) and
    31 s (ImageFolder) to its first batch instead of 4-8 s, with every shard of the epoch
    read ahead. One local reader outruns dozens of actors; object storage may need more."""
    spec = resolve_spec(spec)
    if spec.read_concurrency is not None:
        return max(1, int(spec.read_concurrency))
    return max(1, math.ceil(spec.num_actors / 4))


def _configure(ds, spec: DataConfig):
    opts = ray_data_limits(spec)
    ds.context.execution_options.preserve_order = True
    ds.context.execution_options.resource_limits = opts.resource_limits
    return ds


def build_train_dataset(spec, seed: int, epochs: int, start_epoch: int = 0, run_key: str = ""):
    """Multi-epoch multi-crop stream: columns ``global`` uint8 [2,3,G,G], ``local`` uint8
    [n_local,3,L,L], ``epoch`` int64; rows of epochs start_epoch..epochs-1 in epoch order,
    ``n_train`` rows per epoch. Crops seeded by (seed, epoch, row key). Bad images are
    counted under ``run_key`` (:func:`skip_stats`)."""
    import ray

    spec = resolve_spec(spec)
    if epochs <= start_epoch:
        raise ValueError(f"epochs={epochs} must be > start_epoch={start_epoch}")
    validate_source(spec)  # DataSourceError naming the path before any Ray work
    counter = skip_counter_name(spec, run_key)
    _get_or_create_counter(counter)  # owned by this process: lives as long as the job/trial
    n_epochs = int(epochs) - int(start_epoch)
    bs = int(spec.map_batch_size)
    check_data(spec)  # the data config's own checks (a bad value fails here, not in the actors)
    actor_kwargs = dict(spec=dataclasses.asdict(spec), seed=int(seed), start_epoch=int(start_epoch),
                        counter_name=counter)
    compute = ray.data.ActorPoolStrategy(min_size=spec.num_actors, max_size=spec.num_actors)

    if spec.name in ("synthetic", "imagefolder"):
        table = _indexed_table(spec, "train")
        n = table.num_rows
        if n == 0:
            raise DataSourceError(f"data.path={spec.path}: no training images")
        total = n_epochs * n
        n_blocks = max(1, min(math.ceil(total / (bs * 4)), 20000))
        ds = _index_range(total, n_blocks, read_concurrency(spec))
        actor_kwargs.update(n_rows=n, table_ref=ray.put(table))
    elif spec.name in ("parquet", "cifar10"):
        lst = _parquet_listing(spec)
        units = [(e, lst.train_files[i]) for e in range(int(start_epoch), int(epochs))
                 for i in _epoch_order(len(lst.train_files), int(seed), e)]
        ds = _read_parquet_units(units, ["image"] + (["key"] if lst.has_key else []),
                                 hash_split=lst.hash_split, keep_held_out=False, shuffle_seed=int(seed),
                                 concurrency=read_concurrency(spec), override_num_blocks=len(units))
    else:
        raise DataSourceError(f"data.name={spec.name!r}: unknown source")

    ds = ds.map_batches(MultiCropWorker, fn_constructor_kwargs=actor_kwargs, batch_size=bs,
                        batch_format="numpy", num_cpus=float(spec.cpus_per_actor), compute=compute)
    # Blocks of about one map batch of crops (Ray Data's default is 128 MiB): the consumer gets
    # each batch as it is made, not a whole shard's crops at once (first batch of a CIFAR-10
    # stream 13-15 s -> 5-9 s on 2 CPUs); reads are cut to the same size, which bounds tasks.
    row_bytes = 2 * 3 * spec.global_size ** 2 + spec.n_local * 3 * spec.local_size ** 2
    ds.context.target_max_block_size = bs * row_bytes
    return _configure(ds, spec)


# Logical CPUs of read tasks (index ranges, Parquet reads): 0, so that reading never waits
# for a CPU held by the decode/augment actors (num_cpus=1 each), which do the real work.
READ_CPUS = 0


def _index_range(total: int, n_blocks: int, concurrency: Optional[int] = None):
    """ray.data.range(total) whose read tasks request no CPU, at most ``concurrency`` at once."""
    import ray

    try:
        from ray.data._internal.datasource.range_datasource import RangeDatasource

        src = RangeDatasource(n=int(total), block_format="arrow", column_name="id")
        return ray.data.read_datasource(src, num_cpus=READ_CPUS, override_num_blocks=int(n_blocks),
                                        concurrency=concurrency)
    except ImportError:  # internal module moved: plain range (reads then need a free CPU)
        return ray.data.range(int(total), override_num_blocks=int(n_blocks), concurrency=concurrency)


class ParquetUnitsDatasource(Datasource):
    """Reads Parquet files in a given order, one read task per (epoch, file) unit.

    Used instead of ``ray.data.read_parquet`` because (1) Ray 2.60's read_parquet plans a
    ``ListFiles`` task that needs a whole free CPU, which never comes when Train workers and
    the decode actors hold every CPU (the stream then hangs on small machines), and (2) one
    ordered dataset over all epochs needs no ``union`` of per-epoch reads. Each unit yields
    row-group sized blocks with an ``epoch`` column (when the unit has an epoch), the key
    hash split applied when the source has no eval split, and ``label = -1`` when absent.
    """

    def __init__(self, units, columns, hash_split=False, keep_held_out=False, add_label=False,
                 shuffle_seed: Optional[int] = None, constants: Optional[Dict[str, int]] = None):
        super().__init__()
        self.units, self.columns = list(units), list(columns)
        self.hash_split, self.keep_held_out, self.add_label = hash_split, keep_held_out, add_label
        self.shuffle_seed, self.constants = shuffle_seed, dict(constants or {})

    def estimate_inmemory_data_size(self):
        return None

    def get_name(self) -> str:
        return "ParquetUnits"

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
        tasks = []
        for epoch, path in self.units:
            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=(path,), exec_stats=None)
            fn = functools.partial(_read_unit, path=path, epoch=epoch, columns=self.columns,
                                   hash_split=self.hash_split, keep_held_out=self.keep_held_out,
                                   add_label=self.add_label, shuffle_seed=self.shuffle_seed,
                                   constants=self.constants)
            try:
                tasks.append(ReadTask(fn, meta, per_task_row_limit=per_task_row_limit))
            except TypeError:  # older ReadTask signature
                tasks.append(ReadTask(fn, meta))
        return tasks


def _row_order(n: int, seed: int, epoch: int, path: str) -> np.ndarray:
    """The local shuffle: rows of one shard in a (seed, epoch, shard) order."""
    return np.random.default_rng(stable_hash("row-order", seed, epoch, path)).permutation(n)


def _read_unit(path: str, epoch: Optional[int], columns: List[str], hash_split: bool, keep_held_out: bool,
               add_label: bool, shuffle_seed: Optional[int] = None, constants: Optional[Dict[str, int]] = None):
    import pyarrow as pa

    pf = open_parquet(path)
    if shuffle_seed is not None and epoch is not None:
        # The whole shard in this read task (one shard's bytes), rows permuted per epoch.
        whole = pf.read(columns=columns)
        whole = whole.take(pa.array(_row_order(whole.num_rows, shuffle_seed, epoch, path)))
        batches = whole.to_batches(max_chunksize=1024)
    else:
        batches = pf.iter_batches(batch_size=1024, columns=columns)
    for rb in batches:
        t = pa.Table.from_batches([rb])
        if hash_split:
            keys = (t.column("key").to_pylist() if "key" in t.column_names
                    else [content_key(d) for d in t.column("image").to_pylist()])
            t = t.filter(pa.array([held_out(k) == keep_held_out for k in keys]))
        if add_label:
            t = t.append_column("label", pa.array(np.full(t.num_rows, -1, dtype=np.int64)))
        if epoch is not None:
            t = t.append_column("epoch", pa.array(np.full(t.num_rows, epoch, dtype=np.int64)))
        for name, value in (constants or {}).items():
            t = t.append_column(name, pa.array(np.full(t.num_rows, value, dtype=np.int64)))
        if t.num_rows:
            yield t


def _read_parquet_units(units, columns, hash_split=False, keep_held_out=False, add_label=False,
                        shuffle_seed: Optional[int] = None, constants: Optional[Dict[str, int]] = None,
                        concurrency: Optional[int] = None, override_num_blocks: Optional[int] = None):
    """Dataset over ``units`` read by :class:`ParquetUnitsDatasource`, at most ``concurrency``
    read tasks at once. ``override_num_blocks=len(units)``: no extra split of each unit's
    output (Ray Data splits reads of under 200 units into ~200 blocks: a one-epoch CIFAR-10
    stream then fed the actors 250-row blocks to concatenate, ~15% fewer images/s)."""
    import ray

    src = ParquetUnitsDatasource(units, columns, hash_split=hash_split, keep_held_out=keep_held_out,
                                 add_label=add_label, shuffle_seed=shuffle_seed, constants=constants)
    return ray.data.read_datasource(src, num_cpus=READ_CPUS, concurrency=concurrency,
                                    override_num_blocks=override_num_blocks)


def _subset(n: int, size: Optional[int]) -> np.ndarray:
    if size is None or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(stable_hash("knn-subset", n, size)).permutation(n)[:size])


def build_knn_dataset(spec, run_key: str = ""):
    """The k-NN evaluation sets as one dataset: columns ``image`` uint8 [3,S,S], ``label`` int64,
    ``knn_split`` int64 (:data:`KNN_BANK` or :data:`KNN_QUERY`; the two may interleave).

    Bank: labelled train images (``knn_bank_size`` of them, a fixed subset); queries: held-out
    images (``knn_query_size``); un-augmented :class:`dinov3.augment.EvalTransform`. One
    dataset, not two, because each Ray Data execution starts its own actor pool (seconds on a
    small node, paid at every run's first k-NN evaluation).
    """
    import pyarrow as pa
    import ray

    spec = resolve_spec(spec)
    validate_source(spec)  # DataSourceError naming the path before any Ray work
    counter = skip_counter_name(spec, run_key)
    _get_or_create_counter(counter)
    fn_kwargs = dict(size=int(spec.eval_size), counter_name=counter)
    parts = []
    for split, tag, size in (("train", KNN_BANK, spec.knn_bank_size), ("eval", KNN_QUERY, spec.knn_query_size)):
        if spec.name in ("synthetic", "imagefolder"):
            table = _indexed_table(spec, split)
            table = table.take(pa.array(_subset(table.num_rows, size)))
            table = table.append_column("knn_split", pa.array(np.full(table.num_rows, tag, dtype=np.int64)))
            chunk = max(64, math.ceil(table.num_rows / 16))
            blocks = [table.slice(i, chunk) for i in range(0, table.num_rows, chunk)] or [table]
            ds = ray.data.from_arrow(blocks)
        else:
            lst = _parquet_listing(spec)
            files = lst.train_files if (split == "train" or lst.hash_split) else lst.eval_files
            if not files:
                raise DataSourceError(f"data.path={lst.root}: no held-out split")
            cols = ["image"] + (["label"] if lst.has_label else []) + (["key"] if lst.has_key else [])
            ds = _read_parquet_units([(None, f) for f in files], cols, hash_split=lst.hash_split,
                                     keep_held_out=split == "eval", add_label=not lst.has_label,
                                     constants={"knn_split": tag}, concurrency=read_concurrency(spec))
            if size is not None:
                ds = ds.limit(int(size))
        parts.append(ds)
    # 0 logical CPUs: k-NN evaluation runs while the train stream's actors hold their CPUs
    # (and Train holds the rest); a CPU request here could wait forever on small machines.
    ds = parts[0].union(parts[1]).map_batches(
        EvalWorker, fn_constructor_kwargs=fn_kwargs, batch_size=256, batch_format="numpy", num_cpus=0,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, int(spec.num_actors))))
    return _configure(ds, spec)


