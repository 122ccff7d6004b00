"""The trained teacher as artifacts: safetensors weights and an MLflow image-embedding model.

At the end of training (rank 0) :func:`log_encoder` attaches to the run:

* ``model/teacher_backbone.safetensors``: the teacher backbone's state dict;
* ``model/`` as an MLflow PyTorch model (``mlflow.pytorch.load_model("runs:/ID/model")``)
  whose module maps images ``[B, 3, H, W]`` (uint8, or float already normalised) to
  teacher CLS features ``[B, D]`` (``method.export_encoder()``). The ``dinov3`` package
  travels inside the model (``code_paths``) so loading needs only torch and timm.

:func:`load_encoder` turns any of these back into an encoder: an MLflow model URI
(``runs:/ID/model``, ``models:/...``, a local model dir) or a Ray checkpoint directory
(``state.pt`` with its config).
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any, Dict, Optional, Tuple

import torch

from rayssl.checkpoint import CHECKPOINT_FILE
from rayssl.config import from_dict
from rayssl.method import build_method

log = logging.getLogger("rayssl.export")

SAFETENSORS_FILE = "teacher_backbone.safetensors"
MODEL_ARTIFACT = "model"
DINOV3_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "dinov3")


def _requirements():
    from importlib.metadata import version

    reqs = []
    for pkg in ("torch", "timm", "safetensors"):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except Exception:  # noqa: BLE001
            reqs.append(pkg)
    return reqs


def save_encoder(encoder: torch.nn.Module, path: str) -> None:
    """An MLflow PyTorch model dir at ``path`` (must not exist) plus the backbone safetensors in it."""
    import mlflow.pytorch
    from safetensors.torch import save_file

    encoder = encoder.cpu().eval()
    code = [DINOV3_DIR] if os.path.isdir(DINOV3_DIR) else None
    mlflow.pytorch.save_model(encoder, path, code_paths=code, pip_requirements=_requirements(),
                              serialization_format="pickle")
    state = {k: v.detach().contiguous().clone() for k, v in encoder.backbone.state_dict().items()}
    save_file(state, os.path.join(path, SAFETENSORS_FILE))


def log_encoder(method: torch.nn.Module, tracking_uri: Optional[str], run_id: str, image_size: int = 0) -> None:
    """Attach ``model/`` (MLflow model + ``teacher_backbone.safetensors``) to the run."""
    from mlflow.tracking import MlflowClient

    encoder = method.export_encoder()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, MODEL_ARTIFACT)
        save_encoder(encoder, path)
        MlflowClient(tracking_uri).log_artifacts(run_id, path, MODEL_ARTIFACT)
    log.info("logged the teacher encoder to run %s as %s/ (%s)", run_id, MODEL_ARTIFACT, SAFETENSORS_FILE)


def load_checkpoint_state(path: str) -> Dict[str, Any]:
    file = path if path.endswith(".pt") else os.path.join(path, CHECKPOINT_FILE)
    return torch.load(file, map_location="cpu", weights_only=False)


def method_from_checkpoint(path: str, cfg=None) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """(method with the checkpoint's weights, state) from a Ray checkpoint dir.

    The method is built from the config stored in the checkpoint, else from ``cfg``.
    """
    state = load_checkpoint_state(path)
    if state.get("config"):
        cfg = from_dict(state["config"])
    if cfg is None:
        raise ValueError(f"{path}: the checkpoint holds no config; pass the run's config")
    method = build_method(cfg.method.name, cfg.method_kwargs())
    method.load_state_dict(state["method"])
    return method.eval(), state


def load_encoder(source: str, cfg=None) -> torch.nn.Module:
    """Image encoder (images -> [B, D]) from an MLflow model URI/dir or a Ray checkpoint dir."""
    local = os.path.expanduser(source)
    if os.path.isdir(local) and os.path.exists(os.path.join(local, CHECKPOINT_FILE)) or local.endswith(".pt"):
        method, _ = method_from_checkpoint(local, cfg)
        return method.export_encoder()
    import mlflow.pytorch

    return mlflow.pytorch.load_model(source, map_location="cpu").eval()
