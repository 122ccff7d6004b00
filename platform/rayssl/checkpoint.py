"""Checkpoints of one run: find the newest readable one, load it, save one, and say when one is due.

A run's checkpoints are directories ``<storage>/<run name>/checkpoint_*`` (Ray Train creates
them from what :meth:`Checkpointer.save` writes; any storage pyarrow reaches: local, NFS,
S3, GCS). Each holds ``state.pt`` (everything to continue bit for bit: weights, optimiser,
step, RNG states, ...) and ``meta.json`` (step and epoch, small enough for the driver to read
before it builds the data stream, so a resumed run starts the stream at its epoch).
No Ray imports: the training loop's tests run it on local directories.
"""

from __future__ import annotations

import io
import json
import logging
import os
from typing import Any, Dict, List, Optional, Tuple

import torch

log = logging.getLogger("rayssl.checkpoint")

CHECKPOINT_FILE = "state.pt"
META_FILE = "meta.json"
PREFIX = "checkpoint_"


def _fs(path: str):
    """(pyarrow filesystem, path inside it) for a local path or a URI."""
    import pyarrow.fs as pafs

    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def storage_join(storage_path: str, name: str) -> str:
    return f"{storage_path.rstrip('/')}/{name}" if "://" in storage_path else os.path.join(storage_path, name)


def list_checkpoints(run_dir: str) -> List[str]:
    """``checkpoint_*`` directories under ``run_dir``, newest first (Ray names them by time);
    [] when there are none or the store cannot be listed."""
    import pyarrow.fs as pafs

    try:
        fs, root = _fs(run_dir)
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except Exception as err:  # noqa: BLE001  an unlistable store falls back to Ray's own record
        log.warning("cannot list checkpoints under %s (%s)", run_dir, err)
        return []
    dirs = sorted((i.path for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith(PREFIX)),
                  reverse=True)
    scheme = run_dir.split("://", 1)[0] + "://" if "://" in run_dir else ""
    return [scheme + d if scheme and "://" not in d else d for d in dirs]


def _read(path: str, name: str) -> bytes:
    fs, root = _fs(path)
    with fs.open_input_stream(f"{root.rstrip('/')}/{name}") as f:
        return f.read()


def read_meta(path: str) -> Dict[str, Any]:
    return json.loads(_read(path, META_FILE))


def read_state(path: str) -> Dict[str, Any]:
    return torch.load(io.BytesIO(_read(path, CHECKPOINT_FILE)), map_location="cpu", weights_only=False)


def newest_meta(run_dir: str) -> Optional[Dict[str, Any]]:
    """Step and epoch of the newest complete checkpoint of a run, or None (the driver's view,
    before the data stream is built)."""
    for path in list_checkpoints(run_dir):
        try:
            return read_meta(path)
        except Exception:  # noqa: BLE001  cut short by a failure: the one before it counts
            continue
    return None


class Checkpointer:
    """Where a run's checkpoints live and when they are due.

    ``every`` steps (0: at every epoch end) and always at the last step; :meth:`load` takes
    the newest readable checkpoint of the run (a worker killed right after a save leaves one
    Ray Train never registered), else ``registered`` (Ray's record), else ``resume_from``.
    """

    def __init__(self, run_dir: str, every: int, steps_per_epoch: int, total_steps: int,
                 registered: Optional[str] = None, resume_from: Optional[str] = None):
        self.run_dir, self.every = run_dir, int(every)
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        self.registered, self.resume_from = registered, resume_from

    def due(self, step: int) -> bool:
        period = self.every or self.steps_per_epoch
        return step % period == 0 or step == self.total_steps

    def candidates(self) -> List[str]:
        found = list_checkpoints(self.run_dir)
        if self.registered and self.registered not in found:
            found.append(self.registered)
        if not found and self.resume_from:
            found.append(self.resume_from)
        return found

    def load(self, candidates: Optional[List[str]] = None) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
        """(state, path) of the first of ``candidates`` (default: :meth:`candidates`) that loads,
        or (None, None)."""
        for path in self.candidates() if candidates is None else candidates:
            try:
                return read_state(path), path
            except Exception as err:  # noqa: BLE001  a checkpoint cut short by the failure itself
                log.warning("skipping unreadable checkpoint %s: %s", path, err)
        return None, None

    @staticmethod
    def save(state: Dict[str, Any], directory: str) -> str:
        """Write ``state`` (with its ``step`` and ``epoch``) into ``directory``; returns it."""
        os.makedirs(directory, exist_ok=True)
        torch.save(state, os.path.join(directory, CHECKPOINT_FILE))
        with open(os.path.join(directory, META_FILE), "w") as f:
            json.dump({"step": int(state["step"]), "epoch": state.get("epoch")}, f)
        return directory
