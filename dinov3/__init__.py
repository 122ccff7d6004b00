"""DINOv3 self-supervised pretraining in plain PyTorch + timm (no Ray, MLflow or Hydra).

The names below load on first use (PEP 562): the CPU data actors import only
``dinov3.augment``, and an eager ``dinov3.model`` import would load timm (and torchvision)
into every one of them.
"""

import importlib

_EXPORTS = {
    "DINOv3Config": "dinov3.config",
    "DINOv3": "dinov3.model", "DINOv3Output": "dinov3.model", "build_method": "dinov3.model",
    "check_config": "dinov3.config",
    "sinkhorn_knopp": "dinov3.losses", "dino_loss": "dinov3.losses", "ibot_loss": "dinov3.losses",
    "koleo_loss": "dinov3.losses", "gram_loss": "dinov3.losses",
    "block_mask": "dinov3.masking", "generate_masks": "dinov3.masking",
    "knn_classify": "dinov3.evaluation", "linear_probe": "dinov3.evaluation",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dinov3' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
