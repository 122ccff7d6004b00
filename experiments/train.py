#!/usr/bin/env python
"""One DINOv3 training run (no sweep) on Ray Train, logged to MLflow as one run.

    python experiments/train.py model=micro train.epochs=2 train.num_workers=2 train.cpus_per_worker=0.5
    python experiments/train.py train.run_name=my-run                   # re-run the same name to resume
    python experiments/train.py experiment=cifar10 plan=true
    python experiments/train.py experiment=imagenet_vitl16 data.path=/data/imagenet
"""

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "platform")]


def run(cfg):
    from rayssl.launch import run_training

    return run_training(cfg)


if __name__ == "__main__":
    from rayssl.cli import main

    sys.exit(main("train", sys.argv[1:], {"train": run}))
