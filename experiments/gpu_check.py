#!/usr/bin/env python
"""The whole GPU check in one command, within a hard time budget (a lent GPU is scarce).

    python experiments/gpu_check.py --out gpu_out               # the GPU machine (bench_gpu.sh runs it)
    python experiments/gpu_check.py --out /tmp/gc               # no GPU: checks what it can, exits 3
    python experiments/gpu_check.py --out /tmp/gc --cpu-smoke   # no GPU: (b) and (c) for real, tiny, on the CPU

Sections, each in subprocesses with its own share of the budget (a hang or a crash loses only
its own rows):

  pre  the imports (torch, timm, ray, mlflow, hydra), on a GPU the method's CUDA tests
       (tests/test_method_cuda.py; CI has no GPU), 256 px JPEGs generated as Parquet shards
       on the machine's cores, and ``plan=true`` of (b)'s and (c)'s exact command lines (the
       configs compose and fit one GPU and this machine's cores).
  (a)  experiments/bench_step.py: ViT-S/16 and ViT-B/16, 224/96 px, 2 + 8 crops, batch 64,
       65536/8192 prototypes, heads 2048/256, bf16 autocast; eager with the split backward
       (the default: locals, then globals) and with one backward; ``--compile backbone`` (and
       ``--compile model`` when the budget allows). MFU = the FLOPs of one eager step (torch's
       FlopCounterMode) / (median s/step x 989 TFLOP/s, dense bf16 of an H100/H200). The original
       module (stable-pretraining's DINOv3, ../shared/baselines/seed_step_bench.py) runs side by
       side, under the same bf16 autocast, when SEED_BENCH (that script) and SEED_SITE (a folder
       holding stable-pretraining and what it needs beyond the machine's packages) are both set;
       "vs orig" = its s/step / ours (> 1: ours is faster).
  (b)  a real ``experiments/train.py experiment=imagenet_vitb16`` run on the generated JPEGs:
       Ray Train (1 GPU worker) fed by Ray Data multi-crop actors on the machine's cores, a few
       hundred steps, MLflow on sqlite; images/s, data_wait_frac and peak GPU memory read back
       from the MLflow run (its telemetry windows after the first, which holds the start-up),
       with the k-NN top-1.
  (c)  ``experiments/sweep.py experiment=imagenet_vits16``: 2 trials at 0.5 GPU each sharing the
       GPU, a few steps each; both child runs must finish (read back from MLflow).

It prints one table and writes OUT/gpu_check.json (every figure, each subprocess's command and
log tail), OUT/gpu_check.txt (the table) and OUT/gpu_check.log (the subprocesses' logs, the last
256 KiB of each). Scratch (data, MLflow stores, checkpoints) goes to a temporary folder that is
removed at the end (--keep-work keeps it). ``--sections b,c`` reruns some sections only (the
others count as neither passed nor failed). On SIGTERM (bench_gpu.sh's hard limit) the running
subprocess and everything it started are killed and the results so far are written.
Exit status: 0 a GPU was found and every section passed; 1 a section failed (or the run was
interrupted); 3 no GPU found (after the checks a CPU can do; the sections say "skipped: no GPU").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
EXIT_OK, EXIT_FAILED, EXIT_NO_GPU = 0, 1, 3

PEAK_BF16_TFLOPS = 989.0  # dense bf16, H100 / H200 SXM: the MFU denominator
# Shares of the time left after the pre-checks; a section's unused time passes to the next.
SHARES = {"a": 0.52, "b": 0.30, "c": 0.18}
DEFAULT_BUDGET_S = 525.0
# (b)'s sizing when (a) did not time ViT-B/16: the plan's ~286 images/s on an H100 at batch 64,
# and the seconds a run spends outside its steps (Ray, the stream's start, two k-NN evaluations,
# the final checkpoint and the exported encoder); torch.compile adds about a minute.
B_STEP_S_GUESS = 0.23
B_OVERHEAD_S = 80.0
B_COMPILE_S = 75.0

# (a): the step benchmark's workload (the ImageNet recipes' crops and heads, batch 64 per GPU)
BENCH_COMMON = ["--img-size", "224", "--local-size", "96", "--patch-size", "16", "--batch", "64", "--n-local", "8",
                "--n-cls-prototypes", "65536", "--n-patch-prototypes", "8192", "--hidden", "2048",
                "--bottleneck", "256", "--registers", "4"]
ENCODERS = {"vits16": "vit_small_patch16_224", "vitb16": "vit_base_patch16_224"}
# the micro workload of the CPU check (no GPU): seconds per step on one core
BENCH_MICRO = ["--device", "cpu", "--img-size", "32", "--local-size", "16", "--patch-size", "8", "--embed-dim", "64",
               "--depth", "2", "--num-heads", "2", "--batch", "8", "--n-local", "2", "--n-cls-prototypes", "256",
               "--n-patch-prototypes", "128", "--hidden", "128", "--bottleneck", "64", "--warmup", "1", "--steps", "2"]

SEED_RUNNER = '''\
import json, runpy, sys, torch
bench = sys.argv[1]
sys.argv = ["seed_step_bench.py", *sys.argv[2:]]
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
# the original script has no precision flag: it runs under the same bf16 autocast as ours
with torch.autocast("cuda", dtype=torch.bfloat16):
    runpy.run_path(bench, run_name="__main__")
print(json.dumps({"peak_cuda_mem_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)}))
'''

PROBE = '''\
import json, os, sys
out = {"python": sys.version.split()[0], "cpus": len(os.sched_getaffinity(0)), "import_errors": {}}
for name in ("torch", "timm", "numpy", "pyarrow", "PIL", "ray", "mlflow", "hydra", "omegaconf"):
    try:
        out[name] = getattr(__import__(name), "__version__", "?")
    except Exception as err:
        out[name] = None
        out["import_errors"][name] = (type(err).__name__ + ": " + str(err))[:300]
try:
    import torch
    out["cuda_available"] = bool(torch.cuda.is_available())
    out["torch_cuda"] = torch.version.cuda
    if out["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                   gpu_mem_gib=round(props.total_memory / 2**30, 1), gpu_sms=props.multi_processor_count)
except Exception as err:
    out["cuda_error"] = (type(err).__name__ + ": " + str(err))[:300]
print("PROBE " + json.dumps(out))
'''


# ---------------------------------------------------------------------------------------
# Subprocesses
# ---------------------------------------------------------------------------------------

class Interrupted(Exception):
    """SIGTERM (bench_gpu.sh's hard timeout): the running subprocess group is killed and the
    results so far are written."""


def _on_term(signum, frame):
    raise Interrupted(f"signal {signum}: the hard time limit")


class Runner:
    """Runs commands in their own process group under a timeout, logs under ``work``."""

    def __init__(self, work: Path, verbose: bool = True):
        self.work, self.verbose = work, verbose
        self.logs: List[Path] = []

    def __call__(self, name: str, cmd: Sequence[str], timeout: float, env: Optional[Dict[str, str]] = None,
                 stdin_text: Optional[str] = None) -> Dict[str, Any]:
        log = self.work / f"{len(self.logs):02d}_{name}.log"
        self.logs.append(log)
        cmd = [str(c) for c in cmd]
        full_env = child_env(env)
        t0 = time.monotonic()
        timed_out = False
        with open(log, "w") as f:
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            if timeout < 1:
                return {"rc": None, "timed_out": True, "wall_s": 0.0, "log": str(log), "cmd": shlex.join(cmd),
                        "output": ""}
            proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.PIPE if stdin_text is not None else subprocess.DEVNULL,
                                    start_new_session=True)
            try:
                if stdin_text is not None:
                    proc.stdin.write(stdin_text.encode())
                    proc.stdin.close()
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                kill_group(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
                kill_group(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = None
            finally:
                kill_group(proc.pid, signal.SIGKILL)  # what it left behind (Ray's processes share its session)
        wall = time.monotonic() - t0
        output = log.read_text(errors="replace")
        return {"rc": rc, "timed_out": timed_out, "wall_s": round(wall, 1), "log": str(log), "cmd": shlex.join(cmd),
                "output": output}


def session_pids(sid: int) -> List[int]:
    """Processes of the session ``sid`` (one this script started with start_new_session): Ray's
    workers put themselves in process groups of their own, but stay in the session."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 3 and int(fields[3]) == sid:
            pids.append(int(d))
    return pids


def kill_group(sid: int, sig: int) -> None:
    """``sig`` to the process group and the session ``sid`` started by :class:`Runner`."""
    try:
        os.killpg(sid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for pid in session_pids(sid):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def child_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    path = [str(REPO), str(REPO / "platform")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env.update(PYTHONPATH=os.pathsep.join(path), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               RAY_USAGE_STATS_ENABLED="0", RAY_DEDUP_LOGS="0", RAY_DATA_DISABLE_PROGRESS_BARS="1",
               WANDB_MODE="disabled",
               PYTHONWARNINGS="ignore::DeprecationWarning",
               # a loaded machine can take longer than Ray's defaults to start the node's agents
               RAY_agent_register_timeout_ms=env.get("RAY_agent_register_timeout_ms", "120000"),
               RAY_raylet_start_wait_time_s=env.get("RAY_raylet_start_wait_time_s", "120"))
    env.pop("RAY_ADDRESS", None)  # always a local Ray instance
    env.update(extra or {})
    return env


def json_lines(text: str) -> Dict[str, Any]:
    """Every line of ``text`` that is a JSON object, merged (later keys win)."""
    out: Dict[str, Any] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                out.update(obj)
    return out


def tail(text: str, lines: int = 40, width: int = 400) -> str:
    return "\n".join(line[:width] for line in text.splitlines()[-lines:])


def failure_reason(res: Dict[str, Any]) -> str:
    if res["timed_out"]:
        return f"timeout after {res['wall_s']:.0f} s"
    last = ""
    for line in reversed(res["output"].splitlines()):
        s = line.strip()
        if s and not s.startswith(("File ", "^", "~")) and ("Error" in s or "error" in s or "Exception" in s):
            last = s
            break
    return f"exit {res['rc']}" + (f": {last[:200]}" if last else "")


# ---------------------------------------------------------------------------------------
# Results: rows, sections, the table
# ---------------------------------------------------------------------------------------

COLUMNS = (("section", "section", 7), ("case", "case", 34), ("s_per_step", "s/step", 7),
           ("images_per_s", "images/s", 8), ("peak_gpu_mem_gib", "peak GiB", 8), ("mfu", "MFU", 6),
           ("vs_original", "vs orig", 7), ("data_wait_frac", "wait", 5), ("status", "status", 0),
           ("notes", "notes", 0))


def row(section: str, case: str, status: str, required: bool = True, **kw) -> Dict[str, Any]:
    r = {"section": section, "case": case, "status": status, "required": required, "s_per_step": None,
         "images_per_s": None, "peak_gpu_mem_gib": None, "mfu": None, "vs_original": None, "data_wait_frac": None,
         "notes": ""}
    r.update(kw)
    return r


def fmt(key: str, v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if key == "s_per_step":
        return f"{v:.4f}" if v < 1 else f"{v:.2f}"
    if key == "images_per_s":
        return f"{v:,.0f}"
    if key == "peak_gpu_mem_gib":
        return f"{v:.1f}"
    if key == "mfu":
        return f"{100 * v:.1f}%"
    if key == "data_wait_frac":
        return f"{v:.3f}"
    if key == "vs_original":
        return f"{v:.2f}x"
    return str(v)


def render_table(rows: List[Dict[str, Any]]) -> str:
    """One fixed-width table of every row."""
    cells = [[fmt(k, r.get(k)) for k, _, _ in COLUMNS] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h, _) in enumerate(COLUMNS)]
    widths[-1] = 0  # the last column is not padded

    def line(values):
        return "  ".join(v.ljust(w) if w else v for v, w in zip(values, widths)).rstrip()

    out = [line([h for _, h, _ in COLUMNS]), line(["-" * (w or 5) for w in widths])]
    out += [line(c) for c in cells]
    return "\n".join(out)


def row_ok(r: Dict[str, Any]) -> bool:
    return r["status"] == "ok"


def section_status(rows: List[Dict[str, Any]], section: str, skipped: Optional[str] = None) -> str:
    """``ok`` when every required row of the section is ok (and at least one ran), ``failed`` when
    a required one is not, or the reason it was skipped as a whole."""
    if skipped:
        return skipped
    mine = [r for r in rows if r["section"] == section]
    required = [r for r in mine if r["required"]]
    if not required:
        return "failed: nothing ran"
    bad = [r for r in required if not row_ok(r)]
    return "ok" if not bad else "failed: " + "; ".join(f"{r['case']}: {r['status']}" for r in bad)[:500]


def assemble(rows: List[Dict[str, Any]], sections: Dict[str, Dict[str, Any]], env: Dict[str, Any],
             gpu: Optional[str], started: float, budget_s: float, extra: Optional[Dict[str, Any]] = None
             ) -> Tuple[Dict[str, Any], int]:
    """The JSON document and the exit status."""
    passed = gpu is not None and any(s["status"] == "ok" for k, s in sections.items() if k != "pre") and all(
        s["status"] == "ok" or s["status"].startswith("skipped: not selected") for s in sections.values())
    code = EXIT_NO_GPU if gpu is None else (EXIT_OK if passed else EXIT_FAILED)
    doc = {
        "version": 1,
        "gpu": gpu,
        "no_gpu": gpu is None,
        "passed": passed,
        "exit_code": code,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "wall_s": round(time.time() - started, 1),
        "budget_s": budget_s,
        "sections": sections,
        "rows": rows,
        "env": env,
        "definitions": {
            "s_per_step": "median seconds per optimizer step (a); 64 images / images_per_s (b, c)",
            "images_per_s": "(a) batch / median step; (b, c) images over the seconds of the MLflow telemetry "
                            "windows after the first (train/images_per_s, weighted by window length)",
            "mfu": f"FLOPs of one eager step by torch.utils.flop_counter.FlopCounterMode / (s/step x "
                   f"{PEAK_BF16_TFLOPS:g} TFLOP/s dense bf16, H100/H200); (b) uses (a)'s ViT-B/16 count per image",
            "vs_original": "the original module's s/step / this row's s/step (> 1: this repo is faster)",
            "data_wait_frac": "share of the windows' time the step waited for the next batch (train/data_wait_frac)",
            "peak_gpu_mem_gib": "torch.cuda.max_memory_allocated (a: after the FLOP count; b, c: "
                                "train/peak_gpu_mem_gib)",
        },
    }
    doc.update(extra or {})
    return doc, code


# ---------------------------------------------------------------------------------------
# Generated data: 256 px JPEGs as Parquet shards
# ---------------------------------------------------------------------------------------

def _render_shard(job: Tuple[str, int, int, int, int]) -> int:
    """Render rows [start, start+n) of one split and write them as one Parquet shard."""
    path, start, n, size, split_id = job
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    sys.path[:0] = [str(REPO / "platform")]
    from rayssl.data.synthetic import render  # the quickstart's shapes (numpy only)

    images, labels, keys = [], [], []
    for i in range(start, start + n):
        rng = np.random.default_rng([split_id, i])
        label = i % 10
        arr = render(label, min(size, 64), rng)  # drawn at 64 px, then scaled up (4x cheaper than at 256)
        if size > 64:
            arr = np.asarray(Image.fromarray(arr).resize((size, size), Image.BILINEAR)).astype(np.int16)
            arr = np.clip(arr + rng.integers(-12, 13, arr.shape, dtype=np.int16), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        images.append(buf.getvalue())
        labels.append(label)
        keys.append(f"{'train' if split_id == 0 else 'val'}/{i:07d}")
    table = pa.table({"image": pa.array(images, pa.binary()), "label": pa.array(labels, pa.int64()),
                      "key": pa.array(keys, pa.string())})
    pq.write_table(table, path + ".tmp", compression="none", row_group_size=min(n, 1024))
    os.replace(path + ".tmp", path)
    return n


def make_dataset(root: Path, n_train: int, n_val: int, size: int, shard: int, procs: int) -> Dict[str, Any]:
    """``root/{train,val}/part-*.parquet`` (image JPEG bytes, label, key) + classes.json, rendered in
    ``procs`` processes."""
    import multiprocessing as mp

    t0 = time.monotonic()
    jobs = []
    for split, n, split_id in (("train", n_train, 0), ("val", n_val, 1)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for k, start in enumerate(range(0, n, shard)):
            jobs.append((str(root / split / f"part-{k:05d}.parquet"), start, min(shard, n - start), size, split_id))
    with mp.get_context("fork").Pool(max(1, min(procs, len(jobs))), initializer=signal.signal,
                                     initargs=(signal.SIGTERM, signal.SIG_DFL)) as pool:
        rows = sum(pool.map(_render_shard, jobs, chunksize=1))
    (root / "classes.json").write_text(json.dumps([f"shape{i}" for i in range(10)]))
    nbytes = sum(p.stat().st_size for p in root.rglob("*.parquet"))
    return {"path": str(root), "rows": rows, "train": n_train, "val": n_val, "size_px": size, "shard_rows": shard,
            "mib": round(nbytes / 2**20, 1), "seconds": round(time.monotonic() - t0, 1), "procs": procs}


def subset_view(src: Path, dst: Path, train_shards: int) -> None:
    """``dst``: the first ``train_shards`` train shards of ``src`` and all its val shards (links)."""
    for split in ("train", "val"):
        (dst / split).mkdir(parents=True, exist_ok=True)
        files = sorted((src / split).glob("*.parquet"))
        for f in files[:train_shards] if split == "train" else files:
            os.symlink(f, dst / split / f.name)
    shutil.copy(src / "classes.json", dst / "classes.json")


# ---------------------------------------------------------------------------------------
# Command lines of (b) and (c)
# ---------------------------------------------------------------------------------------

def overrides(d: Dict[str, Any]) -> List[str]:
    return [f"{k}={v}" for k, v in d.items()]


def train_overrides(data: Path, work: Path, n_train: int, cpus: int, steps_per_epoch: int, epochs: int,
                    compile_: bool, smoke: bool) -> Dict[str, Any]:
    """(b): the ViT-B/16 recipe on the generated JPEGs, 1 GPU worker, a few hundred steps."""
    o: Dict[str, Any] = {
        "experiment": "imagenet_vitb16", "data": "parquet", "data.path": data,
        "data.expected_train_images": n_train, "data.num_actors": max(1, cpus - 4),
        "data.knn_bank_size": 1024, "data.knn_query_size": 256,
        "train.num_workers": 1, "train.global_batch_size": 64, "train.epochs": epochs,
        "train.log_every": max(1, steps_per_epoch // 2), "train.knn_every": epochs,
        "train.compile": str(compile_).lower(), "train.storage_path": work / "ray_results",
        "tracking.uri": f"sqlite:///{work / 'mlflow_train.db'}", "tracking.experiment": "gpu-check-train",
        "ray.num_cpus": cpus,
    }
    if smoke:  # the same command at a CPU's scale
        o.update({"model": "micro", "data.global_size": 32, "data.local_size": 16, "data.eval_size": 32,
                  "data.n_local": 2, "data.num_actors": 1, "data.knn_bank_size": 128, "data.knn_query_size": 32,
                  "train.use_gpu": "false", "train.cpus_per_worker": 1, "train.global_batch_size": 32,
                  "train.compile": "false", "ray.num_cpus": 2})
    return o


def sweep_overrides(data: Path, work: Path, n_train: int, cpus: int, smoke: bool) -> Dict[str, Any]:
    """(c): 2 ViT-S/16 trials sharing the GPU (0.5 each), one short epoch each."""
    actors = max(1, (cpus - 2) // 2 - 2)  # per trial: 2 CPUs for the worker + actors; 2 trials fit
    o: Dict[str, Any] = {
        "experiment": "imagenet_vits16", "data": "parquet", "data.path": data,
        "data.expected_train_images": n_train, "data.num_actors": actors,
        "data.knn_bank_size": 512, "data.knn_query_size": 128,
        "train.num_workers": 1, "train.gpus_per_worker": 0.5, "train.global_batch_size": 64, "train.epochs": 1,
        "train.log_every": 4, "train.knn_every": 1, "train.compile": "false",
        "train.storage_path": work / "ray_results",
        "tracking.uri": f"sqlite:///{work / 'mlflow_sweep.db'}", "tracking.experiment": "gpu-check-sweep",
        "sweep.num_samples": 2, "sweep.max_concurrent_trials": 2, "sweep.scheduler": "none",
        "ray.num_cpus": cpus,
    }
    if smoke:
        o.update({"model": "micro", "data.global_size": 32, "data.local_size": 16, "data.eval_size": 32,
                  "data.n_local": 2, "data.num_actors": 1, "data.cpus_per_actor": 0.5, "data.knn_bank_size": 64,
                  "data.knn_query_size": 32, "train.use_gpu": "false", "train.cpus_per_worker": 0.5,
                  "train.global_batch_size": 32, "train.log_every": 2, "ray.num_cpus": 2})
    return o


# ---------------------------------------------------------------------------------------
# Read-back from MLflow (run as a subprocess: python gpu_check.py --readback KIND --uri URI ...)
# ---------------------------------------------------------------------------------------

def window_stats(points: Dict[str, List[Tuple[int, float]]], batch: int) -> Dict[str, Any]:
    """Aggregate the telemetry windows after the first: ``points`` maps train/images_per_s,
    train/data_wait_frac, train/peak_gpu_mem_gib to [(step, value)]."""
    ips = sorted(points.get("train/images_per_s", []))
    wait = dict(points.get("train/data_wait_frac", []))
    mem = [v for _, v in points.get("train/peak_gpu_mem_gib", [])]
    out: Dict[str, Any] = {"windows": len(ips), "last_step": ips[-1][0] if ips else None,
                           "peak_gpu_mem_gib": round(max(mem), 2) if mem else None}
    images = seconds = waited = 0.0
    prev = ips[0][0] if ips else 0
    for step, v in ips[1:]:
        n = (step - prev) * batch
        prev = step
        if v <= 0 or n <= 0:
            continue
        s = n / v
        images, seconds = images + n, seconds + s
        waited += wait.get(step, 0.0) * s
    if seconds > 0:
        out.update(images_per_s=round(images / seconds, 1), data_wait_frac=round(waited / seconds, 4),
                   s_per_step=round(batch / (images / seconds), 4), windows_used=len(ips) - 1,
                   timed_s=round(seconds, 1))
    elif ips:  # a single window: use it, start-up included
        step, v = ips[0]
        out.update(images_per_s=round(v, 1), data_wait_frac=round(wait.get(step, 0.0), 4),
                   s_per_step=round(batch / v, 4) if v > 0 else None, windows_used=1)
    return out


def _run_record(client, run, batch: int) -> Dict[str, Any]:
    rid = run.info.run_id
    points = {k: [(m.step, m.value) for m in client.get_metric_history(rid, k)]
              for k in ("train/images_per_s", "train/data_wait_frac", "train/peak_gpu_mem_gib")}
    rec = {"run_id": rid, "name": run.info.run_name, "status": run.info.status,
           "start_ms": run.info.start_time, "end_ms": run.info.end_time,
           "error": run.data.tags.get("rayssl.error")}
    rec.update(window_stats(points, batch))
    m = run.data.metrics
    for k in ("knn_top1", "knn_top1_init", "loss", "step", "epoch", "data_skipped"):
        if k in m:
            rec[k] = round(m[k], 4)
    return rec


def readback(kind: str, uri: str, experiment: str) -> Dict[str, Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {"error": f"no MLflow experiment {experiment!r} in {uri}"}
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=100)
    role = "train" if kind == "train" else "sweep"
    mine = [r for r in runs if r.data.tags.get("rayssl.role") == role]
    if not mine:
        return {"error": f"no run with rayssl.role={role} in {uri} ({len(runs)} runs)"}
    top = mine[0]
    batch = int(float(top.data.params.get("train.global_batch_size", 64)))
    out = {"run": _run_record(client, top, batch)}
    if kind == "sweep":
        kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == top.info.run_id]
        out["children"] = [_run_record(client, r, batch) for r in sorted(kids, key=lambda r: r.info.start_time)]
        done = [c for c in out["children"] if c["end_ms"]]
        if len(done) >= 2:  # both trials ran at once: each started before the other ended
            out["overlap_s"] = round(max(0, min(c["end_ms"] for c in done) - max(c["start_ms"] for c in done))
                                     / 1000, 1)
        try:
            out["registered_models"] = [m.name for m in client.search_registered_models()]
        except Exception as err:  # noqa: BLE001
            out["registered_models_error"] = str(err)[:200]
    return out


# ---------------------------------------------------------------------------------------
# The check
# ---------------------------------------------------------------------------------------

class Check:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        work_parent = Path(args.work).resolve() if args.work else None
        if work_parent:
            work_parent.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check_", dir=work_parent))
        self.run = Runner(self.work)
        self.started_wall = time.time()
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget
        self.rows: List[Dict[str, Any]] = []
        self.sections: Dict[str, Dict[str, Any]] = {}
        self.env: Dict[str, Any] = {}
        self.extra: Dict[str, Any] = {"commands": {}, "log_tails": {}, "plans": {}, "work": str(self.work)}
        self.gpu: Optional[str] = None
        self.cpus = len(os.sched_getaffinity(0))
        self.flops_per_image: Dict[str, float] = {}

    # ---- helpers ----
    def left(self) -> float:
        return self.deadline - time.monotonic()

    def say(self, msg: str) -> None:
        print(f"[gpu_check {time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)

    def add(self, r: Dict[str, Any]) -> Dict[str, Any]:
        self.rows.append(r)
        vals = ", ".join(f"{h} {fmt(k, r.get(k))}" for k, h, _ in COLUMNS[2:8] if r.get(k) is not None)
        self.say(f"({r['section']}) {r['case']}: {r['status']}" + (f" [{vals}]" if vals else "")
                 + (f" {r['notes']}" if r.get("notes") else ""))
        return r

    def keep_log(self, key: str, res: Dict[str, Any], failed: bool) -> None:
        self.extra["commands"][key] = res["cmd"]
        if failed:
            self.extra["log_tails"][key] = tail(res["output"], 60)
            print(f"---- {key}: last lines of {res['log']}\n{tail(res['output'], 30)}\n----", flush=True)

    # ---- pre-checks ----
    def probe(self) -> None:
        res = self.run("probe", [PY, "-c", PROBE], timeout=min(180, max(30, self.left())))
        line = next((ln for ln in res["output"].splitlines() if ln.startswith("PROBE ")), None)
        self.env = json.loads(line[6:]) if line else {"probe_error": failure_reason(res)}
        self.env["machine_cpus"] = self.cpus
        if shutil.which("nvidia-smi"):
            try:
                smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                      "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
                self.env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()[:300]
            except (OSError, subprocess.SubprocessError) as err:
                self.env["nvidia_smi"] = f"failed: {err}"
        self.gpu = self.env.get("gpu") if self.env.get("cuda_available") else None
        errs = self.env.get("import_errors") or {}
        missing = [m for m in ("torch", "timm", "ray", "mlflow", "hydra") if self.env.get(m) is None]
        versions = ", ".join(f"{m} {self.env.get(m)}" for m in ("torch", "timm", "ray", "mlflow", "hydra", "pyarrow"))
        self.add(row("pre", "imports", "ok" if not missing else f"failed: {', '.join(missing)} missing",
                     notes=versions + ("; " + "; ".join(f"{k}: {v}" for k, v in errs.items()) if errs else "")))
        if self.gpu:
            self.say(f"GPU: {self.gpu} ({self.env.get('gpu_mem_gib')} GiB), {self.cpus} cores, "
                     f"torch {self.env.get('torch')} CUDA {self.env.get('torch_cuda')}")
        else:
            smi = self.env.get("nvidia_smi")
            why = self.env.get("cuda_error") or ("torch.cuda.is_available() is False"
                                                 + (f"; nvidia-smi: {smi}" if smi else "; no nvidia-smi"))
            self.say(f"no GPU found ({why}): checking what a CPU can, then exit {EXIT_NO_GPU}")
            self.env["no_gpu_reason"] = why

    def data(self, root: Path, n_train: int, n_val: int, size: int, shard: int) -> Optional[Dict[str, Any]]:
        t0 = time.monotonic()
        try:
            info = make_dataset(root, n_train, n_val, size, shard, procs=max(1, self.cpus))
        except Exception as err:  # noqa: BLE001
            self.add(row("pre", f"generate {size} px JPEGs", f"failed: {type(err).__name__}: {err}"[:300]))
            return None
        self.extra["dataset"] = info
        self.add(row("pre", f"generate {n_train}+{n_val} {size} px JPEGs", "ok",
                     notes=f"{info['mib']} MiB Parquet in {time.monotonic() - t0:.1f} s on {info['procs']} procs"))
        return info

    def plan(self, key: str, script: str, ovr: Dict[str, Any], simulate_gpu: bool) -> bool:
        env = {"CUDA_VISIBLE_DEVICES": "0"} if simulate_gpu else {}  # plan against 1 GPU + this many cores
        res = self.run(f"plan_{key}", [PY, f"experiments/{script}", *overrides(ovr), "plan=true"],
                       timeout=min(120, max(5, self.left())), env=env)
        ok = res["rc"] == 0
        self.keep_log(f"plan_{key}", res, not ok)
        lines = [ln for ln in res["output"].splitlines()[1:] if ln.strip() and not ln.startswith("20")]
        self.extra["plans"][key] = lines[-80:]
        note = "exact command line" + (" (1 GPU simulated)" if simulate_gpu else "")
        self.add(row("pre", f"plan=true {script} ({key})", "ok" if ok else "failed: " + failure_reason(res),
                     notes=note))
        return ok

    def cuda_tests(self) -> None:
        """The method's CUDA tests (they skip without a GPU, and CI has none)."""
        res = self.run("cuda_tests", [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_method_cuda.py"],
                       timeout=min(150, max(5, self.left())))
        ok = res["rc"] == 0
        self.keep_log("cuda_tests", res, not ok)
        summary = next((ln.strip("= ") for ln in reversed(res["output"].splitlines())
                        if " passed" in ln or " failed" in ln or " error" in ln), "")
        self.add(row("pre", "tests/test_method_cuda.py", "ok" if ok else "failed: " + failure_reason(res),
                     notes=summary[:200]))

    def micro_step(self, extra: Sequence[str] = ()) -> None:
        js = self.work / "micro_step.json"
        res = self.run("bench_micro", [PY, "experiments/bench_step.py", *BENCH_MICRO, *extra, "--json", js],
                       timeout=min(180, max(5, self.left())))
        got = json_lines(res["output"])
        ok = res["rc"] == 0 and got.get("all_finite") is True
        self.keep_log("bench_micro" + "".join(extra), res, not ok)
        self.add(row("pre", "bench_step micro CPU step" + (" " + " ".join(extra) if extra else ""),
                     "ok" if ok else "failed: " + (failure_reason(res) if res["rc"] != 0 else "non-finite loss"),
                     s_per_step=got.get("median_s_per_step"),
                     notes=f"{got.get('flops_per_step', 0) / 1e9:.2f} GFLOP/step" if ok else ""))

    # ---- (a) ----
    def bench_cases(self) -> List[Dict[str, Any]]:
        seed_bench, seed_site = os.environ.get("SEED_BENCH"), os.environ.get("SEED_SITE")
        seed = bool(seed_bench and seed_site and Path(seed_bench).is_file() and Path(seed_site).is_dir())
        if seed:
            self.seed_note = ""
        elif not (seed_bench or seed_site):
            self.seed_note = "set SEED_BENCH=seed_step_bench.py and SEED_SITE=a folder holding stable-pretraining"
        else:
            self.seed_note = (f"SEED_BENCH={seed_bench!r} (a file: {bool(seed_bench) and Path(seed_bench).is_file()}), "
                              f"SEED_SITE={seed_site!r} (a folder: {bool(seed_site) and Path(seed_site).is_dir()})")
        cases: List[Dict[str, Any]] = []
        for vit in ("vits16", "vitb16"):
            cases.append(dict(name=f"{vit} eager split", vit=vit, flags=[], kind="eager"))
            if seed:
                cases.append(dict(name=f"{vit} original module", vit=vit, flags=[], kind="seed"))
            cases.append(dict(name=f"{vit} eager one backward", vit=vit, flags=["--no-split-backward"], kind="eager"))
        for vit in ("vits16", "vitb16"):
            cases.append(dict(name=f"{vit} compile backbone", vit=vit, flags=["--compile", "backbone"], kind="compile"))
        cases.append(dict(name="vits16 compile model", vit="vits16", flags=["--compile", "model"], kind="compile",
                          required=False, min_left=110))
        return cases

    def section_a(self, deadline: float) -> None:
        a = self.args
        caps = {"eager": (a.eager_cap, 25), "seed": (a.eager_cap + 30, 30), "compile": (a.compile_cap, 60)}
        seed_s: Dict[str, float] = {}
        for case in self.bench_cases():
            cap, min_left = caps[case["kind"]]
            min_left = case.get("min_left", min_left)
            left = deadline - time.monotonic()
            required = case.get("required", True)
            if left < min_left:
                self.add(row("a", case["name"], f"skipped: budget ({left:.0f} s left of section a, needs {min_left})",
                             required=required))
                continue
            key = case["name"].replace(" ", "_")
            js = self.work / f"{key}.json"
            warm = "5" if case["kind"] == "compile" else "3"  # compilation happens in the first step
            args = ["--device", "cuda", "--encoder", ENCODERS[case["vit"]], *BENCH_COMMON, "--warmup", warm,
                    "--steps", str(a.steps)]
            if case["kind"] == "seed":
                runner = self.work / "seed_runner.py"
                runner.write_text(SEED_RUNNER)
                site, bench = (str(Path(os.environ[k]).resolve()) for k in ("SEED_SITE", "SEED_BENCH"))
                env = {"PYTHONPATH": os.pathsep.join([site, child_env()["PYTHONPATH"]])}
                res = self.run(key, [PY, runner, bench, *args, "--json", js],
                               timeout=min(cap, left), env=env)
            else:
                res = self.run(key, [PY, "experiments/bench_step.py", *args, "--precision", "bf16", *case["flags"],
                                     "--json", js], timeout=min(cap, left))
            got = json_lines(res["output"])
            ok = res["rc"] == 0 and "median_s_per_step" in got and got.get("all_finite", False) is True
            self.keep_log(key, res, not ok)
            status = "ok" if ok else ("failed: " + failure_reason(res) if res["rc"] != 0 or res["timed_out"]
                                      else "failed: " + ("non-finite loss" if got else "no result line"))
            r = row("a", case["name"], status, required=required)
            if got:
                s = got.get("median_s_per_step")
                r.update(s_per_step=s, images_per_s=round(64 / s, 1) if s else None,
                         peak_gpu_mem_gib=round(got["peak_cuda_mem_mib"] / 1024, 2) if got.get("peak_cuda_mem_mib")
                         else None, mfu=got.get("mfu"))
                notes = []
                if got.get("warmup_s") is not None:
                    notes.append(f"warm-up {got['warmup_s']:.0f} s")
                if got.get("flops_per_step"):
                    notes.append(f"{got['flops_per_step'] / 1e12:.2f} TFLOP/step")
                    if case["kind"] == "eager" and "--no-split-backward" not in case["flags"]:
                        self.flops_per_image[case["vit"]] = got["flops_per_step"] / 64
                if case["kind"] == "seed":
                    notes.append(f"stable-pretraining {got.get('stable_pretraining', '?')}, bf16 autocast")
                    if ok:
                        seed_s[case["vit"]] = s
                r["notes"] = ", ".join(notes)
                r["detail"] = {k: got.get(k) for k in ("median_s_per_step", "min_s_per_step", "max_s_per_step",
                                                        "median_phase_s", "warmup_s", "flops_per_step",
                                                        "achieved_tflops", "mfu", "peak_cuda_mem_mib", "gpu",
                                                        "last_losses", "split_backward", "compile", "torch")}
            r["wall_s"] = res["wall_s"]
            self.add(r)
        for r in self.rows:  # the ratio against the original module, same backbone
            if r["section"] == "a" and r["s_per_step"] and "original" not in r["case"]:
                vit = r["case"].split()[0]
                if vit in seed_s:
                    r["vs_original"] = round(seed_s[vit] / r["s_per_step"], 3)
        if self.seed_note:
            self.add(row("a", "original module", "not installed", required=False, notes=self.seed_note))

    # ---- (b) ----
    def b_epochs(self, left: float, spe: int, max_epochs: int) -> Tuple[int, str]:
        """(b)'s epochs: as many as ``left`` seconds hold (at least 2, at most ``max_epochs``), from
        (a)'s ViT-B/16 step time when it ran, else the plan's rate on an H100."""
        if not self.gpu:
            return max_epochs, "cpu smoke"
        measured = next((r["s_per_step"] for r in self.rows if r["case"] == "vitb16 eager split"
                         and row_ok(r) and r["s_per_step"]), None)
        step_s = 1.15 * measured if measured else B_STEP_S_GUESS
        overhead = B_OVERHEAD_S + (B_COMPILE_S if self.args.train_compile else 0)
        fit = int((left - overhead) // (spe * step_s))
        epochs = max(2, min(max_epochs, fit))
        return epochs, (f"{epochs} epochs: {left:.0f} s left, ~{step_s:.3f} s/step "
                        f"({'(a) x 1.15' if measured else 'guess'}), ~{overhead:.0f} s start-up and evaluations")

    def section_b(self, deadline: float, ovr: Dict[str, Any], spe: int, max_epochs: int) -> None:
        left = deadline - time.monotonic()
        if left < 45:
            self.add(row("b", "vitb16 train.py", f"skipped: budget ({left:.0f} s left)"))
            return
        epochs, why = self.b_epochs(left - 15, spe, max_epochs)
        ovr = dict(ovr, **{"train.epochs": epochs, "train.knn_every": epochs})
        self.extra["overrides"]["b"] = overrides(ovr)
        self.say(f"(b) {why}")
        expect_steps = spe * epochs
        res = self.run("train_vitb16", [PY, "experiments/train.py", *overrides(ovr)], timeout=max(1.0, left - 15))
        rb = self.readback("train", ovr)
        run = rb.get("run") or {}
        problems = []
        if res["rc"] != 0:
            problems.append(failure_reason(res))
        if rb.get("error"):
            problems.append("read-back: " + rb["error"])
        elif run.get("status") != "FINISHED":
            problems.append(f"MLflow run {run.get('status')}"
                            + (f" ({run['error'][:150]})" if run.get("error") else ""))
        if run and (run.get("last_step") or 0) < expect_steps:
            problems.append(f"last telemetry step {run.get('last_step')} < {expect_steps}")
        if run and not run.get("images_per_s"):
            problems.append("no train/images_per_s")
        if run and self.gpu and run.get("peak_gpu_mem_gib") is None:
            problems.append("no train/peak_gpu_mem_gib")
        if run and "knn_top1" not in run:
            problems.append("no knn_top1")
        self.keep_log("train_vitb16", res, bool(problems))
        smoke = " (cpu smoke)" if not self.gpu else ""
        r = row("b", f"vitb16 train.py, {ovr['data.num_actors']} data actors{smoke}",
                "ok" if not problems else "failed: " + "; ".join(problems)[:400],
                s_per_step=run.get("s_per_step"), images_per_s=run.get("images_per_s"),
                peak_gpu_mem_gib=run.get("peak_gpu_mem_gib"), data_wait_frac=run.get("data_wait_frac"))
        fpi = self.flops_per_image.get("vitb16")
        if fpi and run.get("images_per_s") and self.gpu:
            r["mfu"] = round(fpi * run["images_per_s"] / (PEAK_BF16_TFLOPS * 1e12), 4)
        if "knn_top1" in run:
            r["notes"] = (f"k-NN {run['knn_top1']:.1f}% (init {run.get('knn_top1_init', float('nan')):.1f}%), "
                          f"{run.get('last_step')} steps, {run.get('windows_used', 0)} windows, {res['wall_s']:.0f} s")
        r["detail"] = {"run": run, "wall_s": res["wall_s"], "compile": ovr["train.compile"]}
        self.add(r)

    # ---- (c) ----
    def section_c(self, deadline: float, ovr: Dict[str, Any]) -> None:
        left = deadline - time.monotonic()
        if left < 40:
            self.add(row("c", "vits16 sweep 2 trials x 0.5 GPU", f"skipped: budget ({left:.0f} s left)"))
            return
        res = self.run("sweep_vits16", [PY, "experiments/sweep.py", *overrides(ovr)], timeout=max(1.0, left - 10))
        rb = self.readback("sweep", ovr)
        parent, kids = rb.get("run") or {}, rb.get("children") or []
        problems = []
        if res["rc"] != 0:
            problems.append(failure_reason(res))
        if rb.get("error"):
            problems.append("read-back: " + rb["error"])
        finished = [k for k in kids if k["status"] == "FINISHED"]
        if not rb.get("error"):
            if parent.get("status") != "FINISHED":
                problems.append(f"parent run {parent.get('status')}")
            if len(finished) < 2:
                problems.append(f"{len(finished)} of {len(kids)} child runs FINISHED (2 expected)")
        self.keep_log("sweep_vits16", res, bool(problems))
        smoke = " (cpu smoke)" if not self.gpu else ""
        share = f" ({ovr['train.gpus_per_worker']} GPU)" if self.gpu else ""
        for i, k in enumerate(kids):
            ok = k["status"] == "FINISHED"
            r = row("c", f"vits16 trial {i + 1}{share}{smoke}", "ok" if ok else f"failed: run {k['status']}"
                    + (f" ({k['error'][:150]})" if k.get("error") else ""), required=False,
                    s_per_step=k.get("s_per_step"), images_per_s=k.get("images_per_s"),
                    peak_gpu_mem_gib=k.get("peak_gpu_mem_gib"), data_wait_frac=k.get("data_wait_frac"))
            if "knn_top1" in k:
                r["notes"] = f"k-NN {k['knn_top1']:.1f}%, {k.get('last_step')} steps"
            r["detail"] = k
            self.add(r)
        overlap = rb.get("overlap_s")
        notes = (f"{len(finished)}/{len(kids)} trials FINISHED"
                 + (f", ran together for {overlap:.0f} s" if overlap is not None else "")
                 + f", {res['wall_s']:.0f} s")
        r = row("c", f"vits16 sweep, 2 trials{smoke}", "ok" if not problems else "failed: " + "; ".join(problems)[:400],
                notes=notes)
        r["detail"] = {"parent": parent, "overlap_s": overlap, "registered_models": rb.get("registered_models"),
                       "wall_s": res["wall_s"]}
        self.add(r)

    def readback(self, kind: str, ovr: Dict[str, Any]) -> Dict[str, Any]:
        res = self.run(f"readback_{kind}", [PY, Path(__file__).resolve(), "--readback", kind,
                                            "--uri", ovr["tracking.uri"], "--experiment", ovr["tracking.experiment"]],
                       timeout=90)
        got = json_lines(res["output"])
        if res["rc"] != 0 or not got:
            self.keep_log(f"readback_{kind}", res, True)
            return {"error": failure_reason(res)}
        return got

    # ---- the whole ----
    def main(self) -> int:
        try:
            self.run_sections()
        except (Interrupted, KeyboardInterrupt) as err:
            self.say(f"interrupted: {err or 'KeyboardInterrupt'}")
            self.extra["interrupted"] = str(err) or "KeyboardInterrupt"
            for key in ("pre", "a", "b", "c"):
                self.sections.setdefault(key, {"status": "failed: interrupted"})
        return self.finish()

    def run_sections(self) -> None:
        a = self.args
        chosen = [x for x in ("a", "b", "c") if x in a.sections.split(",")]
        self.say(f"budget {a.budget:.0f} s, sections {','.join(chosen)}, work dir {self.work}, out {self.out}")
        self.probe()
        imports_ok = self.rows[-1]["status"] == "ok"
        smoke = not self.gpu and a.cpu_smoke
        # the GPU machine's sizes; without a GPU the same generator and command lines, small
        if self.gpu:
            n_train, n_val, size, shard, batch, cpus = a.images, 512, 256, 512, 64, self.cpus
        elif smoke:  # run for real on this CPU: micro model, 32/16 px crops, 2 Ray CPUs
            n_train, n_val, size, shard, batch, cpus = 256, 64, 64, 128, 32, 2
        else:  # planned only: the GPU machine's command lines (a.plan_cpus cores, 1 GPU simulated)
            n_train, n_val, size, shard, batch, cpus = 128, 32, 256, 64, 64, a.plan_cpus
        if self.gpu and not a.no_cuda_tests:
            self.cuda_tests()
        data = self.data(self.work / "data", n_train, n_val, size, shard) if {"b", "c"} & set(chosen) else None
        c_data = self.work / "data_c"
        n_c = max(1, min(n_train, a.sweep_images if self.gpu else 128) // shard) * shard
        if data:
            subset_view(self.work / "data", c_data, n_c // shard)
        spe = max(1, n_train // batch)
        epochs = max(2, math.ceil(a.steps_b / spe)) if self.gpu else 2
        b_ovr = train_overrides(self.work / "data", self.work, n_train, cpus, spe, epochs, a.train_compile, smoke)
        c_ovr = sweep_overrides(c_data, self.work, n_c, cpus, smoke)
        self.extra["overrides"] = {"b": overrides(b_ovr), "c": overrides(c_ovr)}
        plans_ok = {"b": False, "c": False}
        if imports_ok and data:
            simulate = not self.gpu and not smoke
            if "b" in chosen:
                plans_ok["b"] = self.plan("b", "train.py", b_ovr, simulate_gpu=simulate)
            if "c" in chosen:
                plans_ok["c"] = self.plan("c", "sweep.py", c_ovr, simulate_gpu=simulate)
        if not self.gpu and "a" in chosen:
            self.micro_step()
            if smoke:
                self.micro_step(["--no-split-backward"])
        self.sections["pre"] = {"status": section_status(self.rows, "pre"),
                                "wall_s": round(time.monotonic() - self.t0, 1)}

        def share(key: str) -> float:  # this section's part of the time left (the later ones keep theirs)
            later = [k for k in chosen if k >= key]
            return SHARES[key] / sum(SHARES[k] for k in later) if key in later else 0.0

        for key in ("a", "b", "c"):
            t = time.monotonic()
            skip = None
            if key not in chosen:
                skip = "skipped: not selected (--sections)"
            elif not self.gpu and not (smoke and key in "bc"):
                skip = "skipped: no GPU"
            elif key in "bc" and not (imports_ok and data and plans_ok[key]):
                skip = "failed: a pre-check it needs failed (imports, data or plan)"
            elif key == "a":
                self.section_a(t + self.left() * share("a"))
            elif key == "b":
                self.section_b(t + self.left() * share("b"), b_ovr, spe, epochs)
            else:
                self.section_c(t + self.left(), c_ovr)
            self.sections[key] = {"status": section_status(self.rows, key, skip),
                                  "wall_s": round(time.monotonic() - t, 1)}
            if skip:
                name = {"a": "step benchmark", "b": "vitb16 train.py + Ray Data",
                        "c": "vits16 sweep, 2 trials x 0.5 GPU"}[key]
                self.rows.append(row(key, name, skip, required=False))

    def finish(self) -> int:
        self.extra["cpu_smoke"] = bool(self.args.cpu_smoke and not self.gpu)
        doc, code = assemble(self.rows, self.sections, self.env, self.gpu, self.started_wall, self.args.budget,
                             self.extra)
        table = render_table(self.rows)
        summary = [f"sections: " + ", ".join(f"{k} {v['status'].split(':')[0]}" for k, v in self.sections.items())]
        if self.gpu is None:
            summary.append(f"no GPU found ({self.env.get('no_gpu_reason', '?')}): exit {code}")
        else:
            summary.append(f"GPU {self.gpu}: {'PASSED' if doc['passed'] else 'FAILED'} (exit {code}), "
                           f"{doc['wall_s']:.0f} s of a {self.args.budget:.0f} s budget")
        text = table + "\n\n" + "\n".join(summary) + "\n"
        (self.out / "gpu_check.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
        (self.out / "gpu_check.txt").write_text(text)
        with open(self.out / "gpu_check.log", "w") as f:  # every subprocess's log, the last 256 KiB of each
            for log in self.run.logs:
                body = log.read_text(errors="replace") if log.exists() else ""
                f.write(f"===== {log.name} ({len(body)} chars)\n{body[-(256 << 10):]}\n")
        print("\n" + text, flush=True)
        if not self.args.keep_work:
            shutil.rmtree(self.work, ignore_errors=True)
        return code


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_out"), help="where the JSON, table and logs go")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for the whole check")
    p.add_argument("--work", default=None, help="parent of the scratch folder (default: the system's temp dir)")
    p.add_argument("--keep-work", action="store_true", help="keep the scratch folder (data, MLflow stores, logs)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="without a GPU: also run (b) and (c) for real at a CPU's scale (minutes)")
    p.add_argument("--sections", default="a,b,c", help="which of a, b, c to run (the others are skipped)")
    p.add_argument("--no-cuda-tests", action="store_true", help="skip tests/test_method_cuda.py (pre, GPU only)")
    p.add_argument("--images", type=int, default=4096, help="(b) generated train images (+512 val)")
    p.add_argument("--steps-b", type=int, default=320,
                   help="(b) at most this many steps (whole epochs; fewer when the budget is short, at least 2 epochs)")
    p.add_argument("--sweep-images", type=int, default=1024, help="(c) train images per trial epoch")
    p.add_argument("--train-compile", action="store_true", help="(b) with train.compile=true (the recipe's value)")
    p.add_argument("--steps", type=int, default=20, help="(a) timed steps per case")
    p.add_argument("--eager-cap", type=float, default=90, help="(a) seconds at most per eager case")
    p.add_argument("--compile-cap", type=float, default=200, help="(a) seconds at most per compiled case")
    p.add_argument("--plan-cpus", type=int, default=16, help="without a GPU: the cores the plans assume")
    p.add_argument("--readback", choices=("train", "sweep"), help=argparse.SUPPRESS)
    p.add_argument("--uri", help=argparse.SUPPRESS)
    p.add_argument("--experiment", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.readback:
        print(json.dumps(readback(args.readback, args.uri, args.experiment), default=str))
        return 0
    signal.signal(signal.SIGTERM, _on_term)
    return Check(args).main()


if __name__ == "__main__":
    sys.exit(main())
