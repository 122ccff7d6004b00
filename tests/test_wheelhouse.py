"""The offline install, end to end: `platform/cluster/wheelhouse.py` builds the wheelhouse
for this Python (with PyPI), then a fresh virtual environment that has only what the base
image has (torch, torchvision and, as on our GPU machine, the packages of
platform/cluster/base-images/nvidia-cuda-py312.txt) installs the project with
`pip install --no-index --find-links DIR -e .` and runs a micro `experiments/train.py`
into MLflow on sqlite, read back with the venv's own mlflow (the run, its model through
the registry and mlflow.pytorch); WHEELHOUSE_TEST_SWEEP=1 adds a one-trial
`experiments/sweep.py`.

The venv does not install torch (5.5 GB): its site-packages gets a .pth file naming a
folder of symlinks to exactly the base distributions of this (the main) environment, with
their dependencies and dist-info, so pip in the venv sees them as installed and nothing
else of the main environment (ray, mlflow, hydra, ...) is importable before the install.
The project is installed from a copy of the working tree, so neither the checkout nor
the main environment is written to. WHEELHOUSE_TEST_BASE=none: a venv with only torch and
torchvision (and their dependencies) and a wheelhouse without a base list and without a
size limit (it holds pyarrow, pandas, matplotlib too: about 140 MiB).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import zipfile
import zlib
from pathlib import Path

import pytest

pytestmark = [pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "platform" / "cluster" / "wheelhouse.py"
BASE_LIST = REPO / "platform" / "cluster" / "base-images" / "nvidia-cuda-py312.txt"
WITH_BASE = os.environ.get("WHEELHOUSE_TEST_BASE", "image") != "none"
MAX_MIB = 60
RAY_GONE = ("ray/jars/", "ray/rllib/", "ray/serve/", "ray/llm/", "ray/_private/runtime_env/agent/thirdparty_files/")
RAY_KEPT = ("ray/_raylet.so", "ray/core/src/ray/gcs/gcs_server", "ray/core/src/ray/raylet/raylet",
            "ray/train/torch/__init__.py", "ray/tune/__init__.py", "ray/data/__init__.py",
            "ray/dashboard/modules/job/job_head.py", "ray/autoscaler/__init__.py")

TRAIN = ["model=micro", "train.epochs=1", "data.synthetic_n_train=64", "data.synthetic_n_eval=32",
         "train.global_batch_size=16", "train.num_workers=1", "train.cpus_per_worker=0.5",
         "data.num_actors=1", "data.cpus_per_actor=0.5", "train.log_every=2", "ray.num_cpus=2",
         "tracking.experiment=offline-install"]
SWEEP = [*TRAIN[:-1], "sweep.num_samples=1", "sweep.max_concurrent_trials=1", "sweep.run_name=offline",
         "tracking.experiment=offline-sweep", "tracking.register_model_name=offline-best"]


def _index_reachable() -> str:
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    try:
        urllib.request.urlopen(f"{index}/pip/", timeout=15).read(64)
        return ""
    except Exception as err:  # noqa: BLE001
        return f"the package index {index} is unreachable ({err}); building a wheelhouse needs it"


def _clean_env(**extra) -> dict:
    """No PIP_* settings of this machine (its config adds local wheel folders), no RAY_ADDRESS."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV", "RAY_ADDRESS", "CONDA"))}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONDONTWRITEBYTECODE="1",
               RAY_DEDUP_LOGS="0",
               # a loaded 2-core host can take longer than Ray's defaults to start the node's agents
               RAY_agent_register_timeout_ms="120000", RAY_raylet_start_wait_time_s="120", **extra)
    return env


def _run(cmd, *, cwd, env, timeout, log: Path) -> subprocess.CompletedProcess:
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT,
                              timeout=timeout)
    text = log.read_text(errors="replace")
    print(f"{' '.join(map(str, cmd[:4]))} ...: {time.monotonic() - t0:.0f} s, exit {proc.returncode}")
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{text[-6000:]}"
    return proc


# --------------------------------------------------------------------- the script's parts (fast)

@pytest.fixture(scope="module")
def wh():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import wheelhouse
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return wheelhouse


def _wheel(path: Path, files: dict) -> Path:
    """A minimal wheel holding ``files`` (name -> bytes) and a RECORD."""
    dist = "demo-1.0.dist-info"
    files = {**files, f"{dist}/METADATA": b"Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n",
             f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(f"{dist}/RECORD", "".join(f"{n},,\n" for n in files) + f"{dist}/RECORD,,\n")
    return path


def test_repack_drops_folders_and_rewrites_record(wh, tmp_path):
    whl = _wheel(tmp_path / "demo-1.0-py3-none-any.whl", {
        "demo/__init__.py": b"x = 1\n", "demo/jars/big.jar": os.urandom(4096), "demo/web/app.js.map": b"{}",
        "demo/web/app.js": b"1", "demo/tests/test_x.py": b"def test(): pass\n"})
    saved, removed = wh.repack_wheel(whl, ["demo/jars/", "demo/web/*.map", "demo/tests/"], "why\n")
    assert saved > 3000 and removed == ["demo/jars/", "demo/tests/", "demo/web/*.map"]
    with zipfile.ZipFile(whl) as z:
        assert sorted(n for n in z.namelist() if n.startswith("demo/")) == ["demo/__init__.py", "demo/web/app.js"]
        assert z.read("demo-1.0.dist-info/WHEELHOUSE_REPACK") == b"why\n"
    wh.check_record(whl)  # every file listed with its sha256, nothing else
    target = tmp_path / "installed"  # and pip installs it
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", target, whl],
                   check=True, capture_output=True, env=_clean_env())
    assert (target / "demo" / "web" / "app.js").exists() and not (target / "demo" / "jars").exists()


@pytest.mark.skipif(not shutil.which("cc"), reason="needs a C compiler")
def test_emptied_symbol_tables_leave_binaries_working(wh, tmp_path):
    (tmp_path / "lib.c").write_text("int answer(int x) { return 40 + x; }\n")
    (tmp_path / "main.c").write_text("int main(void) { return 7; }\n")
    subprocess.run(["cc", "-shared", "-fPIC", "-g", "-o", tmp_path / "lib.so", tmp_path / "lib.c"], check=True)
    subprocess.run(["cc", "-g", "-o", tmp_path / "main", tmp_path / "main.c"], check=True)
    for name in ("lib.so", "main"):
        data = (tmp_path / name).read_bytes()
        new, zeroed = wh.zero_elf_symbols(data)
        assert zeroed > 0 and len(new) == len(data) and new != data
        assert len(zlib.compress(new)) < len(zlib.compress(data))
        (tmp_path / name).write_bytes(new)
        assert wh.zero_elf_symbols(new)[1] == 0  # nothing left to empty
    import ctypes

    assert ctypes.CDLL(str(tmp_path / "lib.so")).answer(2) == 42  # the dynamic symbol is still there
    assert subprocess.run([tmp_path / "main"]).returncode == 7
    assert wh.zero_elf_symbols(b"not an elf file")[1] == 0


def test_target_markers_and_base_closure(wh):
    target = wh.Target("3.12", ["manylinux_2_28_x86_64"])
    assert target.env["python_version"] == "3.12" and target.env["platform_machine"] == "x86_64"
    assert "manylinux2014_x86_64" in target.platforms and "manylinux_2_17_x86_64" in target.platforms

    def item(name, version, *requires):
        return wh.Item({"metadata": {"name": name, "version": version, "requires_dist": list(requires)},
                        "download_info": {"url": f"https://x/{name}-{version}-py3-none-any.whl"}})

    items = {i.name: i for i in [
        item("app", "1", "lib[extra]", "old; python_version < '3.12'", "new>=2; python_version >= '3.12'"),
        item("lib", "1", "base", "plug; extra == 'extra'"), item("plug", "1"), item("base", "1", "basedep"),
        item("basedep", "1"), item("old", "1"), item("new", "1")]}
    roots = [wh.Requirement("app")]
    base_set, _ = wh.walk(items, [wh.Requirement("base")], target.env)
    assert set(base_set) == {"base", "basedep"}
    needed, missing = wh.walk(items, roots, target.env, stop=set(base_set))
    # not "old" (a dependency below 3.12 only); "new" 1 is too old for 3.12's requirement (pip
    # resolved with this host's markers): asked for again
    assert set(needed) == {"app", "lib", "plug", "base"} and missing == {"new": "new>=2"}
    items["new"] = item("new", "2")
    needed, missing = wh.walk(items, roots, target.env, stop=set(base_set))
    assert set(needed) == {"app", "lib", "plug", "base", "new"} and missing == {}


def test_base_list_reads_names_and_pins(wh, tmp_path):
    f = tmp_path / "image.txt"
    f.write_text("# comment\nNumPy==1.26.4\npandas  # inline\n-e git+https://x\nPyYAML[c]==6.0\n\n")
    assert wh.read_base_packages(f) == {"numpy": "1.26.4", "pandas": None, "pyyaml": "6.0"}
    assert wh.read_base_packages(BASE_LIST)["pyarrow"] is None


# --------------------------------------------------------------------- the base environment

def _site_distributions() -> list:
    """The main environment's installed distributions, read from its site-packages only:
    sys.path of this process may hold more once Ray is imported (ray/thirdparty_files has its
    own psutil), and linking that one would make a folder named ray in the base."""
    import sysconfig
    from importlib import metadata

    paths = list(dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib")))
    return list(metadata.distributions(path=paths))


def _base_distributions(names) -> dict:
    """{canonical name: Distribution} of the main environment: ``names`` and their dependencies."""
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

    installed = {}
    for dist in _site_distributions():
        installed.setdefault(canonicalize_name(dist.metadata["Name"]), dist)
    todo, out, seen = [(canonicalize_name(n), "") for n in names], {}, set()
    while todo:  # (name, extra): torch needs cuda-toolkit[cublas,cudart,...]
        name, extra = todo.pop()
        if (name, extra) in seen or name not in installed:
            continue
        seen.add((name, extra))
        out[name] = installed[name]
        for r in installed[name].requires or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                todo += [(canonicalize_name(req.name), e) for e in ["", *req.extras]]
    return out


def _files(dist) -> set:
    root = Path(dist.locate_file(""))
    return {Path(os.path.normpath(root / f)) for f in (dist.files or []) if not str(f).startswith("..")}


def expose(dists: dict, others, dest: Path) -> int:
    """Symlinks in ``dest`` to the files of ``dists`` (whole folders where no other
    distribution has files inside). Returns how many links were made."""
    site = Path(next(iter(dists.values())).locate_file("")).resolve()
    mine = set().union(*(_files(d) for d in dists.values()))
    theirs = set().union(*(_files(d) for d in others))
    mine_dirs = {p for f in mine for p in f.parents}
    theirs_dirs = {p for f in theirs for p in f.parents}
    links = 0

    def place(src: Path):
        nonlocal links
        rel = src.relative_to(site)
        if src in theirs_dirs:  # shared (a namespace folder): go one level down
            (dest / rel).mkdir(parents=True, exist_ok=True)
            for child in src.iterdir():
                if child in mine or child in mine_dirs:
                    place(child)
        else:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(src, dest / rel)
            links += 1

    for top in sorted({site / f.relative_to(site).parts[0] for f in mine if site in f.parents}):
        place(top)
    return links


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    reason = _index_reachable()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("offline")
    timings = {}

    # 1. The wheelhouse, for this Python (WHEELHOUSE_TEST_REUSE=DIR: one built before, to debug).
    wh = root / "wheelhouse"
    cmd = [sys.executable, SCRIPT, "--out", wh]
    cmd += ["--base-packages", BASE_LIST] if WITH_BASE else ["--max-mib", "0"]
    t0 = time.monotonic()
    reuse = os.environ.get("WHEELHOUSE_TEST_REUSE")
    if reuse:
        shutil.copytree(reuse, wh)
        proc = subprocess.CompletedProcess(cmd, 0, stdout=f"(reused {reuse})", stderr="")
    else:
        proc = subprocess.run([str(c) for c in cmd], cwd=REPO, capture_output=True, text=True, timeout=1200)
    timings["wheelhouse"] = time.monotonic() - t0
    print(proc.stdout)
    assert proc.returncode == 0, \
        f"wheelhouse.py exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    manifest = json.loads((wh / "wheelhouse.json").read_text())

    # 2. A fresh venv that has only the base image (this environment's copies, linked).
    names = ["torch", "torchvision"]
    if WITH_BASE:
        names += [line.split("#")[0].strip() for line in BASE_LIST.read_text().splitlines()]
    base = _base_distributions([n for n in names if n])
    others = [d for d in _site_distributions()
              if d.metadata["Name"] and d.metadata["Name"].lower().replace("_", "-") not in base]
    venv = root / "venv"
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, env=_clean_env(), timeout=300)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    base_dir = root / "base-site"
    base_dir.mkdir()
    n_links = expose(base, others, base_dir)
    (site / "zz_base_image.pth").write_text(f"{base_dir}\n")
    timings["venv"] = time.monotonic() - t0

    # The project from a copy of the working tree (the checkout stays untouched).
    src = root / "src"
    everywhere = shutil.ignore_patterns(".git", "*.egg-info", "__pycache__", ".pytest_cache", "*.db")
    top = {"outputs", "ray_results", "mlruns", "mlartifacts", "wheelhouse", "build", "dist", "shared", "data"}

    def ignore(folder, names):
        return set(everywhere(folder, names)) | (top & set(names) if Path(folder) == REPO else set())

    shutil.copytree(REPO, src, symlinks=True, ignore=ignore)
    return dict(root=root, wh=wh, manifest=manifest, py=py, site=site, src=src, base=base,
                n_links=n_links, timings=timings, out=proc.stdout)


@pytest.mark.slow
def test_wheelhouse_is_small_and_ray_is_slim(offline):
    wh, manifest = offline["wh"], offline["manifest"]
    wheels = sorted(wh.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    assert total == manifest["total_bytes"]
    names = {w.name.split("-")[0].lower().replace("_", "-") for w in wheels}
    # what the base has is not shipped; the build backend always is
    assert not names & {"torch", "torchvision", "numpy", "pillow", "nvidia-cudnn-cu13", "triton"}, names
    assert {"ray", "mlflow-skinny", "sqlalchemy", "alembic", "hydra-core", "antlr4-python3-runtime",
            "optuna", "setuptools", "wheel"} <= names, names
    assert "mlflow" not in names  # the lean variant only
    if WITH_BASE:
        assert total <= MAX_MIB * 1024 * 1024, f"{total / 2**20:.1f} MiB"
        assert not names & {"pyarrow", "pandas", "matplotlib", "grpcio", "timm"}, names
    else:
        assert {"pyarrow", "pandas", "timm"} <= names, names
    print(f"wheelhouse: {len(wheels)} wheels, {total / 2**20:.1f} MiB ({offline['timings']['wheelhouse']:.0f} s)")

    (ray,) = [w for w in wheels if w.name.startswith("ray-")]
    with zipfile.ZipFile(ray) as z:
        files = z.namelist()
        record_name = next(n for n in files if n.endswith(".dist-info/RECORD") and n.count("/") == 1)
        record = {line.split(",")[0] for line in z.read(record_name).decode().splitlines() if line}
        note = z.read(record_name.replace("RECORD", "WHEELHOUSE_REPACK")).decode()
    for gone in RAY_GONE:
        assert not [f for f in files if f.startswith(gone)], gone
        assert not [f for f in record if f.startswith(gone)], gone
        assert gone in note
    assert not [f for f in files if f.endswith(".js.map")]
    for kept in RAY_KEPT:
        assert kept in files and kept in record, kept
    assert record == {f for f in files if not f.endswith("/")}
    assert manifest["repacked"]["ray"]["saved_bytes"] > 30 * 2**20


@pytest.mark.slow
def test_offline_install_then_train(offline, tmp_path):
    py, src, root = offline["py"], offline["src"], offline["root"]
    env = _clean_env()
    main_dists = _main_dists()

    # Before: the base is there, the platform's dependencies are not.
    # (where each is found, so that a leak names its folder)
    probe = ("import importlib.util as u, json, torch, torchvision\n"
             "specs = {m: u.find_spec(m) for m in ['ray', 'mlflow', 'hydra', 'omegaconf', 'optuna', 'timm', 'pyarrow']}\n"
             "print(json.dumps({m: s and (s.origin or list(s.submodule_search_locations)) for m, s in specs.items()}))")
    where = json.loads(subprocess.run([py, "-c", probe], capture_output=True, text=True, env=env, check=True,
                                      cwd=root).stdout)
    before = {m: w is not None for m, w in where.items()}
    assert before["ray"] is False and before["mlflow"] is False and before["hydra"] is False, where
    assert before["optuna"] is False and before["omegaconf"] is False, where
    assert before["timm"] is WITH_BASE and before["pyarrow"] is WITH_BASE, where

    # The offline install, exactly as documented.
    t0 = time.monotonic()
    _run([py, "-m", "pip", "install", "--no-index", "--find-links", offline["wh"], "-e", "."],
         cwd=src, env=env, timeout=900, log=root / "install.log")
    t_install = time.monotonic() - t0
    where = subprocess.run([py, "-c", "import ray, mlflow, hydra, rayssl, pathlib; "
                                      "print(ray.__file__); print(mlflow.__file__); print(rayssl.__file__); "
                                      "print((pathlib.Path(ray.__file__).parent / 'jars').exists())"],
                           capture_output=True, text=True, env=env, check=True, cwd=root).stdout.split()
    assert all(p.startswith(str(root)) for p in where[:3]), where
    assert where[3] == "False"

    # A micro training run into MLflow on sqlite.
    db = tmp_path / "mlflow.db"
    common = [f"tracking.uri=sqlite:///{db}", f"train.storage_path={tmp_path}/runs"]
    t0 = time.monotonic()
    _run([py, "experiments/train.py", *TRAIN, *common], cwd=src, env=env, timeout=900, log=root / "train.log")
    t_train = time.monotonic() - t0

    # Read back with the venv's mlflow (skinny): the run, its model through the registry,
    # and the model loaded with mlflow.pytorch and run on an image batch.
    read = f"""
import json, mlflow, torch
from mlflow.tracking import MlflowClient
from rayssl import tracking
from rayssl.export import load_encoder
uri = "sqlite:///{db}"
mlflow.set_tracking_uri(uri)  # models:/ URIs resolve through it
c = MlflowClient(uri)
exp = c.get_experiment_by_name("offline-install")
runs = c.search_runs([exp.experiment_id])
out = [dict(id=r.info.run_id, status=r.info.status, metrics=sorted(r.data.metrics),
            artifacts=[a.path for a in c.list_artifacts(r.info.run_id)]) for r in runs]
version = tracking.register_model(uri, runs[0].info.run_id, "offline-model")
features = load_encoder(f"models:/offline-model/{{version}}")(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
print(json.dumps(dict(runs=out, version=version, features=list(features.shape))))
"""
    proc = subprocess.run([py, "-c", read], capture_output=True, text=True, env=env, cwd=src)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    (run,) = got["runs"]
    assert run["status"] == "FINISHED" and "knn_top1" in run["metrics"], run
    assert "model" in run["artifacts"], run["artifacts"]
    assert str(got["version"]) == "1" and got["features"][0] == 2, got

    t_sweep = None
    if os.environ.get("WHEELHOUSE_TEST_SWEEP"):  # +1-2 minutes: Tune, a nested run, the registry
        t0 = time.monotonic()
        _run([py, "experiments/sweep.py", *SWEEP, *common], cwd=src, env=env, timeout=900, log=root / "sweep.log")
        t_sweep = time.monotonic() - t0
        check = f"""
import json
from mlflow.tracking import MlflowClient
c = MlflowClient("sqlite:///{db}")
exp = c.get_experiment_by_name("offline-sweep")
print(json.dumps([dict(status=r.info.status, metrics=sorted(r.data.metrics), child="mlflow.parentRunId" in r.data.tags)
                  for r in c.search_runs([exp.experiment_id])] + [[m.name for m in c.search_registered_models()]]))
"""
        *runs, registered = json.loads(subprocess.run([py, "-c", check], capture_output=True, text=True, env=env,
                                                      check=True, cwd=root).stdout.strip().splitlines()[-1])
        assert sorted(r["child"] for r in runs) == [False, True], runs
        assert all(r["status"] == "FINISHED" for r in runs), runs
        assert "knn_top1" in next(r for r in runs if r["child"])["metrics"], runs
        assert "offline-best" in registered, registered

    # The main environment is as it was.
    assert _main_dists() == main_dists
    t = offline["timings"]
    print(f"wheelhouse {t['wheelhouse']:.0f} s, venv {t['venv']:.0f} s ({offline['n_links']} links), "
          f"offline install {t_install:.0f} s, train {t_train:.0f} s"
          + (f", sweep {t_sweep:.0f} s" if t_sweep else ""))


def _main_dists():
    from importlib import metadata

    return sorted((d.metadata["Name"], d.version, str(d.locate_file(""))) for d in metadata.distributions())
