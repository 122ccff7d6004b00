"""The entry scripts' shared main: compose + validate the config, then plan or run.

``python experiments/{sweep,train}.py [overrides]`` end here. Hydra composes ``conf/`` with
the command-line overrides (the same syntax as ``@hydra.main``); every config error, a typo
or a bad value, exits 2 with ``config error: <key>...`` before anything heavy is imported,
and data-source errors exit 2 with ``data error: ...``. ``plan=true`` prints the launch plan
(rayssl/plan.py) and exits without training: 0, or 2 when the trial can never fit the cluster.
"""

from __future__ import annotations

import logging
import sys
from typing import Callable, Dict, Sequence

from rayssl.config import CONF_DIR, ConfigError, ExperimentConfig, check_sweep, compose
from rayssl.data.spec import DataSourceError

USAGE = """usage: python experiments/{command}.py [experiment=RECIPE] [group=OPTION ...] [group.key=VALUE ...]

Recipes (experiment=...): {recipes}
Groups: {groups}
plan=true prints the launch plan (resources, batch, lr, schedules, crops, throughput) and exits.
Keys and their defaults: platform/rayssl/config.py and dinov3/config.py; recipes: conf/experiment/."""


def _options(group: str) -> str:
    return ", ".join(sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")))


def main(command: str, argv: Sequence[str], runners: Dict[str, Callable[[ExperimentConfig], object]],
         config_name: str = "config") -> int:
    """Compose, validate, then plan or run ``runners[command]``; returns the exit status."""
    if any(a in ("-h", "--help") for a in argv):
        groups = "; ".join(f"{g}: {_options(g)}" for g in ("model", "method", "data", "train", "sweep"))
        print(USAGE.format(command=command, recipes=_options("experiment"), groups=groups))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = compose(argv, config_name=config_name)
        if command == "sweep":
            check_sweep(cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    try:
        if cfg.plan:
            from rayssl.plan import make_plan

            plan = make_plan(cfg, command)
            print(plan.render())
            return 2 if plan.errors else 0
        result = runners[command](cfg)
    except ConfigError as err:  # found once Ray is up: a trial that can never fit the cluster
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except DataSourceError as err:
        print(f"data error: {err}", file=sys.stderr)
        return 2
    if isinstance(result, dict) and command == "sweep" and not result.get("best"):
        return 1
    return 0
