#!/usr/bin/env python
"""The training loop's per-step cost: rayssl.loop.Trainer against the bare step, side by side.

    python experiments/bench_loop.py                       # quickstart model, 32/16 px, CPU
    python experiments/bench_loop.py --steps 40 --repeat 5 model=micro
    python experiments/bench_loop.py --device cuda experiment=imagenet_vits16 data.path=/x train.global_batch_size=64

"bare" is the minimum a step needs (schedules, the method's forward and backward, the NaN
guard, clipping, AdamW, the EMA teacher), inline; "trainer" is the Trainer's loop over the same
in-memory batches (telemetry windows, checkpoint cadence, epoch reports; no k-NN, no MLflow).
Both alternate in turn (``--repeat`` rounds of ``--steps`` steps each, after warm-up); each
prints the median seconds per step, and the ratio trainer / bare. Config overrides (Hydra
syntax) pick the model and crops.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "platform")]

import torch  # noqa: E402

from rayssl import method as method_door  # noqa: E402
from rayssl.config import compose  # noqa: E402
from rayssl.loop import Trainer, Worker, check_finite  # noqa: E402


def make_batches(cfg, n: int, device):
    """``n`` distinct multi-crop batches of random images, made once, on ``device``."""
    d, b = cfg.data, cfg.train.worker_batch_size
    aug = method_door.transforms().MultiCropAugmentation(d.global_size, d.local_size, d.n_local)
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        images = [torch.randint(0, 256, (3, d.global_size + 8, d.global_size + 8), dtype=torch.uint8, generator=g)
                  for _ in range(b)]
        gl, lo = aug.batch(images, [torch.Generator().manual_seed(i * b + j) for j in range(b)])
        out.append({"global": gl.to(device), "local": lo.to(device), "epoch": torch.zeros(b, dtype=torch.long)})
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_steps(trainer: Trainer, batches, device) -> list:
    """Per-step seconds of the inline minimum, on the trainer's own method and optimiser."""
    method, opt, times = trainer.method, trainer.optimizer, []
    for step, batch in enumerate(batches):
        sync(device)
        t0 = time.perf_counter()
        hp = method.apply_schedules(opt, step)
        local = batch["local"] if batch["local"].shape[1] else None
        out = method.forward_backward(batch["global"], local, autocast=trainer.autocast)
        check_finite(method_door.loss_terms(out), step)
        method.clip_gradients()
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.update_teacher(hp["momentum"])
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def trainer_steps(cfg, batches, device) -> list:
    """Per-step seconds inside Trainer.fit (between consecutive steps' starts)."""
    stamps = []
    with tempfile.TemporaryDirectory() as tmp:
        worker = Worker(batches=lambda: batches, report=lambda m, c: None, device=device, run_dir=tmp,
                        n_train=len(batches) * cfg.train.global_batch_size,
                        before_step=lambda s: (sync(device), stamps.append(time.perf_counter())))
        Trainer(cfg, worker).fit()
    sync(device)
    stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    args, overrides = p.parse_known_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n = args.warmup + args.steps
    # one epoch of exactly n steps, no checkpoint or k-NN inside it: the loop's own cost only
    cfg = compose(["train.epochs=1", "train.system_metrics=false", f"train.checkpoint_every={10 * n}",
                   *overrides])
    batches = make_batches(cfg, n, device)
    bare, loop = [], []
    for r in range(args.repeat):
        ref = Trainer(cfg, Worker(batches=lambda: batches, report=lambda m, c: None, device=device, run_dir="/x",
                                  n_train=n * cfg.train.global_batch_size))
        bare += bare_steps(ref, batches, device)[args.warmup:]
        loop += trainer_steps(cfg, batches, device)[args.warmup:]
        print(f"round {r + 1}/{args.repeat}: bare {statistics.median(bare):.4f} s/step, "
              f"trainer {statistics.median(loop):.4f} s/step", flush=True)
    res = {"device": str(device), "recipe": cfg.recipe, "backbone": cfg.model.backbone,
           "batch": cfg.train.worker_batch_size, "steps": len(bare),
           "bare_median_s": round(statistics.median(bare), 5), "trainer_median_s": round(statistics.median(loop), 5)}
    res["ratio_trainer_over_bare"] = round(res["trainer_median_s"] / res["bare_median_s"], 3)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
