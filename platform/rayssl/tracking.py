"""MLflow runs: one experiment, a parent run per sweep, a nested child run per trial.

Everything goes through ``MlflowClient`` with explicit run ids (never the
fluent API's process-global "active run"), so Tune trial actors and Train
workers can log into runs created by the driver. Nesting is the
``mlflow.parentRunId`` tag.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from typing import Any, Dict, Iterable, Optional

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

log = logging.getLogger(__name__)

TRIAL_TAG = "rayssl.trial_id"
SWEEP_TAG = "rayssl.sweep"
ROLE_TAG = "rayssl.role"
ERROR_TAG = "rayssl.error"
MAX_PARAM_LEN = 6000


def client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri)


def get_or_create_experiment(uri: str, name: str) -> str:
    """Create the experiment once, from the driver (concurrent first creation races on SQLite)."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=default_artifact_location(uri))
    except Exception:  # created meanwhile by another driver
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def default_artifact_location(uri: str) -> Optional[str]:
    """Artifacts of a ``sqlite:///DIR/x.db`` store go to ``DIR/mlruns`` (absolute), not to
    ``./mlruns`` of whichever directory the first run started in; servers decide their own."""
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///"):]
        return os.path.join(os.path.dirname(os.path.abspath(db)), "mlruns")
    return None


def find_run(uri: str, experiment_id: str, tags: Dict[str, str]) -> Optional[str]:
    """The newest run carrying all ``tags`` (used to continue a run after a restart)."""
    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client(uri).search_runs([experiment_id], filter_string=flt, max_results=1,
                                   order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def create_run(uri: str, experiment_id: str, name: str, tags: Optional[Dict[str, str]] = None,
               parent_run_id: Optional[str] = None) -> str:
    tags = dict(tags or {})
    tags[MLFLOW_RUN_NAME] = name
    if parent_run_id:
        tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    run = client(uri).create_run(experiment_id, tags=tags, run_name=name)
    return run.info.run_id


def log_params(uri: str, run_id: str, params: Dict[str, Any]) -> None:
    """Log params that are not there yet (MLflow refuses to change a logged value)."""
    c = client(uri)
    existing = c.get_run(run_id).data.params
    fresh = [Param(k, _param_str(v)) for k, v in params.items() if k not in existing]
    for i in range(0, len(fresh), 100):
        c.log_batch(run_id, params=fresh[i:i + 100])


def _param_str(v: Any) -> str:
    s = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return s[:MAX_PARAM_LEN]


def set_tags(uri: str, run_id: str, tags: Dict[str, Any]) -> None:
    client(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    client(uri).log_text(run_id, text, artifact_file)


def log_artifact(uri: str, run_id: str, path: str, artifact_path: Optional[str] = None) -> None:
    client(uri).log_artifact(run_id, path, artifact_path)


def end_run(uri: str, run_id: str, status: str = "FINISHED", error: Optional[BaseException] = None) -> None:
    """Close the run; a failure's exception is kept as the ``rayssl.error`` tag (shown in the UI)."""
    if error is not None:
        client(uri).set_tag(run_id, ERROR_TAG, f"{type(error).__name__}: {error}"[:5000])
    client(uri).set_terminated(run_id, status=status)


class MetricLogger:
    """Buffered metric logging into one run; non-finite values are skipped, not sent."""

    def __init__(self, uri: str, run_id: str):
        self.client = client(uri)
        self.run_id = run_id

    def log(self, metrics: Dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))]
        for i in range(0, len(batch), 500):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 500])

    def logged_steps(self, key: str) -> Iterable[int]:
        return [m.step for m in self.client.get_metric_history(self.run_id, key)]


class ResumableLogger(MetricLogger):
    """MetricLogger that, in a resumed run, drops points at steps the run already holds.

    A restarted worker group replays the steps between the last checkpoint and the
    failure; their metrics were logged by the previous attempt, so only steps past the
    last logged step of each key are sent (no duplicated step indices).
    """

    def __init__(self, uri: str, run_id: str, resumed: bool):
        super().__init__(uri, run_id)
        self.floor: Dict[str, int] = {}
        if resumed:
            run = self.client.get_run(run_id)
            for key in run.data.metrics:
                if key.startswith("system/"):
                    continue
                steps = [m.step for m in self.client.get_metric_history(run_id, key)]
                if steps:
                    self.floor[key] = max(steps)

    def log(self, metrics: Dict[str, float], step: int) -> None:
        fresh = {k: v for k, v in metrics.items() if step > self.floor.get(k, -1)}
        if fresh:
            super().log(fresh, step)


def start_system_metrics(uri: str, run_id: str, interval_s: float, resume: bool = True):
    """MLflow's system-metrics sampler (CPU, memory, disk, network; GPU with nvidia-ml-py), or None."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, samples_before_logging=1,
                                       resume_logging=resume, tracking_uri=uri)
        monitor.start()
        return monitor
    except Exception as err:  # noqa: BLE001  telemetry must never stop training
        log.warning("system metrics disabled: %s", err)
        return None


def stop_system_metrics(monitor) -> None:
    try:
        monitor.finish()
    except Exception as err:  # noqa: BLE001
        log.warning("could not stop system metrics: %s", err)


def log_dict_artifact(uri: str, run_id: str, obj: Dict[str, Any], artifact_file: str) -> None:
    """Write ``obj`` as YAML (``.yaml``) or JSON and attach it to the run."""
    if artifact_file.endswith((".yaml", ".yml")):
        import yaml

        text = yaml.safe_dump(obj, sort_keys=False)
    else:
        text = json.dumps(obj, indent=2)
    log_text(uri, run_id, text, artifact_file)


def log_figure(uri: str, run_id: str, fig, artifact_file: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, os.path.basename(artifact_file))
        fig.savefig(path, dpi=100, bbox_inches="tight")
        client(uri).log_artifact(run_id, path, os.path.dirname(artifact_file) or None)


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """Where to look at a run: the server's page, or the store for `mlflow ui`."""
    if uri.startswith("http"):
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"run {run_id} in {uri} (mlflow ui --backend-store-uri {uri})"


def register_model(uri: str, run_id: str, name: str, artifact_path: str = "model") -> Optional[str]:
    """Register ``runs:/<run_id>/<artifact_path>`` as a new version of ``name``; None if the run has no model."""
    c = client(uri)
    if not any(a.path == artifact_path for a in c.list_artifacts(run_id)):
        log.warning("run %s has no '%s' artifact: nothing to register", run_id, artifact_path)
        return None
    try:
        c.create_registered_model(name)
    except Exception:  # already registered: add a version
        pass
    run = c.get_run(run_id)
    version = c.create_model_version(name, source=f"{run.info.artifact_uri}/{artifact_path}", run_id=run_id,
                                     tags={"rayssl.source": f"runs:/{run_id}/{artifact_path}"})
    return version.version
