"""experiments/gpu_check.py (what experiments/bench_gpu.sh runs on a GPU machine): without a GPU it
says so, checks what a CPU can and exits 3; its table, JSON and read-back arithmetic."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "experiments" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow  # generates images and plans in subprocesses: ~40 s
@pytest.mark.timeout(300)
def test_without_a_gpu_it_checks_what_it_can_and_exits_3(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")  # no GPU, even on a GPU machine
    proc = subprocess.run([sys.executable, "experiments/gpu_check.py", "--out", str(out), "--work", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 3, text[-5000:]
    assert "no GPU found" in text, text[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.txt"]

    doc = json.loads((out / "gpu_check.json").read_text())
    assert doc["no_gpu"] is True and doc["gpu"] is None and doc["passed"] is False and doc["exit_code"] == 3
    for key in ("a", "b", "c"):
        assert doc["sections"][key]["status"] == "skipped: no GPU", doc["sections"]
    # what a CPU can check passed: imports, the generated JPEGs, plan=true of (b) and (c)'s exact
    # command lines (composed, validated, fitting 1 GPU + 16 cores), a micro step of bench_step
    assert doc["sections"]["pre"]["status"] == "ok", doc["sections"]["pre"]
    pre = {r["case"]: r for r in doc["rows"] if r["section"] == "pre"}
    assert all(r["status"] == "ok" for r in pre.values()), pre
    assert {"imports", "plan=true train.py (b)", "plan=true sweep.py (c)", "bench_step micro CPU step"} <= set(pre)
    assert any(c.startswith("generate ") for c in pre)
    assert pre["bench_step micro CPU step"]["s_per_step"] > 0
    assert "experiment=imagenet_vitb16" in doc["overrides"]["b"] and "train.num_workers=1" in doc["overrides"]["b"]
    assert "train.gpus_per_worker=0.5" in doc["overrides"]["c"] and "sweep.num_samples=2" in doc["overrides"]["c"]
    assert any("14 CPUs, 1 GPUs" in line for line in doc["plans"]["b"]), doc["plans"]["b"]
    assert any("2 at a time" in line for line in doc["plans"]["c"]), doc["plans"]["c"]

    table = (out / "gpu_check.txt").read_text()
    assert table.splitlines()[0].split()[:4] == ["section", "case", "s/step", "images/s"]
    assert "skipped: no GPU" in table and "no GPU found" in table
    assert not list(tmp_path.glob("gpu_check_*")), "the scratch folder is removed"


def test_table_sections_and_exit_status():
    gc = gpu_check()
    rows = [
        gc.row("pre", "imports", "ok"),
        gc.row("a", "vits16 eager split", "ok", s_per_step=0.1234, images_per_s=518.6, peak_gpu_mem_gib=20.25,
               mfu=0.2512, vs_original=1.8),
        gc.row("a", "vits16 compile model", "skipped: budget (10 s left)", required=False),
        gc.row("b", "vitb16 train.py", "ok", images_per_s=300.0, data_wait_frac=0.0123, notes="k-NN 12.0%"),
        gc.row("c", "vits16 sweep, 2 trials", "failed: 1 of 2 child runs FINISHED"),
    ]
    table = gc.render_table(rows)
    lines = table.splitlines()
    assert lines[0].split() == ["section", "case", "s/step", "images/s", "peak", "GiB", "MFU", "vs", "orig", "wait",
                                "status", "notes"]
    assert len(lines) == 2 + len(rows)
    a = lines[3]
    assert "0.1234" in a and "519" in a and "20.2" in a and "25.1%" in a and "1.80x" in a
    assert "0.012" in lines[5] and "k-NN 12.0%" in lines[5]

    assert gc.section_status(rows, "a") == "ok"  # an optional row skipped for the budget does not fail it
    assert gc.section_status(rows, "c").startswith("failed: vits16 sweep")
    assert gc.section_status(rows, "b", skipped="skipped: no GPU") == "skipped: no GPU"
    assert gc.section_status([], "a") == "failed: nothing ran"

    ok = {k: {"status": "ok"} for k in ("pre", "a", "b", "c")}
    doc, code = gc.assemble(rows, ok, {}, "NVIDIA H200", 0.0, 525.0)
    assert code == 0 and doc["passed"] is True
    json.dumps(doc)
    doc, code = gc.assemble(rows, dict(ok, c={"status": "failed: x"}), {}, "NVIDIA H200", 0.0, 525.0)
    assert code == 1 and doc["passed"] is False
    doc, code = gc.assemble(rows, dict(ok, a={"status": "skipped: not selected (--sections)"}), {}, "H200", 0.0, 1.0)
    assert code == 0  # a section left out on purpose is neutral
    doc, code = gc.assemble(rows, ok, {}, None, 0.0, 525.0)
    assert code == 3 and doc["no_gpu"] is True and doc["passed"] is False


def test_telemetry_windows_after_the_first():
    gc = gpu_check()
    points = {"train/images_per_s": [(64, 400.0), (32, 100.0), (96, 200.0)],  # any order
              "train/data_wait_frac": [(32, 0.9), (64, 0.0), (96, 0.5)],
              "train/peak_gpu_mem_gib": [(32, 10.0), (64, 12.5), (96, 12.0)]}
    got = gc.window_stats(points, batch=64)
    # windows 32-64 and 64-96: 2048 images each, in 5.12 s and 10.24 s; the first (start-up) is left out
    assert got["windows"] == 3 and got["windows_used"] == 2 and got["last_step"] == 96
    assert got["images_per_s"] == pytest.approx(4096 / 15.36, abs=0.1)
    assert got["data_wait_frac"] == pytest.approx(0.5 * 10.24 / 15.36, abs=1e-3)
    assert got["s_per_step"] == pytest.approx(64 / (4096 / 15.36), abs=1e-3)
    assert got["peak_gpu_mem_gib"] == 12.5
    one = gc.window_stats({"train/images_per_s": [(10, 50.0)]}, batch=8)
    assert one["images_per_s"] == 50.0 and one["windows_used"] == 1 and one["peak_gpu_mem_gib"] is None
    assert gc.window_stats({}, batch=8)["windows"] == 0


def test_command_lines_of_b_and_c(tmp_path):
    gc = gpu_check()
    b = gc.train_overrides(tmp_path / "d", tmp_path, 4096, 16, 64, 5, False, smoke=False)
    assert b["data.num_actors"] == 12 and b["ray.num_cpus"] == 16 and b["train.log_every"] == 32
    assert b["tracking.uri"] == f"sqlite:///{tmp_path}/mlflow_train.db" and str(tmp_path).startswith("/")
    c = gc.sweep_overrides(tmp_path / "d", tmp_path, 1024, 16, smoke=False)
    # two trials fit the machine's cores: 2 x (2 worker CPUs + actors) <= 16
    assert 2 * (2 + c["data.num_actors"]) <= 16 and c["sweep.scheduler"] == "none"
    assert all("=" in o and " " not in o for o in gc.overrides(b) + gc.overrides(c))


def test_the_gpu_path_with_canned_subprocess_results(tmp_path, monkeypatch, capsys):
    """Every section's logic on a GPU machine (parsing, ratios, budgets, read-backs, exit 0), with
    each subprocess answered by a canned result instead of run."""
    gc = gpu_check()
    seed_bench, seed_site = tmp_path / "seed_step_bench.py", tmp_path / "seed_site"
    seed_bench.write_text("")
    seed_site.mkdir()
    monkeypatch.setenv("SEED_BENCH", str(seed_bench))
    monkeypatch.setenv("SEED_SITE", str(seed_site))

    def fake_dataset(root, n_train, n_val, size, shard, procs):
        for split in ("train", "val"):
            (root / split).mkdir(parents=True)
            (root / split / "part-00000.parquet").write_bytes(b"")
        (root / "classes.json").write_text("[]")
        return {"mib": 1.0, "procs": procs}

    monkeypatch.setattr(gc, "make_dataset", fake_dataset)
    calls = []
    probe = {"cuda_available": True, "gpu": "NVIDIA H200", "gpu_mem_gib": 139.8, "import_errors": {},
             **{m: "1.0" for m in ("torch", "timm", "ray", "mlflow", "hydra", "pyarrow")}}
    step = {"vits16": 0.10, "vitb16": 0.25}
    windows = {"windows": 8, "windows_used": 7, "last_step": 320, "images_per_s": 250.0, "s_per_step": 0.256,
               "data_wait_frac": 0.01, "peak_gpu_mem_gib": 30.5}

    def fake_run(name, cmd, timeout, env=None, stdin_text=None):
        calls.append((name, [str(c) for c in cmd], timeout, env))
        out, rc = "", 0
        if name == "probe":
            out = "PROBE " + json.dumps(probe)
        elif name.startswith(("vits16", "vitb16")):
            vit = name[:6]
            s = step[vit] * (2.0 if "original" in name else 0.8 if "compile" in name else 1.0)
            res = {"median_s_per_step": s, "all_finite": True, "peak_cuda_mem_mib": 20480.0, "warmup_s": 2.0,
                   "flops_per_step": 1.0e13, "mfu": 0.3}
            if "original" in name:
                res = {"median_s_per_step": s, "all_finite": True, "stable_pretraining": "0.1.8"}
            out = "noise\n" + json.dumps(res)
            if name == "vits16_compile_model":
                return {"rc": None, "timed_out": True, "wall_s": timeout, "log": "x", "cmd": "c", "output": "..."}
        elif name == "cuda_tests":
            out = "...\n3 passed in 12.00s"
        elif name == "readback_train":
            out = json.dumps({"run": {"status": "FINISHED", "knn_top1": 11.5, "knn_top1_init": 10.0, **windows}})
        elif name == "readback_sweep":
            kids = [{"status": "FINISHED", "knn_top1": 10.5, "start_ms": 0, "end_ms": 60000, **windows}] * 2
            out = json.dumps({"run": {"status": "FINISHED"}, "children": kids, "overlap_s": 50.0})
        return {"rc": rc, "timed_out": False, "wall_s": 1.0, "log": "x", "cmd": " ".join(map(str, cmd)),
                "output": out}

    args = gc.parse_args(["--out", str(tmp_path / "out"), "--work", str(tmp_path), "--images", "4096"])
    check = gc.Check(args)
    fake_run.logs = []
    check.run = fake_run
    check.cpus = 16
    assert check.main() == 0, capsys.readouterr().out
    doc = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert doc["passed"] is True and doc["gpu"] == "NVIDIA H200"
    assert {k: v["status"] for k, v in doc["sections"].items()} == {"pre": "ok", "a": "ok", "b": "ok", "c": "ok"}
    rows = {r["case"]: r for r in doc["rows"]}
    assert rows["tests/test_method_cuda.py"]["notes"] == "3 passed in 12.00s"
    # (a): the original module side by side (its own PYTHONPATH first), ratios per backbone
    assert rows["vits16 eager split"]["vs_original"] == pytest.approx(2.0)
    assert rows["vitb16 compile backbone"]["vs_original"] == pytest.approx(2.5)
    assert rows["vitb16 eager split"]["peak_gpu_mem_gib"] == 20.0 and rows["vitb16 eager split"]["mfu"] == 0.3
    assert rows["vits16 compile model"]["status"].startswith("failed: timeout")  # optional: a passes anyway
    seed_call = next(c for c in calls if c[0] == "vits16_original_module")
    assert seed_call[3]["PYTHONPATH"].startswith(str(seed_site)) and str(seed_bench) in seed_call[1]
    bench = next(c for c in calls if c[0] == "vitb16_eager_one_backward")[1]
    assert "--no-split-backward" in bench and "vit_base_patch16_224" in bench and "bf16" in bench
    # (b): its epochs fit the time left at (a)'s measured step; MFU from (a)'s FLOP count per image
    train = next(c for c in calls if c[0] == "train_vitb16")[1]
    epochs = int(next(a for a in train if a.startswith("train.epochs=")).split("=")[1])
    assert 2 <= epochs <= 5 and f"train.knn_every={epochs}" in train
    b = next(r for r in doc["rows"] if r["section"] == "b")
    assert b["images_per_s"] == 250.0 and b["mfu"] == pytest.approx(1.0e13 / 64 * 250 / 989e12, abs=1e-4)
    # (c): two finished trials that ran together
    c = [r for r in doc["rows"] if r["section"] == "c"]
    assert len(c) == 3 and all(r["status"] == "ok" for r in c) and "ran together for 50 s" in c[-1]["notes"]
    assert "GPU NVIDIA H200: PASSED (exit 0)" in capsys.readouterr().out
