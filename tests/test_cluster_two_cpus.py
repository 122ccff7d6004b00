"""No deadlock on a plain 2-CPU `ray start` node: one sweep trial with 2 DDP Train workers
(0.5 CPU each) plus a 1-CPU Ray Data actor fills the node exactly, so the trial function
itself must hold no CPU, and what keeps it off the CPU budget must not be a custom
resource (this node declares none). The same shape runs under a local `ray.init` in
tests/test_sweep_integration.py. The trial trains on Parquet shards that
experiments/prepare_data.py made from an ImageFolder (the user's path, end to end)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from test_cluster_job_submit import BIN, REPO, Processes, free_ports, kill_leftovers, wait_for
from test_data_sources import make_clean_imagefolder

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

OVERRIDES = [
    "model=micro", "data=parquet", "train.epochs=1", "train.num_workers=2", "train.cpus_per_worker=0.5",
    "data.num_actors=1", "data.cpus_per_actor=1", "train.global_batch_size=32", "train.log_every=2",
    "data.n_local=2", "data.map_batch_size=32",
    "sweep.num_samples=1", "sweep.max_concurrent_trials=0", "train.system_metrics=false",
    "tracking.experiment=it-two-cpus", "tracking.register_model_name=null",
]


def prepare(source: Path, output: Path) -> str:
    out = subprocess.run([sys.executable, "experiments/prepare_data.py", f"source={source}", f"output={output}",
                          "shard_size=25", "progress=false"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_ddp_trial_with_data_actor_completes_on_a_plain_two_cpu_node(tmp_path):
    from mlflow.tracking import MlflowClient

    src = make_clean_imagefolder(tmp_path / "images", n_per_class=22)  # 66 train, 6 val images
    shards = tmp_path / "shards"
    first = prepare(src, shards)
    assert "written" in first and '"train": {"rows": 66, "skipped": 0, "shards": 3}' in first, first
    manifest = (shards / "manifest.json").read_text()
    assert "up to date (nothing written)" in prepare(src, shards)  # idempotent
    assert (shards / "manifest.json").read_text() == manifest

    ray_tmp = Path(f"/tmp/rsl2c{os.getpid()}_{secrets.token_hex(3)}")  # short: unix socket paths
    ray_tmp.mkdir(parents=True)
    gcs_port, dash_port, client_port, *ports = free_ports(3 + 6)
    nm, om, agent_http, agent_grpc, rt_agent, metrics = ports
    token_file = tmp_path / "auth_token"  # Ray's default token authentication, with our own token
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "RAYSSL_"))}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file), "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "RAY_DEDUP_LOGS": "0",
                "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"})
    gcs = f"127.0.0.1:{gcs_port}"
    procs = Processes()
    try:
        head = procs.start(
            [str(BIN / "ray"), "start", "--head", f"--port={gcs_port}", f"--temp-dir={ray_tmp}",
             "--include-dashboard=false", f"--dashboard-port={dash_port}", f"--ray-client-server-port={client_port}",
             "--node-ip-address=127.0.0.1", f"--node-manager-port={nm}", f"--object-manager-port={om}",
             f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
             f"--runtime-env-agent-port={rt_agent}", f"--metrics-export-port={metrics}",
             "--num-cpus=2", "--num-gpus=0", f"--object-store-memory={200 * 2**20}", "--disable-usage-stats",
             "--block"],
            env=env, log_path=tmp_path / "head.log", cwd=tmp_path)
        check = [sys.executable, "-c", "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
                 "r = ray.cluster_resources(); print(r); assert r.get('CPU') == 2 and "
                 "not set(r) - {'CPU', 'memory', 'object_store_memory'} - {k for k in r if k.startswith('node:')}",
                 gcs]
        wait_for(lambda: subprocess.run(check, env=env, capture_output=True, timeout=60).returncode == 0,
                 180, "a plain 2-CPU node", [head])

        uri = f"sqlite:///{tmp_path}/mlflow.db"
        cmd = [sys.executable, "experiments/sweep.py", *OVERRIDES, f"data.path={shards}", f"ray.address={gcs}",
               f"tracking.uri={uri}",
               f"train.storage_path={tmp_path}/ray_results"]
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]

        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("it-two-cpus")
        runs = client.search_runs([exp.experiment_id])
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        assert len(children) == 1 and children[0].info.status == "FINISHED", [
            (r.info.run_name, r.info.status, r.data.tags.get("rayssl.error")) for r in runs]
        child = children[0]
        assert len(client.get_metric_history(child.info.run_id, "knn_top1")) == 1
        # one epoch = 66 images // (16 per worker x 2 DDP workers) = 2 steps
        assert child.data.params["train.num_workers"] == "2"
        assert [m.step for m in client.get_metric_history(child.info.run_id, "data_skipped")] == [2]
    finally:
        procs.stop_all()
        kill_leftovers([ray_tmp])
