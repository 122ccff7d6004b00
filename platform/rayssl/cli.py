"""Shared start-up for the Hydra entry scripts: validate, then hand over; errors exit cleanly."""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable

from rayssl.config import ConfigError, ExperimentConfig, load_config


def run_main(raw_cfg: Any, main: Callable[[ExperimentConfig], Any]) -> Any:
    """Validate the composed config before any Ray work; config and data errors exit 2 naming the key/path."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(raw_cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    from rayssl.data import DataSourceError

    try:
        return main(cfg)
    except DataSourceError as err:
        print(f"data error: {err}", file=sys.stderr)
        sys.exit(2)
