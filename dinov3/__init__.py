"""DINOv3 self-supervised pretraining in plain PyTorch + timm (no Ray, MLflow or Hydra)."""

from dinov3.config import DINOv3Config
from dinov3.evaluation import knn_classify, linear_probe
from dinov3.losses import dino_loss, gram_loss, ibot_loss, koleo_loss, sinkhorn_knopp
from dinov3.masking import block_mask, generate_masks
from dinov3.model import DINOv3, DINOv3Output, build_method, check_config

__all__ = [
    "DINOv3Config", "DINOv3", "DINOv3Output", "build_method", "check_config",
    "sinkhorn_knopp", "dino_loss", "ibot_loss", "koleo_loss", "gram_loss",
    "block_mask", "generate_masks", "knn_classify", "linear_probe",
]
