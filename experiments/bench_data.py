"""Data-path benchmark: multi-crop throughput alone vs through Ray Data, and Parquet vs JPEG reads.

    PYTHONPATH=.:platform python experiments/bench_data.py [--k 2] [--cases cifar,jpeg256,read]
    PYTHONPATH=.:platform python experiments/bench_data.py --cases gpuaug   # no Ray started

Cases (one JSON line each):
  cifar    CIFAR-10 train as Parquet (prepared under --work from the shared ImageFolder when
           missing), 32/16 px crops, 6 locals.
  jpeg256  generated 256 px JPEGs (Parquet), 224/96 px crops, 8 locals.
  read     reading CIFAR-10 train: Parquet shards vs the 50k JPEG files (read_binary_files).
  gpuaug   data.augment_on=cpu vs gpu, per data CPU core: the actor's work (MultiCropWorker:
           decode + multi-crop, or decode + random-resized-crop only) in this process on one
           thread, modes interleaved, on the jpeg256 rows (224/96 px, 8 locals) and CIFAR-10
           rows (32/16 px, 6 locals; generated 32 px JPEGs without the shared copy); the ratio
           gpu / cpu (target >= 3 at 224/96 px) per wall second and per CPU second of the
           process (the latter ignores other processes time-sharing the core); where the
           actor's CPU time goes (decode, parameter draws, crop + resize, photometric ops); and
           the batched photometric ops the trainer runs in that mode
           (dinov3.augment.apply_photometric_batch) on this CPU, one thread.

For cifar/jpeg256: (a) decode + multi-crop in this process on one core (the exact code the
Ray actors run: rayssl.data.pipeline.MultiCropWorker), images/s; (b) build_train_dataset with
k actors on a k-CPU Ray instance, consumed through iter_torch_batches, images/s after the
first batch (steady state; startup reported separately); efficiency = b / (k * a).
Also (c): the loop of (a) in k plain processes at once, no Ray: c / (k * a) is what this
machine's k cores give the code when all are busy, so b / c is what Ray itself keeps.
``ray_cores`` splits the k cores over (b)'s window: the actors, the driver (the consumer and
Ray Data's executor), and everything else (raylet, GCS, helper actors).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "platform")]

import dataclasses  # noqa: E402

from rayssl.config import DataConfig  # noqa: E402


def small_spec(**kw) -> DataConfig:
    """The data config at 32/16 px with one actor, unless told otherwise."""
    base = dict(global_size=32, local_size=16, n_local=4, eval_size=32, num_actors=1, map_batch_size=64,
                knn_bank_size=None, knn_query_size=None)
    return DataConfig(**{**base, **kw})


def emit(**kw):
    print(json.dumps(kw), flush=True)


def cifar_dirs(work: Path):
    src = Path(os.environ.get("DINOV3_CIFAR10_DIR", REPO.parent / "shared" / "data" / "cifar10"))
    if not (src / "train").is_dir():
        return None, None
    out = work / "cifar10_parquet"
    from rayssl.data.prepare import convert_imagefolder

    convert_imagefolder(str(src), str(out), shard_size=5000, progress=False)
    return src, out


def jpeg256_dir(work: Path, n: int, shard_size: int, size: int = 256) -> Path:
    from rayssl.data.prepare import encode_jpeg, write_shards
    from rayssl.data.synthetic import render

    out = work / (f"jpeg256_{n}_{shard_size}" if size == 256 else f"jpeg{size}_{n}_{shard_size}")
    if (out / "train").is_dir():
        return out
    rows = []
    for i in range(n):
        arr = render(i % 10, size, np.random.default_rng(i))
        rows.append((encode_jpeg(arr, 90), i % 10, f"{i:06d}"))
    write_shards(rows, str(out / "train"), shard_size=shard_size)
    return out


def _load_rows(path: str, n: int):
    """(encoded images, keys) of the first n train rows of a Parquet dataset, object arrays."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted((Path(path) / "train").glob("*.parquet"))
    tables, rows = [], 0
    for f in files:  # as many shards as n rows need
        tables.append(pq.read_table(f, columns=["image", "key"]))
        rows += tables[-1].num_rows
        if rows >= n:
            break
    t = pa.concat_tables(tables).slice(0, n)
    return (np.array(t.column("image").to_pylist(), dtype=object),
            np.array(t.column("key").to_pylist(), dtype=object))


def _single_run(spec_dict: dict, path: str, n: int, barrier=None, cpu_time: bool = False):
    """Decode + multi-crop of n rows in this process, one thread -> (start, end, rows), and
    with ``cpu_time`` the process CPU seconds of the loop as a 4th item (unlike the wall
    clock, blind to other processes time-sharing the core). With a barrier, the timed loop
    starts when all k processes are ready."""
    import torch

    from rayssl.data.pipeline import MultiCropWorker

    images, keys = _load_rows(path, n)
    worker = MultiCropWorker(spec_dict, seed=0)
    torch.set_num_threads(1)
    bs = spec_dict["map_batch_size"]
    worker({"image": images[:bs], "key": keys[:bs], "epoch": np.zeros(bs, np.int64)})  # warm-up
    if barrier is not None:
        barrier.wait()
    c0, t0 = time.process_time(), time.perf_counter()
    for s in range(0, len(images), bs):
        sl = slice(s, s + bs)
        worker({"image": images[sl], "key": keys[sl], "epoch": np.zeros(len(images[sl]), np.int64)})
    t1, c1 = time.perf_counter(), time.process_time()
    return (t0, t1, len(images), c1 - c0) if cpu_time else (t0, t1, len(images))


def bench_single(spec: DataConfig, path: Path, n: int) -> float:
    """(a): decode + multi-crop of n rows in this process, one thread; images/s."""
    t0, t1, rows = _single_run(dataclasses.asdict(spec), str(path), n)
    return rows / (t1 - t0)


def _parallel_child(spec_dict, path, n, barrier, queue):
    queue.put(_single_run(spec_dict, path, n, barrier))


def bench_plain_parallel(spec: DataConfig, path: Path, n: int, k: int) -> float:
    """The same loop as (a) in k plain processes at once (no Ray): images/s together. What
    k cores give this code on this machine when all are busy (shared caches, memory
    bandwidth, clocks): the ceiling for (b)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(k), ctx.Queue()
    procs = [ctx.Process(target=_parallel_child, args=(dataclasses.asdict(spec), str(path), n, barrier, queue))
             for _ in range(k)]
    for p in procs:
        p.start()
    runs = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    start, end = min(r[0] for r in runs), max(r[1] for r in runs)
    return sum(r[2] for r in runs) / (end - start)


def cpu_seconds() -> dict:
    """CPU seconds (user + system) of every process on this machine, by pid -> (s, cmdline)."""
    import psutil

    out = {}
    for p in psutil.process_iter(["cmdline", "name"]):
        try:
            t = p.cpu_times()
            out[p.pid] = (t.user + t.system, " ".join(p.info["cmdline"] or []) or p.info["name"] or "")
        except (psutil.Error, OSError):
            pass
    return out


def cores_used(before: dict, after: dict, wall_s: float) -> dict:
    """Where the CPUs went between two cpu_seconds() snapshots, in cores: the multi-crop
    actors, this driver (iter_torch_batches and Ray Data's executor), everything else
    (raylet, GCS, Ray Data's helper actors, the OS)."""
    used = {"actors": 0.0, "driver": 0.0, "other": 0.0}
    for pid, (cpu, cmd) in after.items():
        d = cpu - before.get(pid, (0.0, ""))[0]
        kind = "driver" if pid == os.getpid() else "actors" if "MapWorker" in cmd else "other"
        used[kind] += max(d, 0.0)
    return {k: round(v / wall_s, 3) for k, v in used.items()}


def bench_ray(spec: DataConfig, n: int, batch_size: int, n_train: int) -> dict:
    """(b): through Ray Data + iter_torch_batches. Steady state: images/s between the
    (n/4)-th and the n-th row (startup and the first prefetched batches excluded), and
    the cores each kind of process used over that window."""
    from rayssl.data import build_train_dataset

    t0 = time.perf_counter()
    epochs = max(1, -(-n // n_train)) + 1  # one spare: a hash split holds rows out of each epoch
    ds = build_train_dataset(spec, seed=0, epochs=epochs)
    rows, t_first, mark = 0, None, None
    for b in ds.iter_torch_batches(batch_size=batch_size, prefetch_batches=2):
        now = time.perf_counter()
        if t_first is None:
            t_first = now
        assert b["global"].dtype == torch_uint8()
        rows += len(b["epoch"])
        if mark is None and rows >= n // 4:
            mark = (rows, now, cpu_seconds())
        if rows >= n:
            break
    t_end = time.perf_counter()
    cores = cores_used(mark[2], cpu_seconds(), t_end - mark[1])
    return {"rows": rows, "startup_s": round(t_first - t0, 2), "cores": cores,
            "images_per_s": (rows - mark[0]) / (t_end - mark[1]), "total_images_per_s": rows / (t_end - t0)}


def torch_uint8():
    import torch

    return torch.uint8


def load_avg() -> float:
    try:
        return round(os.getloadavg()[0], 1)
    except OSError:
        return -1.0


def crop_case(name, spec, path, k, n_single, n_ray, batch_size, n_train, repeat):
    a_runs, b_runs, c_runs = [], [], []
    for _ in range(repeat):  # interleaved, best of `repeat` (the machine may be shared)
        a_runs.append(bench_single(spec, path, n_single))
        b_runs.append(bench_ray(spec, n_ray, batch_size, n_train))
        c_runs.append(bench_plain_parallel(spec, path, n_single, k))
    a, c = max(a_runs), max(c_runs)
    b = max(b_runs, key=lambda r: r["images_per_s"])
    emit(case=name, k=k, global_size=spec.global_size, local_size=spec.local_size, n_local=spec.n_local,
         single_images_per_s_per_core=round(a, 1), ray_images_per_s=round(b["images_per_s"], 1),
         ray_total_images_per_s=round(b["total_images_per_s"], 1), ray_startup_s=b["startup_s"],
         rows=b["rows"], efficiency=round(b["images_per_s"] / (k * a), 3),
         plain_parallel_images_per_s=round(c, 1), plain_parallel_efficiency=round(c / (k * a), 3),
         ray_vs_plain_parallel=round(b["images_per_s"] / c, 3), ray_cores=b["cores"],
         all_single=[round(x, 1) for x in a_runs], all_ray=[round(r["images_per_s"], 1) for r in b_runs],
         all_plain_parallel=[round(x, 1) for x in c_runs],
         # a, b and c of one repeat run minutes apart at most: on a shared host these pairs
         # drift less than the best-of figures above
         efficiency_per_repeat=[round(r["images_per_s"] / (k * x), 3) for r, x in zip(b_runs, a_runs)],
         ray_vs_plain_parallel_per_repeat=[round(r["images_per_s"] / x, 3) for r, x in zip(b_runs, c_runs)],
         load_avg=load_avg())


def actor_breakdown(spec: DataConfig, path: Path, n: int, batch_size: int, repeat: int) -> dict:
    """Where one actor's time goes, CPU ms per image on one thread (process CPU time, best of
    ``repeat``): decode,
    the parameter draws, the geometric part (draws + crop/resize + packing: the gpu mode's
    augmentation), the cpu mode's whole augmentation, and the trainer's batched photometric
    ops on the geometric crops (``batch_size`` rows per call, as the consumer's batches)."""
    import torch

    from dinov3.augment import MultiCropAugmentation, apply_photometric_batch
    from rayssl.data.sources import decode_image, row_seed

    torch.set_num_threads(1)
    datas, keys = _load_rows(str(path), n)
    aug = MultiCropAugmentation(global_size=spec.global_size, local_size=spec.local_size, n_local=spec.n_local,
                                blur=spec.blur)
    mb = spec.map_batch_size

    def gens(sl):
        return [torch.Generator().manual_seed(row_seed(0, 0, str(k))) for k in keys[sl]]

    def decode():
        return [torch.from_numpy(decode_image(d)).permute(2, 0, 1) for d in datas]

    imgs = decode()
    geo = []

    def sample():
        for s in range(0, n, mb):
            aug._sample_batch(imgs[s:s + mb], gens(slice(s, s + mb)))

    def geometric():
        geo.clear()
        for s in range(0, n, mb):
            geo.append(aug.geometric_batch(imgs[s:s + mb], gens(slice(s, s + mb))))

    def cpu_augment():
        for s in range(0, n, mb):
            aug.batch(imgs[s:s + mb], gens(slice(s, s + mb)))

    geometric()
    cat = [torch.cat([g[i] for g in geo]) for i in range(4)]

    def photometric():
        for s in range(0, n, batch_size):
            apply_photometric_batch(*(c[s:s + batch_size] for c in cat))

    out = {}
    for name, fn in (("decode", decode), ("param_draws", sample), ("geometric", geometric),
                     ("cpu_augment", cpu_augment), ("photometric", photometric)):
        best = None
        for _ in range(repeat):
            t0 = time.process_time()
            fn()
            dt = time.process_time() - t0
            best = dt if best is None else min(best, dt)
        out[name + "_ms"] = round(1000 * best / n, 3)
    out["crop_resize_pack_ms"] = round(out["geometric_ms"] - out["param_draws_ms"], 3)
    out["photometric_images_per_cpu_s"] = round(1000 / out["photometric_ms"], 1)
    return out


def gpuaug_case(name: str, spec: DataConfig, path: Path, n: int, batch_size: int, repeat: int):
    """data.augment_on=cpu vs gpu: the actor's images/s on one core, interleaved (the order
    alternates each repeat), best of ``repeat`` per mode, and the ratio gpu / cpu; per wall
    second and per CPU second of this process (the figure to trust on a shared host)."""
    runs = {"cpu": [], "gpu": []}
    cpu_runs = {"cpu": [], "gpu": []}
    for r in range(repeat):
        for mode in (("cpu", "gpu") if r % 2 == 0 else ("gpu", "cpu")):
            t0, t1, rows, cpu_s = _single_run(dict(dataclasses.asdict(spec), augment_on=mode), str(path), n, cpu_time=True)
            runs[mode].append(rows / (t1 - t0))
            cpu_runs[mode].append(rows / cpu_s)
    cpu, gpu = max(runs["cpu"]), max(runs["gpu"])
    cpu_c, gpu_c = max(cpu_runs["cpu"]), max(cpu_runs["gpu"])
    emit(case=name, global_size=spec.global_size, local_size=spec.local_size, n_local=spec.n_local,
         rows=n, map_batch_size=spec.map_batch_size,
         actor_cpu_images_per_cpu_s=round(cpu_c, 1), actor_gpu_images_per_cpu_s=round(gpu_c, 1),
         ratio_cpu_time=round(gpu_c / cpu_c, 2),
         ratio_cpu_time_per_repeat=[round(g / c, 2) for g, c in zip(cpu_runs["gpu"], cpu_runs["cpu"])],
         actor_cpu_images_per_s_per_core=round(cpu, 1), actor_gpu_images_per_s_per_core=round(gpu, 1),
         ratio=round(gpu / cpu, 2),
         ratio_per_repeat=[round(g / c, 2) for g, c in zip(runs["gpu"], runs["cpu"])],
         all_cpu=[round(x, 1) for x in runs["cpu"]], all_gpu=[round(x, 1) for x in runs["gpu"]],
         all_cpu_per_cpu_s=[round(x, 1) for x in cpu_runs["cpu"]],
         all_gpu_per_cpu_s=[round(x, 1) for x in cpu_runs["gpu"]],
         breakdown_cpu_ms_per_image=actor_breakdown(spec, path, min(n, 4096), batch_size, repeat),
         load_avg=load_avg())


def _time_read(make, repeat):
    best = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        n = 0
        for b in make().iter_batches(batch_size=4096, batch_format="pyarrow"):
            n += b.num_rows
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    return n, best


def read_case(src: Path, pq_dir: Path, k: int, repeat: int):
    """Rows/s reading CIFAR-10 train (encoded bytes, no decode), best of `repeat`."""
    import ray

    from rayssl.data.pipeline import _read_parquet_units, read_concurrency

    files = sorted(str(f) for f in (pq_dir / "train").glob("*.parquet"))
    out = {"case": "read", "k": k}
    n, dt = _time_read(lambda: ray.data.read_parquet(files).select_columns(["image", "label"]), repeat)
    out.update(parquet_rows=n, parquet_s=round(dt, 2), parquet_images_per_s=round(n / dt, 1))
    # as the train stream reads (one epoch): read tasks in flight and blocks as build_train_dataset sets them
    spec = small_spec(name="parquet", path=str(pq_dir), num_actors=k)
    n, dt = _time_read(lambda: _read_parquet_units([(0, f) for f in files], ["image", "key"],
                                                   concurrency=read_concurrency(spec),
                                                   override_num_blocks=len(files)), repeat)
    out.update(parquet_units_s=round(dt, 2), parquet_units_images_per_s=round(n / dt, 1))
    n, dt = _time_read(lambda: ray.data.read_binary_files(str(src / "train"), include_paths=True), repeat)
    out.update(jpeg_files_rows=n, jpeg_files_s=round(dt, 2), jpeg_files_images_per_s=round(n / dt, 1))
    out["speedup"] = round(out["parquet_images_per_s"] / out["jpeg_files_images_per_s"], 2)
    out["speedup_units"] = round(out["parquet_units_images_per_s"] / out["jpeg_files_images_per_s"], 2)
    out["load_avg"] = load_avg()
    emit(**out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=2, help="CPUs for Ray (= multi-crop actors)")
    ap.add_argument("--cases", default="cifar,jpeg256,read")
    ap.add_argument("--work", default="/tmp/dinov3-bench", help="where prepared data is cached")
    ap.add_argument("--n-cifar", type=int, default=24000, help="rows consumed in the Ray run (cifar)")
    ap.add_argument("--n-jpeg", type=int, default=2048, help="generated 256 px JPEGs (rows per epoch)")
    ap.add_argument("--jpeg-shard", type=int, default=512,
                    help="rows per Parquet shard (jpeg256; prepare_data writes 5000, a shard is one read task)")
    ap.add_argument("--n-jpeg-ray", type=int, default=1280, help="rows consumed in the Ray run (jpeg256)")
    ap.add_argument("--cifar-batch", type=int, default=128, help="iter_torch_batches batch size (cifar)")
    ap.add_argument("--cifar-map-batch", type=int, default=512,
                    help="map_batch_size (cifar), as conf/data/cifar10.yaml")
    ap.add_argument("--jpeg-batch", type=int, default=64,
                    help="iter_torch_batches batch size (jpeg256), as conf/train/gpu.yaml")
    ap.add_argument("--jpeg-map-batch", type=int, default=32,
                    help="map_batch_size (jpeg256), as conf/data/imagenet.yaml")
    ap.add_argument("--n-gpuaug-jpeg", type=int, default=512, help="rows timed per mode (gpuaug, 224/96 px)")
    ap.add_argument("--n-gpuaug-cifar", type=int, default=8192, help="rows timed per mode (gpuaug, 32/16 px)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    cases = args.cases.split(",")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    import ray

    src, pq_dir = cifar_dirs(work) if ({"cifar", "read", "gpuaug"} & set(cases)) else (None, None)
    jdir = jpeg256_dir(work, args.n_jpeg, args.jpeg_shard) if ({"jpeg256", "gpuaug"} & set(cases)) else None
    if "gpuaug" in cases:  # one process, no Ray
        spec = small_spec(name="parquet", path=str(jdir), global_size=224, local_size=96, n_local=8,
                        map_batch_size=args.jpeg_map_batch)
        gpuaug_case("gpuaug_jpeg256_224_96", spec, jdir, args.n_gpuaug_jpeg, args.jpeg_batch, args.repeat)
        small = pq_dir if pq_dir is not None else jpeg256_dir(work, 8192, 4096, size=32)
        spec = small_spec(name="parquet", path=str(small), global_size=32, local_size=16, n_local=6,
                        map_batch_size=args.cifar_map_batch)
        gpuaug_case("gpuaug_cifar10_32_16" if pq_dir is not None else "gpuaug_jpeg32_32_16", spec, small,
                    args.n_gpuaug_cifar, args.cifar_batch, args.repeat)
        cases = [c for c in cases if c != "gpuaug"]
        if not cases:
            return
    # Workers start from the raylet's environment: let them import this checkout's packages
    # even where it is not pip-installed.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), str(REPO / "platform")] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    ray.init(num_cpus=args.k, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        if "cifar" in cases:
            if pq_dir is None:
                emit(case="cifar", skipped="shared CIFAR-10 not found (set DINOV3_CIFAR10_DIR)")
            else:
                spec = small_spec(name="parquet", path=str(pq_dir), global_size=32, local_size=16, n_local=6,
                                num_actors=args.k, map_batch_size=args.cifar_map_batch)
                crop_case("cifar10_parquet_32_16", spec, pq_dir, args.k, 8192, args.n_cifar, args.cifar_batch, 50000,
                          args.repeat)
        if "jpeg256" in cases:
            spec = small_spec(name="parquet", path=str(jdir), global_size=224, local_size=96, n_local=8,
                            num_actors=args.k, map_batch_size=args.jpeg_map_batch)
            crop_case("jpeg256_224_96", spec, jdir, args.k, 512, args.n_jpeg_ray, args.jpeg_batch, args.n_jpeg,
                      args.repeat)
        if "read" in cases:
            if pq_dir is None:
                emit(case="read", skipped="shared CIFAR-10 not found (set DINOV3_CIFAR10_DIR)")
            else:
                read_case(src, pq_dir, args.k, max(args.repeat, 3))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
