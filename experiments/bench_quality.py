#!/usr/bin/env python
"""Feature quality on real images: this project's ``cifar10`` recipe against the original
module (``stable_pretraining.methods.dinov3.DINOv3``, stable-pretraining 0.1.8) on CIFAR-10,
trained side by side on this CPU, plus one run of the recipe with ``method.koleo_weight=0``.

Both sides get the same images in the same order, the same multi-crop augmentation with the
same per-image seeds (``dinov3.augment.MultiCropAugmentation``), the same backbone size, batch,
number of steps and peak learning rate (linear warm-up + cosine, applied to the original
module's AdamW too, which has no schedule of its own). Every ``--eval-every`` steps both are
scored with the same code: weighted k-NN (DINO protocol, k=20, T=0.07,
``dinov3.evaluation.knn_classify``) of the EMA teacher's CLS after the final norm, on a fixed
subset of the train split (bank) and of the test split (queries), both resized and
centre-cropped by ``dinov3.augment.EvalTransform``.

This project's side is built from the Hydra recipe (``experiment=cifar10`` plus the size
overrides below), so the recipe is what is measured; the original module runs in its own
virtual environment (``--seed-python``, default ``$SEED_PYTHON`` or ``/tmp/seed-venv/bin/python``)
through ``experiments/_quality_seed_worker.py``, and is skipped with a message when that
interpreter is missing. It pulls in about 100 packages, so never into this project's environment:

    python3 -m venv /tmp/seed-venv
    /tmp/seed-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 stable-pretraining==0.1.8

    PYTHONPATH=.:platform python experiments/bench_quality.py --jobs 3 --threads 2 --knn-query 5000  # ~1.5 h
    PYTHONPATH=.:platform python experiments/bench_quality.py --runs ours --steps 300 \\
        --override method.weight_decay_end=0.04                              # one variant

Data: CIFAR-10 as an ImageFolder of JPEGs (``train/`` and ``test/``, a folder per class) at
``$DINOV3_CIFAR10_DIR`` (default: ``shared/data/cifar10`` beside the repository's folder), decoded once into uint8 tensors cached under the
output directory. Outputs (``--out``, default ``/tmp/dinov3_bench_quality``): ``quality.json``
(every number), ``quality.png`` (k-NN against steps), one ``<run>.json`` per run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
for _p in (str(REPO), str(REPO / "platform")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from dinov3.augment import EvalTransform, MultiCropAugmentation  # noqa: E402  (torch only)
from dinov3.config import DINOv3Config  # noqa: E402
from dinov3.evaluation import knn_classify  # noqa: E402
from dinov3.schedules import Schedules  # noqa: E402

DEFAULT_OUT = Path(os.environ.get("DINOV3_BENCH_QUALITY_OUT", "/tmp/dinov3_bench_quality"))
DEFAULT_SEED_PYTHON = os.environ.get("SEED_PYTHON", "/tmp/seed-venv/bin/python")
# CPU size (the same for both sides): ViT width 96, depth 4, 3 heads (the recipe's patch 4: an 8x8 grid
# at 32 px), heads with a 512-wide hidden layer (the recipe's bottleneck 256), and the recipe's
# prototype counts (16384 CLS / 8192 patch at its global batch of 256) scaled with the batch: at 64
# images, 4096 / 2048 keep the prototypes per Sinkhorn row (2 global crops per image) at 32.
SIZE_OVERRIDES = {"model.embed_dim": 96, "model.depth": 4, "model.num_heads": 3, "model.head_hidden_dim": 512,
                  "model.n_cls_prototypes": 4096, "model.n_patch_prototypes": 2048}
KNN_K, KNN_T = 20, 0.07
RUN_NAMES = ("ours", "seed", "ours-koleo0")


# ---------------------------------------------------------------------------------------
# Data: CIFAR-10 decoded once, fixed k-NN subsets, a deterministic multi-crop stream
# ---------------------------------------------------------------------------------------

def cifar10_dir() -> Path:
    return Path(os.environ.get("DINOV3_CIFAR10_DIR", REPO.parent / "shared" / "data" / "cifar10"))


def _decode_split(root: Path, split: str):
    from PIL import Image

    classes = sorted(d.name for d in (root / split).iterdir() if d.is_dir())
    files = [(f, c) for c, name in enumerate(classes) for f in sorted((root / split / name).glob("*.jpg"))]
    images = torch.empty((len(files), 3, 32, 32), dtype=torch.uint8)
    labels = torch.empty(len(files), dtype=torch.long)
    for i, (path, label) in enumerate(files):
        with Image.open(path) as im:
            a = np.asarray(im.convert("RGB").resize((32, 32)) if im.size != (32, 32) else im.convert("RGB"))
        images[i] = torch.from_numpy(a.copy()).permute(2, 0, 1)
        labels[i] = label
    return images, labels, classes


def load_cifar10(root: Path, cache_dir: Path) -> Dict[str, torch.Tensor]:
    """{train_x uint8 [50000,3,32,32], train_y, test_x, test_y}; decoded JPEGs cached in ``cache_dir``."""
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        sys.exit(f"CIFAR-10 not found: {root} needs train/ and test/ (ImageFolder of JPEGs). "
                 f"Set DINOV3_CIFAR10_DIR to its location.")
    key = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]
    cache = cache_dir / f"cifar10_uint8_{key}.pt"
    if cache.is_file():
        return torch.load(cache)
    t0 = time.perf_counter()
    print(f"decoding CIFAR-10 JPEGs from {root} (once; cached at {cache}) ...", flush=True)
    tr_x, tr_y, classes = _decode_split(root, "train")
    te_x, te_y, _ = _decode_split(root, "test")
    data = {"train_x": tr_x, "train_y": tr_y, "test_x": te_x, "test_y": te_y, "classes": classes}
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = f"{cache}.{os.getpid()}.tmp"
    torch.save(data, tmp)
    os.replace(tmp, cache)
    print(f"  {len(tr_x)} train + {len(te_x)} test images in {time.perf_counter() - t0:.0f} s", flush=True)
    return data


def knn_sets(data: Dict[str, torch.Tensor], n_bank: int, n_query: int, eval_size: int, seed: int = 0):
    """Fixed subsets (same for every run): bank from train, queries from test, EvalTransform'ed."""
    ev = EvalTransform(eval_size)
    g = torch.Generator().manual_seed(1000 + seed)
    bank_idx = torch.randperm(len(data["train_x"]), generator=g)[:n_bank]
    g = torch.Generator().manual_seed(2000 + seed)
    query_idx = torch.randperm(len(data["test_x"]), generator=g)[:n_query]
    bank_x = torch.stack([ev(x) for x in data["train_x"][bank_idx]])
    query_x = torch.stack([ev(x) for x in data["test_x"][query_idx]])
    return bank_x, data["train_y"][bank_idx], query_x, data["test_y"][query_idx]


@torch.no_grad()
def knn_top1(embed: Callable[[torch.Tensor], torch.Tensor], sets, chunk: int = 500) -> float:
    """k-NN top-1 (%) of ``embed(uint8 images) -> [N, D]`` features, k=20, T=0.07."""
    bank_x, bank_y, query_x, query_y = sets
    bank = torch.cat([embed(bank_x[i:i + chunk]) for i in range(0, len(bank_x), chunk)])
    query = torch.cat([embed(query_x[i:i + chunk]) for i in range(0, len(query_x), chunk)])
    return knn_classify(bank, bank_y, query, query_y, ks=(KNN_K,), T=KNN_T, n_classes=10)[KNN_K]


class CropStream:
    """Batches of multi-crops, a pure function of (seed, step): an epoch is a permutation of
    the train split seeded by (seed, epoch); image ``i`` of epoch ``e`` is cropped with a
    generator seeded by (seed, e, i). Drops the last partial batch of an epoch."""

    def __init__(self, images: torch.Tensor, batch: int, global_size: int, local_size: int, n_local: int,
                 blur: str = "nominal", seed: int = 0):
        self.images, self.batch, self.seed = images, int(batch), int(seed)
        self.aug = MultiCropAugmentation(global_size=global_size, local_size=local_size, n_local=n_local, blur=blur)
        self.steps_per_epoch = len(images) // self.batch
        self._perm_epoch, self._perm = -1, None
        self._gens = [torch.Generator() for _ in range(self.batch)]

    def __call__(self, step: int):
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.images), generator=g), epoch
        rows = self._perm[i * self.batch:(i + 1) * self.batch]
        for gen, r in zip(self._gens, rows.tolist()):
            gen.manual_seed(((self.seed * 1_000_003 + epoch) * 100_003 + r) % (2 ** 63))
        return self.aug.batch(list(self.images[rows]), self._gens)


def eval_steps(total: int, every: int) -> List[int]:
    steps = list(range(0, total, every)) + [total]
    return sorted(set(steps))


class Progress:
    def __init__(self, name: str, total: int):
        self.name, self.total, self.t0, self.train_s = name, total, time.perf_counter(), 0.0

    def line(self, step: int, knn: float, extra: str = "") -> None:
        el = time.perf_counter() - self.t0
        sps = self.train_s / max(step, 1)
        eta = (self.total - step) * sps * 1.15
        print(f"[{self.name}] step {step:5d}/{self.total}  k-NN {knn:5.2f} %  {sps:5.2f} s/step (train)  "
              f"elapsed {el / 60:5.1f} min  ETA {eta / 60:5.1f} min  {extra}", flush=True)


# ---------------------------------------------------------------------------------------
# This project's side: the Hydra recipe
# ---------------------------------------------------------------------------------------

def compose_recipe(overrides: Sequence[str]):
    """(method kwargs, data geometry) of ``experiment=cifar10`` + ``overrides``.

    Relies on ``rayssl.config``: ``compose(overrides)`` (or, where absent, ``load_config`` of a
    Hydra composition of ``conf/config.yaml``) returning a config with ``method_kwargs()`` and
    ``data.global_size / local_size / n_local / eval_size / blur``.
    """
    import rayssl.config as rc

    ov = ["experiment=cifar10", *overrides]
    if hasattr(rc, "compose"):
        cfg = rc.compose(ov)
    else:
        from hydra import compose, initialize_config_dir

        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = rc.load_config(compose(config_name="config", overrides=ov))
    kwargs = dict(cfg.method_kwargs())
    geometry = {k: getattr(cfg.data, k) for k in ("global_size", "local_size", "n_local", "eval_size")}
    geometry["blur"] = getattr(cfg.data, "blur", "nominal")
    return kwargs, geometry


@torch.no_grad()
def diagnostics(method) -> dict:
    """Teacher CLS prototype norm (mean row norm of the last layer) and mean |LayerScale gamma|."""
    proto = method.teacher["cls_head"].last_layer.weight
    gammas = [p.abs().mean() for n, p in method.student["backbone"].named_parameters() if "gamma" in n]
    return {"proto_norm": float(proto.norm(dim=1).mean()),
            "ls_gamma": float(torch.stack(gammas).mean()) if gammas else float("nan")}


def train_ours(name: str, overrides: Sequence[str], data, sets, args) -> dict:
    from dinov3 import build_method

    kwargs, geo = compose_recipe(overrides)
    torch.manual_seed(args.seed)
    method = build_method(kwargs)
    stream = CropStream(data["train_x"], args.batch, geo["global_size"], geo["local_size"], geo["n_local"],
                        geo["blur"], seed=args.seed)
    method.configure(args.steps, stream.steps_per_epoch, args.batch)
    opt = torch.optim.AdamW(method.param_groups(), betas=(0.9, 0.999))
    ln_k, ln_kp = math.log(kwargs["n_cls_prototypes"]), math.log(kwargs["n_patch_prototypes"])
    evals = eval_steps(args.steps, args.eval_every)
    prog = Progress(name, args.steps)
    points, window = [], []
    untrained_koleo = float("nan")

    def evaluate(step: int, hp: dict) -> None:
        method.eval()
        knn = knn_top1(method.embed, sets)
        method.train()
        row = {"step": step, "knn": knn, **{k: float(v) for k, v in hp.items()}, **diagnostics(method)}
        if window:
            for k in window[0]:
                row[k] = float(np.mean([w[k] for w in window]))
        points.append(row)
        window.clear()
        nan = float("nan")
        prog.line(step, knn, f"H/lnK {row.get('entropy_frac', nan):.3f} (patch {row.get('patch_entropy_frac', nan):.3f})"
                             f"  loss {row.get('loss', nan):.3f} (cls {row.get('loss_cls', nan):.3f} patch "
                             f"{row.get('loss_patch', nan):.3f} koleo {row.get('loss_koleo', nan):.3f})  |w_proto| "
                             f"{row['proto_norm']:.3f}  |gamma| {row['ls_gamma']:.2e}  T_t {row['teacher_temp']:.3f}")

    method.train()
    hp = method.schedules.values(0)
    for step in range(args.steps + 1):
        if step in evals:
            evaluate(step, hp)
        if step == args.steps:
            break
        t0 = time.perf_counter()
        g, loc = stream(step)
        hp = method.apply_schedules(opt, step)
        opt.zero_grad(set_to_none=True)
        out = method.forward_backward(g, loc if loc.shape[1] else None)
        total = float(out.loss)
        method.clip_gradients()
        opt.step()
        method.update_teacher(hp["momentum"])
        prog.train_s += time.perf_counter() - t0
        if not math.isfinite(total):
            raise FloatingPointError(f"[{name}] loss {total} at step {step}")
        if step == 0:  # the untrained network's CLS crowding (the term is computed with koleo_weight=0 too)
            untrained_koleo = float(out.loss_koleo)
        window.append({"loss": total, "loss_cls": float(out.loss_cls), "loss_patch": float(out.loss_patch),
                       "loss_koleo": float(out.loss_koleo),
                       "entropy_frac": float(out.metrics["teacher_entropy"]) / ln_k,
                       "patch_entropy_frac": float(out.metrics["teacher_patch_entropy"]) / ln_kp,
                       "cls_std": float(out.metrics["cls_std"])})
    return {"name": name, "overrides": list(overrides), "method_kwargs": kwargs, "geometry": geo,
            "steps_per_epoch": stream.steps_per_epoch, "train_s": prog.train_s,
            "s_per_step": prog.train_s / args.steps, "untrained_koleo": untrained_koleo, "points": points}


# ---------------------------------------------------------------------------------------
# The original module, in its own interpreter
# ---------------------------------------------------------------------------------------

def run_seed(spec: dict, args, out_dir: Path) -> Optional[dict]:
    py = Path(args.seed_python)
    if not py.is_file():
        print(f"[seed] SKIPPED: no interpreter at {py} (a venv with torch and stable-pretraining==0.1.8, "
              f"see this script's docstring; or pass --seed-python / set SEED_PYTHON)", flush=True)
        return None
    spec_path, result_path = out_dir / "seed_spec.json", out_dir / "seed.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    result_path.unlink(missing_ok=True)
    worker = Path(__file__).resolve().parent / "_quality_seed_worker.py"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rc = subprocess.call([str(py), str(worker), str(spec_path), str(result_path)], env=env)
    if rc != 0 or not result_path.is_file():
        print(f"[seed] FAILED (exit status {rc}); see the output above", flush=True)
        return None
    return json.loads(result_path.read_text())


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------

def final_entropy(run: dict) -> float:
    return run["points"][-1].get("entropy_frac", float("nan"))


def max_drop(run: dict) -> float:
    best, drop = -1.0, 0.0
    for p in run["points"]:
        best = max(best, p["knn"])
        drop = max(drop, best - p["knn"])
    return drop


def checks(runs: Dict[str, dict]) -> List[dict]:
    out = []
    ours, seed, k0 = runs.get("ours"), runs.get("seed"), runs.get("ours-koleo0")
    if ours:
        d = max_drop(ours)
        out.append({"target": "ours: k-NN never falls > 1 point below its best so far",
                    "value": f"largest fall {d:.2f} points", "pass": d <= 1.0})
        h = final_entropy(ours)
        out.append({"target": "ours: final teacher CLS target entropy < 0.9 ln K",
                    "value": f"{h:.3f} ln K", "pass": h < 0.9})
    if ours and seed:
        gap = ours["points"][-1]["knn"] - seed["points"][-1]["knn"]
        out.append({"target": "ours: last k-NN >= original module's + 5 points",
                    "value": f"{gap:+.2f} points", "pass": gap >= 5.0})
    if k0:
        gain = k0["points"][-1]["knn"] - k0["points"][0]["knn"]
        out.append({"target": "koleo_weight=0: last k-NN >= untrained + 8 points",
                    "value": f"{gain:+.2f} points", "pass": gain >= 8.0})
    return out


def table(runs: Dict[str, dict], checks_: List[dict]) -> str:
    names = [n for n in RUN_NAMES if n in runs] + [n for n in runs if n not in RUN_NAMES]
    steps = sorted({p["step"] for r in runs.values() for p in r["points"]})
    lines = ["k-NN top-1 (%) of the teacher's CLS, CIFAR-10 (k=20, T=0.07)", "",
             "| step | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for s in steps:
        cells = []
        for n in names:
            v = next((p["knn"] for p in runs[n]["points"] if p["step"] == s), None)
            cells.append("" if v is None else f"{v:.2f}")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    # KoLeo term (computed even at koleo_weight=0): -mean log nearest-neighbour distance of the
    # student's CLS in a batch; it rises as the embeddings crowd together
    lines += ["", "| run | untrained k-NN | best | last | largest fall | final H(CLS target)/ln K "
              "| KoLeo term untrained / last | s/step |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for n in names:
        r = runs[n]
        ks = [p["knn"] for p in r["points"]]
        lines.append(f"| {n} | {ks[0]:.2f} | {max(ks):.2f} | {ks[-1]:.2f} | {max_drop(r):.2f} | "
                     f"{final_entropy(r):.3f} | {r.get('untrained_koleo', float('nan')):.2f} / "
                     f"{r['points'][-1].get('loss_koleo', float('nan')):.2f} | {r.get('s_per_step', float('nan')):.2f} |")
    if checks_:
        lines += ["", "| target | measured | |", "|---|---|---|"]
        lines += [f"| {c['target']} | {c['value']} | {'pass' if c['pass'] else 'FAIL'} |" for c in checks_]
    return "\n".join(lines)


def plot(runs: Dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for n, r in runs.items():
        xs = [p["step"] for p in r["points"]]
        ax.plot(xs, [p["knn"] for p in r["points"]], marker="o", ms=3, label=n)
    ax.set_xlabel("training step")
    ax.set_ylabel("k-NN top-1 (%), teacher CLS")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--eval-every", type=int, default=100, help="steps between k-NN evaluations")
    p.add_argument("--batch", type=int, default=64, help="images per step (both sides)")
    p.add_argument("--embed-dim", type=int, default=SIZE_OVERRIDES["model.embed_dim"])
    p.add_argument("--depth", type=int, default=SIZE_OVERRIDES["model.depth"])
    p.add_argument("--num-heads", type=int, default=SIZE_OVERRIDES["model.num_heads"])
    p.add_argument("--head-hidden", type=int, default=SIZE_OVERRIDES["model.head_hidden_dim"])
    p.add_argument("--n-cls-prototypes", type=int, default=SIZE_OVERRIDES["model.n_cls_prototypes"])
    p.add_argument("--n-patch-prototypes", type=int, default=SIZE_OVERRIDES["model.n_patch_prototypes"])
    p.add_argument("--runs", default=",".join(RUN_NAMES), help=f"comma-separated subset of {RUN_NAMES}")
    p.add_argument("--override", action="append", default=[],
                   help="extra Hydra override for this project's runs (repeatable), e.g. method.base_lr=0.008")
    p.add_argument("--tag", default="", help="suffix of this project's run names (variants)")
    p.add_argument("--seed-python", default=DEFAULT_SEED_PYTHON,
                   help="interpreter with stable-pretraining==0.1.8 (env SEED_PYTHON)")
    p.add_argument("--knn-bank", type=int, default=10000)
    p.add_argument("--knn-query", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2, help="CPU threads in all (split between --jobs)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (each in its own process)")
    p.add_argument("--report-only", action="store_true", help="table and picture from the runs' JSONs in --out")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--cache-dir", type=Path, default=None, help="decoded CIFAR-10 cache (default: OUT/cache)")
    args = p.parse_args()
    args.cache_dir = args.cache_dir or args.out / "cache"

    runs_wanted = [r.strip() for r in args.runs.split(",") if r.strip()]
    bad = [r for r in runs_wanted if r not in RUN_NAMES]
    if bad:
        p.error(f"--runs: unknown {bad}; choose from {RUN_NAMES}")
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = f"-{args.tag}" if args.tag else ""
    keys = {name: ("seed" if name == "seed" else name + suffix) for name in runs_wanted}
    size = [f"model.embed_dim={args.embed_dim}", f"model.depth={args.depth}", f"model.num_heads={args.num_heads}",
            f"model.head_hidden_dim={args.head_hidden}", f"model.n_cls_prototypes={args.n_cls_prototypes}",
            f"model.n_patch_prototypes={args.n_patch_prototypes}"]
    kwargs, geo = compose_recipe(size + list(args.override))
    threads = max(1, args.threads // max(1, min(args.jobs, len(runs_wanted))))

    if args.report_only:
        runs = {}
        for name, key in keys.items():
            f = args.out / f"{key}.json"
            if f.is_file():
                runs[key] = json.loads(f.read_text())
            else:
                print(f"[{key}] no result at {f}", flush=True)
    elif args.jobs > 1 and len(runs_wanted) > 1:
        load_cifar10(cifar10_dir(), args.cache_dir)  # decode once, before the runs start
        runs = run_parallel(runs_wanted, keys, threads, args)
    else:
        torch.set_num_threads(threads)
        runs = run_sequential(runs_wanted, keys, threads, size, kwargs, geo, args)
    if args.child:
        return
    if not runs:
        sys.exit("no run finished")
    named = {name: runs[key] for name, key in keys.items() if key in runs}
    chk = checks(named)
    text = table(runs, chk)
    print("\n" + text, flush=True)
    mode = (f"{len(runs_wanted)} runs in parallel, {threads} thread(s) each" if args.jobs > 1 and len(runs_wanted) > 1
            else f"{threads} thread(s)")
    title = (f"CIFAR-10, ViT width {args.embed_dim} depth {args.depth} patch {kwargs['patch_size']}, batch "
             f"{args.batch}, {args.steps} steps, {mode}")
    png = args.out / f"quality{suffix}.png"
    plot(runs, png, title)
    summary = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
               "args": {k: str(v) for k, v in vars(args).items()}, "recipe_overrides": size + list(args.override),
               "method_kwargs": kwargs, "geometry": geo, "runs": runs, "checks": chk, "table": text,
               "torch": torch.__version__, "cpu": _cpu_name(), "mode": mode}
    (args.out / f"quality{suffix}.json").write_text(json.dumps(summary, indent=1))
    print(f"\nwrote {args.out / f'quality{suffix}.json'} and {png}")


def run_sequential(runs_wanted, keys, threads, size, kwargs, geo, args) -> Dict[str, dict]:
    data = load_cifar10(cifar10_dir(), args.cache_dir)
    sets = knn_sets(data, args.knn_bank, args.knn_query, geo["eval_size"], seed=args.seed)
    print(f"recipe: experiment=cifar10 {' '.join(size + list(args.override))}\n"
          f"  batch {args.batch}, {args.steps} steps, crops {geo}, k-NN bank {len(sets[0])} / queries "
          f"{len(sets[2])}, {threads} thread(s)", flush=True)
    runs: Dict[str, dict] = {}
    for name in runs_wanted:
        key = keys[name]
        t0 = time.perf_counter()
        if name == "seed":
            # the recipe's own lr schedule, step by step (the module has none of its own)
            sched = Schedules.from_config(DINOv3Config.from_dict(kwargs), args.steps, 1, args.batch)
            spec = {"steps": args.steps, "eval_every": args.eval_every, "batch": args.batch, "seed": args.seed,
                    "threads": threads, "knn_bank": args.knn_bank, "knn_query": args.knn_query,
                    "cache_dir": str(args.cache_dir), "cifar10_dir": str(cifar10_dir()),
                    "geometry": geo, "peak_lr": sched.peak_lr, "lr": [sched.lr(s) for s in range(args.steps)],
                    "model": {k: kwargs[k] for k in ("backbone", "img_size", "patch_size", "embed_dim", "depth",
                                                     "num_heads", "n_register_tokens", "head_hidden_dim",
                                                     "head_bottleneck_dim", "n_cls_prototypes",
                                                     "n_patch_prototypes")}}
            res = run_seed(spec, args, args.out)
            if res is None:
                continue
        else:
            ov = size + list(args.override) + (["method.koleo_weight=0"] if name == "ours-koleo0" else [])
            res = train_ours(key, ov, data, sets, args)
        res["wall_s"] = time.perf_counter() - t0
        res["threads"] = threads
        runs[key] = res
        (args.out / f"{key}.json").write_text(json.dumps(res, indent=1))
    return runs


def run_parallel(runs_wanted, keys, threads, args) -> Dict[str, dict]:
    """One child process per run (this script with ``--runs NAME --child``), all at once."""
    procs = {}
    for name in runs_wanted:
        (args.out / f"{keys[name]}.json").unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--runs", name, "--jobs", "1",
               "--threads", str(threads), "--child"]
        procs[name] = subprocess.Popen(cmd)
    for p in procs.values():
        p.wait()
    runs = {}
    for name in runs_wanted:
        f = args.out / f"{keys[name]}.json"
        if f.is_file():
            runs[keys[name]] = json.loads(f.read_text())
        else:
            print(f"[{keys[name]}] did not finish (exit status {procs[name].returncode})", flush=True)
    return runs


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return f"{os.cpu_count()} logical CPUs"


if __name__ == "__main__":
    main()
