"""platform/cluster/*, .rayignore and the README's cluster commands: parsed and checked
against the repository (scripts exist, Hydra overrides compose, runtime_env fields are
valid, the working_dir stays small). Fast: no Ray start, no network."""

from __future__ import annotations

import re
import shlex
import shutil
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import compose

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "platform" / "cluster"
LAUNCHER = CLUSTER / "aws.yaml"
RAYJOB = CLUSTER / "kuberay-rayjob.yaml"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"


def load(path: Path):
    return yaml.safe_load(path.read_text())


def check_entrypoint(command: str) -> list:
    """`python experiments/X.py k=v ...`: the script exists and the overrides compose."""
    argv = shlex.split(command)
    assert argv[0] in ("python", "python3"), command
    script = REPO / argv[1]
    assert script.is_file(), f"{argv[1]} does not exist"
    overrides = argv[2:]
    assert all(re.fullmatch(r"[\w.+~]+=\S*", o) for o in overrides), overrides
    compose(overrides)  # raises on an unknown group/key or an invalid value
    return overrides


def check_runtime_env(env: dict) -> None:
    from ray.runtime_env import RuntimeEnv

    unknown = set(env) - set(RuntimeEnv.known_fields)
    assert not unknown, f"not runtime_env fields: {unknown}"
    env = dict(env)
    working_dir = env.pop("working_dir", None)  # checked on its own: it may be a path in an image
    assert working_dir is None or "://" in working_dir or working_dir.startswith("/") or \
        (REPO / working_dir).is_dir(), working_dir
    RuntimeEnv(**env)  # type checks (env_vars must be str -> str, ...)
    for key in ("MLFLOW_TRACKING_URI", "RAYSSL_STORAGE_PATH"):
        assert key in env.get("env_vars", {}), key


def image_tags(*images) -> set:
    return {img.rsplit(":", 1)[1].split("-")[0] for img in images if "rayproject/ray:" in img}


# ---------------------------------------------------------------------------------------
# Cluster launcher (AWS)
# ---------------------------------------------------------------------------------------

def test_launcher_matches_rays_schema():
    from ray.autoscaler._private.util import validate_config

    cfg = load(LAUNCHER)
    cfg.setdefault("cluster_synced_files", [])  # filled in by `ray up`
    validate_config(cfg)
    assert cfg["provider"]["type"] == "aws"


def test_launcher_cpu_head_and_autoscaling_gpu_workers():
    cfg = load(LAUNCHER)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert not head["node_config"]["InstanceType"].startswith(("g", "p")), "head should be a CPU instance"
    workers = [t for name, t in types.items() if name != cfg["head_node_type"]]
    gpu = [t for t in workers if t["node_config"]["InstanceType"].split(".")[0][:1] in ("g", "p")]
    assert gpu, "no GPU worker type"
    for t in gpu:
        assert t["min_workers"] == 0 < t["max_workers"] <= cfg["max_workers"]


def test_launcher_sets_shm_size_and_matching_images():
    docker = load(LAUNCHER)["docker"]
    for role in ("head", "worker"):
        opts = docker.get("run_options", []) + docker.get(f"{role}_run_options", [])
        assert any(re.fullmatch(r"--shm-size=\d+[gm]", o) for o in opts), (role, opts)
    images = [docker[k] for k in ("image", "head_image", "worker_image") if k in docker]
    assert "gpu" in docker.get("worker_image", docker.get("image", ""))
    assert len(image_tags(*images)) == 1, images


def test_launcher_installs_the_project_and_enables_token_auth():
    cfg = load(LAUNCHER)
    mounts = cfg["file_mounts"]
    project = [remote for remote, local in mounts.items() if local in (".", "./")]
    assert project, "the checkout is not mounted"
    assert any("pip install" in c and project[0] in c for c in cfg["setup_commands"]), cfg["setup_commands"]
    assert any(remote.endswith(".ray/auth_token") for remote in mounts)
    assert ".rayignore" in cfg.get("rsync_filter", [])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cfg[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), (key, start)
    assert any("--head" in c for c in cfg["head_start_ray_commands"])


# ---------------------------------------------------------------------------------------
# KubeRay RayJob
# ---------------------------------------------------------------------------------------

def test_rayjob_entrypoint_composes_and_runtime_env_is_valid():
    job = load(RAYJOB)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    overrides = check_entrypoint(job["spec"]["entrypoint"])
    assert any(o.startswith("train.storage_path=s3://") for o in overrides)
    assert any(o.startswith("tracking.uri=http") for o in overrides)
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    check_runtime_env(env)
    cfg = compose(overrides)
    assert cfg.storage_path.startswith("s3://"), cfg.storage_path  # kept as a URI, not made a local path


def test_rayjob_gpu_workers_shm_and_auth():
    spec = load(RAYJOB)["spec"]
    cluster = spec["rayClusterSpec"]
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    images = []
    for name, group in groups:
        pod = group["template"]["spec"]
        shm = [v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
        assert shm, f"{name}: no memory-backed emptyDir"
        for c in pod["containers"]:
            images.append(c["image"])
            mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
            assert mounts.get(shm[0]["name"]) == "/dev/shm", (name, mounts)
            env = {e["name"]: e for e in c.get("env", [])}
            assert env["RAY_AUTH_MODE"]["value"] == "token" and "RAY_AUTH_TOKEN" in env, name
    gpu_groups = [g for g in cluster["workerGroupSpecs"]
                  if any("nvidia.com/gpu" in c["resources"].get("limits", {})
                         for c in g["template"]["spec"]["containers"])]
    assert gpu_groups, "no GPU worker group"
    assert all(g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] for g in gpu_groups)
    submitter = {e["name"] for c in spec["submitterPodTemplate"]["spec"]["containers"] for e in c["env"]}
    assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} <= submitter
    assert len(set(images)) == 1, images  # the image built by platform/cluster/Dockerfile


def test_dockerfile_copies_existing_paths_and_matches_ray_version():
    text = DOCKERFILE.read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    assert image_tags(base) == {load(RAYJOB)["spec"]["rayClusterSpec"]["rayVersion"]}
    assert image_tags(base) == image_tags(load(LAUNCHER)["docker"]["worker_image"])
    for line in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+)$", text, re.M):
        *sources, _dest = line.split()
        for src in sources:
            assert (REPO / src).exists(), f"Dockerfile copies missing {src}"
    workdir = re.search(r"^WORKDIR\s+(\S+)", text, re.M).group(1)
    assert yaml.safe_load(load(RAYJOB)["spec"]["runtimeEnvYAML"])["working_dir"] == workdir


# ---------------------------------------------------------------------------------------
# runtime_env.yaml and README commands
# ---------------------------------------------------------------------------------------

def test_runtime_env_yaml_is_valid():
    env = load(RUNTIME_ENV)
    check_runtime_env(env)
    assert env["working_dir"] == "."


def readme_cluster_section() -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(r"^## Run on a cluster\n(.*?)(?=^## )", text, re.M | re.S)
    assert m, "README has no 'Run on a cluster' section"
    return m.group(1)


def test_readme_cluster_commands_compose():
    section = readme_cluster_section()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", section, re.S)
    commands = [c for b in blocks for c in b.replace("\\\n", " ").splitlines()]
    sweeps = [c[c.index("python experiments/"):] for c in commands if "python experiments/" in c]
    assert len(sweeps) >= 2, sweeps
    for cmd in sweeps:
        check_entrypoint(cmd)
    text = " ".join(commands)
    for needle in ("ray job submit", "RAY_AUTH_TOKEN", "mlflow server", "--artifacts-destination",
                   "train.storage_path=s3://", "platform/cluster/aws.yaml", "platform/cluster/kuberay-rayjob.yaml",
                   "platform/cluster/runtime_env.yaml"):
        assert needle in text, needle


# ---------------------------------------------------------------------------------------
# The working_dir `ray job submit --working-dir .` uploads
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("include_gitignore", [True, False])
def test_working_dir_upload_excludes_data_stores_and_outputs(tmp_path, include_gitignore):
    from ray._private.runtime_env.packaging import create_package

    src = tmp_path / "repo"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "outputs", "ray_results", "mlruns",
                                                            "mlartifacts", "*.db", "data_cache", ".cache"))
    heavy = ["mlflow.db", "mlruns/0/meta.yaml", "mlartifacts/1/a/model.pt", "outputs/2025/run.log",
             "ray_results/sweep/checkpoint_000/state.pt", ".git/objects/pack/p.pack", "data/train/x.jpg",
             "data/shards/part-0.parquet", "dinov3/__pycache__/m.cpython-311.pyc", ".cache/blob",
             "multirun/0/x.yaml", "model.safetensors"]
    for rel in heavy:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(b"\0" * 4096)
    (src / "data" / "big.bin").write_bytes(b"\0" * (8 << 20))

    zip_path = tmp_path / "pkg.zip"
    create_package(str(src), zip_path, include_gitignore=include_gitignore)
    names = set(zipfile.ZipFile(zip_path).namelist())
    for rel in heavy + ["data/big.bin"]:
        assert rel not in names, f"{rel} would be uploaded"
    assert not any(n.startswith((".git/", "data/", "outputs/", "ray_results/")) for n in names)
    for needed in ("experiments/sweep.py", "conf/config.yaml", "dinov3/__init__.py",
                   "platform/rayssl/__init__.py", "platform/rayssl/data/pipeline.py", "pyproject.toml"):
        assert needed in names, f"{needed} missing from the working_dir"
    assert zip_path.stat().st_size < 5 << 20, zip_path.stat().st_size
