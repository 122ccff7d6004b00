#!/usr/bin/env python
"""One DINOv3 training run (no sweep) on Ray Train, logged to MLflow as one run.

    python experiments/train.py model=micro train.epochs=2 train.num_workers=2 train.cpus_per_worker=0.5
    python experiments/train.py train.run_name=my-run   # re-run the same name to resume
"""

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "platform")]

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(raw: DictConfig) -> None:
    from rayssl.cli import run_main
    from rayssl.trainer import run_training

    run_main(raw, run_training)


if __name__ == "__main__":
    main()
