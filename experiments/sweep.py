#!/usr/bin/env python
"""Ray Tune sweep of DINOv3 pretraining, one TorchTrainer per trial, logged to MLflow.

    python experiments/sweep.py                                   # offline quickstart
    python experiments/sweep.py model=micro train.epochs=1 sweep.num_samples=2
    python experiments/sweep.py data=imagefolder data.path=/data/imagenet model=vit_small train=gpu
"""

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "platform")]

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(raw: DictConfig) -> None:
    from rayssl.cli import run_main
    from rayssl.sweep import run_sweep

    summary = run_main(raw, run_sweep)
    if not summary.get("best"):
        sys.exit(1)


if __name__ == "__main__":
    main()
