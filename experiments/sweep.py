#!/usr/bin/env python
"""Ray Tune sweep of DINOv3 pretraining, one TorchTrainer per trial, logged to MLflow.

    python experiments/sweep.py                                         # the offline quickstart
    python experiments/sweep.py model=micro train.epochs=1 sweep.num_samples=2
    python experiments/sweep.py experiment=imagenet_vits16 data.path=/data/imagenet plan=true
    python experiments/sweep.py experiment=imagenet_vits16 data.path=/data/imagenet
"""

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "platform")]


def run(cfg):
    from rayssl.sweep import run_sweep

    return run_sweep(cfg)


if __name__ == "__main__":
    from rayssl.cli import main

    sys.exit(main("sweep", sys.argv[1:], {"sweep": run}))
