"""Convert an ImageFolder (or the CIFAR-10 download) to Parquet shards for data=parquet.

    python experiments/prepare_data.py source=/path/to/imagefolder output=/path/to/parquet \
        [resize=256] [shard_size=5000] [force=true]
    python experiments/prepare_data.py source=cifar10 output=~/.cache/dinov3-ray/cifar10

Writes <output>/{train,val|test}/part-*.parquet (image JPEG bytes, label, key), classes.json
and manifest.json (counts, skipped files, per-shard sha256). Re-running with the same
arguments on an intact output does nothing. The logic lives in rayssl.data.prepare.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Optional

import hydra
from hydra.core.config_store import ConfigStore
from hydra.utils import to_absolute_path
from omegaconf import OmegaConf


@dataclass
class PrepareConfig:
    source: str = "???"          # ImageFolder directory / URI, or "cifar10"
    output: str = "???"          # output directory
    resize: Optional[int] = None  # short-side resize (px) before JPEG re-encoding
    shard_size: int = 5000       # rows per Parquet shard
    force: bool = False          # rewrite even when the manifest matches
    progress: bool = True


ConfigStore.instance().store(name="prepare_data", node=PrepareConfig)


@hydra.main(version_base=None, config_name="prepare_data")
def main(cfg) -> None:
    from rayssl.data import DataSourceError
    from rayssl.data.catalog import prepare

    c = PrepareConfig(**OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True))
    if c.shard_size < 1:
        sys.exit(f"shard_size={c.shard_size}: must be >= 1")
    if c.resize is not None and c.resize < 1:
        sys.exit(f"resize={c.resize}: must be >= 1")
    source = c.source if (c.source == "cifar10" or "://" in c.source) else to_absolute_path(c.source)
    output = to_absolute_path(c.output)
    try:
        man = prepare(source, output, resize=c.resize, shard_size=c.shard_size, progress=c.progress,
                           force=c.force)
    except DataSourceError as err:
        sys.exit(f"error: {err}")
    summary = {split: {"rows": rec["rows"], "skipped": rec.get("skipped", 0), "shards": len(rec["shards"])}
               for split, rec in man["splits"].items()}
    state = "up to date (nothing written)" if man.get("skipped_existing") else "written"
    print(f"{output}: {state}; classes={len(man['classes'])}; " + json.dumps(summary))


if __name__ == "__main__":
    main()
