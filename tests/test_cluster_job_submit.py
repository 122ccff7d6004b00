"""End to end on a real 2-node Ray cluster: `ray job submit --working-dir` of the sweep.

This machine plays both nodes: a head (`ray start --head --block`) and a worker node
(`ray start --address --block`), plain nodes that declare no custom resources (nothing in
the sweep may depend on one), each with its own ports, CPUs and temp dir, token
authentication on (a token made for this test), plus an `mlflow server`. The project's
editable install is hidden from every cluster process, so the nodes behave as if they
never had it: the job must ship `dinov3` and `rayssl` itself. Everything is stopped
through the process groups this module started, never `ray stop` or a kill by name.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EXPERIMENT = "it-cluster"
# One trial = 1 Train worker x 2 CPUs + 1 Ray Data actor (1 CPU); read/eval tasks take 0.
# Each node has 3 CPUs, so a node holds exactly one trial's Train worker: two concurrent
# trials must use both nodes.
NODE_CPUS = 3
SWEEP_OVERRIDES = [
    "model=micro", "train.epochs=1", "sweep.num_samples=2", "sweep.max_concurrent_trials=2",
    "train.num_workers=1", "train.cpus_per_worker=2", "data.num_actors=1",
    "data.synthetic_n_train=256", "data.synthetic_n_eval=128", "train.global_batch_size=32",
    "train.log_every=4", "data.n_local=2", "data.map_batch_size=32",
    f"tracking.experiment={EXPERIMENT}",
    # A worker lost on a loaded 2-core runner is restarted from its checkpoint, as on a real
    # cluster; a trial that still fails names its error (rayssl.error) in the assertion below.
    "train.max_failures=1",
]
JOB_TIMEOUT_S = 600


def free_ports(n: int) -> list:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def wait_for(check, timeout: float, what: str, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: process {p.args[:3]} exited with {p.returncode}")
        try:
            result = check()
            if result:
                return result
        except Exception:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


class Processes:
    """Processes this test started, each the leader of its own process group."""

    def __init__(self):
        self.procs = []

    def start(self, args, *, env, log_path: Path, cwd: Path) -> subprocess.Popen:
        log = open(log_path, "wb")
        proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append((proc, log))
        return proc

    def stop_all(self):
        for proc, log in reversed(self.procs):  # worker node, then head, then MLflow
            stop_group(proc)
            log.close()
        self.procs.clear()


def stop_group(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM the process (`ray start --block` then stops its raylet, GCS, workers...),
    then SIGKILL whatever is left in its process group (which only this test created)."""
    pgid = proc.pid  # start_new_session: the group id is the leader's pid
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def kill_leftovers(temp_dirs) -> None:
    """Ray workers that left our process groups: found by our unique temp dirs in their cmdline."""
    me = os.getpid()
    for pid_dir in glob.glob("/proc/[0-9]*"):
        pid = int(pid_dir.rsplit("/", 1)[1])
        if pid == me:
            continue
        try:
            cmdline = Path(pid_dir, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(str(t) in cmdline for t in temp_dirs):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def hide_editable_install(stub_dir: Path) -> list:
    """Shadow setuptools' editable-install finders for this project (PYTHONPATH comes first
    while site-packages' .pth files run), so cluster processes cannot import dinov3/rayssl."""
    stub_dir.mkdir(parents=True, exist_ok=True)
    hidden = []
    for finder in glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "__editable__*finder.py")):
        text = Path(finder).read_text(errors="replace")
        if "rayssl" in text or "dinov3" in text:
            name = Path(finder).name
            (stub_dir / name).write_text("def install():\n    pass\n")
            hidden.append(name)
    return hidden


def http_json(url: str, token: str = None, timeout: float = 10.0):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read().decode())


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status == 200


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head + worker node + MLflow server; yields addresses, token and node ids."""
    root = tmp_path_factory.mktemp("cluster")
    # Ray's session paths must stay short (unix socket paths are limited to ~107 bytes).
    ray_tmp = Path(f"/tmp/rsl{os.getpid()}_{secrets.token_hex(3)}")
    head_tmp, worker_tmp = ray_tmp / "h", ray_tmp / "w"
    head_tmp.mkdir(parents=True)
    worker_tmp.mkdir(parents=True)
    token = secrets.token_hex(32)
    token_file = root / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    hidden = hide_editable_install(root / "hide_project")

    (gcs_port, dash_port, client_port, mlflow_port, *node_ports) = free_ports(4 + 2 * 6)
    gcs = f"127.0.0.1:{gcs_port}"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "MLFLOW_", "RAYSSL_")) and k not in ("PYTHONPATH",)}
    env.update({
        "RAY_ADDRESS": gcs,  # anything in the cluster that looks for "the" cluster finds this one
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
        "RAY_DEDUP_LOGS": "0",
        "PYTHONPATH": str(root / "hide_project"),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    })
    procs = Processes()

    def node_args(ports):
        nm, om, agent_http, agent_grpc, rt_agent, metrics = ports
        return ["--node-ip-address=127.0.0.1", f"--node-manager-port={nm}", f"--object-manager-port={om}",
                f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
                f"--runtime-env-agent-port={rt_agent}", f"--metrics-export-port={metrics}",
                f"--num-cpus={NODE_CPUS}", "--num-gpus=0", f"--object-store-memory={200 * 2**20}",
                "--disable-usage-stats", "--block"]

    try:
        probe = subprocess.run(
            [sys.executable, "-c", "import importlib.util as u; print(u.find_spec('rayssl') is None "
                                   "and u.find_spec('dinov3') is None)"],
            env=env, cwd=root, capture_output=True, text=True, timeout=60)
        project_hidden = probe.stdout.strip() == "True"

        mlflow_proc = procs.start(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
             "--artifacts-destination", str(root / "mlartifacts"), "--host", "127.0.0.1",
             "--port", str(mlflow_port), "--workers", "1"],
            env=env, log_path=root / "mlflow.log", cwd=root)
        head = procs.start(
            [str(BIN / "ray"), "start", "--head", f"--port={gcs_port}", f"--temp-dir={head_tmp}",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
             f"--ray-client-server-port={client_port}", *node_args(node_ports[:6])],
            env=env, log_path=root / "head.log", cwd=root)
        dashboard = f"http://127.0.0.1:{dash_port}"
        wait_for(lambda: http_json(f"{dashboard}/api/version", token), 180, "the head's dashboard", [head])
        worker = procs.start(
            [str(BIN / "ray"), "start", f"--address={gcs}", f"--temp-dir={worker_tmp}",
             *node_args(node_ports[6:])],
            env=env, log_path=root / "worker.log", cwd=root)

        def alive_nodes():
            nodes = http_json(f"{dashboard}/api/v0/nodes?limit=100", token)["data"]["result"]["result"]
            alive = [n for n in nodes if n["state"] == "ALIVE"]
            return alive if len(alive) == 2 else None

        nodes = wait_for(alive_nodes, 180, "2 alive nodes", [head, worker])
        wait_for(lambda: http_ok(f"http://127.0.0.1:{mlflow_port}/health"), 120, "the MLflow server",
                 [mlflow_proc])
        yield {
            "root": root, "dashboard": dashboard, "gcs": gcs, "token": token, "env": env,
            "mlflow": f"http://127.0.0.1:{mlflow_port}", "node_ids": {n["node_id"] for n in nodes},
            "worker_node_id": next(n["node_id"] for n in nodes if not n["is_head_node"]),
            "project_hidden": project_hidden, "hidden": hidden,
        }
    finally:
        procs.stop_all()
        kill_leftovers([ray_tmp])
        shutil.rmtree(ray_tmp, ignore_errors=True)


def submit_env(cluster) -> dict:
    """A job client's environment: token auth through RAY_AUTH_TOKEN, no file."""
    env = {k: v for k, v in cluster["env"].items() if k not in ("RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": cluster["token"],
                "RAY_API_SERVER_ADDRESS": cluster["dashboard"]})
    return env


def test_dashboard_requires_the_token(cluster):
    with pytest.raises(urllib.error.HTTPError) as err:
        http_json(f"{cluster['dashboard']}/api/jobs/")
    assert err.value.code == 401


def test_job_submit_sweep_runs_on_both_nodes(cluster):
    from mlflow.tracking import MlflowClient

    if not cluster["project_hidden"]:
        print(f"note: dinov3/rayssl stay importable outside Ray's runtime env here ({cluster['hidden']})")
    storage = cluster["root"] / "shared_storage"
    job_id = f"rayssl-it-{secrets.token_hex(4)}"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", cluster["dashboard"], "--submission-id", job_id,
           "--working-dir", str(REPO), "--no-wait", "--",
           "python", "experiments/sweep.py", *SWEEP_OVERRIDES,
           f"tracking.uri={cluster['mlflow']}", f"train.storage_path={storage}"]
    t0 = time.monotonic()
    out = subprocess.run(cmd, env=submit_env(cluster), cwd=cluster["root"], capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr

    def finished():
        info = http_json(f"{cluster['dashboard']}/api/jobs/{job_id}", cluster["token"])
        return info if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED") else None

    try:
        info = wait_for(finished, JOB_TIMEOUT_S, f"job {job_id}")
    finally:
        logs = http_json(f"{cluster['dashboard']}/api/jobs/{job_id}/logs", cluster["token"])["logs"]
        (cluster["root"] / "job.log").write_text(logs)
    print(f"job {job_id}: {info['status']} after {time.monotonic() - t0:.0f}s")
    assert info["status"] == "SUCCEEDED", f"{info.get('message')}\n--- job logs (tail) ---\n{logs[-6000:]}"

    client = MlflowClient(cluster["mlflow"])
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert exp is not None, "experiment missing from the MLflow server"
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2, [(r.info.run_name, r.data.tags) for r in runs]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert "config/resolved.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id, "config")}

    used_nodes = set()
    for child in children:
        assert child.info.status == "FINISHED", (
            f"{child.info.run_name}: {child.data.tags.get('rayssl.error')}\n--- job logs (tail) ---\n{logs[-8000:]}")
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert len(client.get_metric_history(child.info.run_id, "knn_top1")) == 1
        assert child.data.params["train.storage_path"] == str(storage)
        used_nodes.add(child.data.tags["rayssl.trial_node_id"])
        used_nodes.update(child.data.tags["rayssl.worker_node_ids"].split(","))
    assert used_nodes <= cluster["node_ids"], (used_nodes, cluster["node_ids"])
    assert used_nodes == cluster["node_ids"], f"the sweep used only {used_nodes} of {cluster['node_ids']}"
    workers = {c.data.tags["rayssl.worker_node_ids"] for c in children}
    assert workers == cluster["node_ids"], f"each trial should train on its own node: {workers}"

    # Checkpoints and Tune state landed on the storage path every node shares.
    assert list(storage.glob("**/checkpoint_*")), sorted(str(p) for p in storage.rglob("*"))[:50]
