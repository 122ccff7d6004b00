#!/usr/bin/env python
"""k-NN (DINO protocol) and linear-probe accuracy of a trained teacher on a labelled dataset.

    python experiments/evaluate.py checkpoint=ray_results/my-run/checkpoint_...    # Ray checkpoint dir
    python experiments/evaluate.py checkpoint=runs:/RUN_ID/model data=imagefolder data.path=/data/imgs

Images are decoded in this process (no Ray): the labelled train split is the bank /
probe training set, the held-out split the queries / probe test set (sizes capped by
data.knn_bank_size / data.knn_query_size), resized and centre-cropped to data.eval_size.
"""

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "platform")]


def split_images(spec, split: str):
    """(uint8 [N, 3, S, S], labels [N]) of one split ('train' | 'eval'), decoded in-process."""
    import numpy as np
    import torch

    from dinov3.augment import EvalTransform
    from rayssl.data.pipeline import _indexed_table, _parquet_listing, _read_unit, _subset
    from rayssl.data.sources import decode_image, read_bytes, resolve_spec

    spec = resolve_spec(spec)
    size = spec.knn_bank_size if split == "train" else spec.knn_query_size
    if spec.name in ("synthetic", "imagefolder"):
        table = _indexed_table(spec, split)
        table = table.take(_subset(table.num_rows, size))
        col = "image" if "image" in table.column_names else "path"
        items = table.column(col).to_pylist()
        labels = table.column("label").to_pylist()
        blobs = items if col == "image" else (read_bytes(p) for p in items)
    else:
        lst = _parquet_listing(spec)
        files = lst.train_files if (split == "train" or lst.hash_split) else lst.eval_files
        cols = ["image"] + (["label"] if lst.has_label else []) + (["key"] if lst.has_key else [])
        blobs, labels = [], []
        for f in files:
            for t in _read_unit(f, None, cols, lst.hash_split, split == "eval", not lst.has_label):
                blobs += t.column("image").to_pylist()
                labels += t.column("label").to_pylist()
            if size is not None and len(blobs) >= size:
                break
        if size is not None:
            blobs, labels = blobs[:size], labels[:size]
    tf = EvalTransform(spec.eval_size)
    images, kept = [], []
    for data, label in zip(blobs, labels):
        try:
            images.append(tf(torch.from_numpy(decode_image(data)).permute(2, 0, 1)))
            kept.append(label)
        except Exception:  # noqa: BLE001  unreadable images are skipped, as in training
            continue
    if not images:
        raise SystemExit(f"no readable {split} images in data={spec.name} ({spec.path})")
    return torch.stack(images), torch.as_tensor(np.asarray(kept, dtype=np.int64))


def embed_all(encoder, images, batch_size: int, device):
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, images.shape[0], batch_size):
            out.append(encoder(images[i:i + batch_size].to(device)).float().cpu())
    return torch.cat(out)


def evaluate(checkpoint: str, cfg, eval_cfg) -> dict:
    """k-NN top-1 per k and the linear probe's best top-1 of ``checkpoint`` on ``cfg.data``
    (``eval_cfg``: :class:`rayssl.config.EvalConfig`)."""
    import time

    import torch

    from dinov3.evaluation import knn_classify, linear_probe
    from rayssl.export import load_encoder

    want = eval_cfg.device
    device = torch.device("cuda" if want == "auto" and torch.cuda.is_available() else ("cpu" if want == "auto" else want))
    t0 = time.perf_counter()
    encoder = load_encoder(checkpoint, cfg).to(device).eval()
    (xb, yb), (xq, yq) = split_images(cfg.data, "train"), split_images(cfg.data, "eval")
    bs = eval_cfg.batch_size
    fb, fq = embed_all(encoder, xb, bs, device), embed_all(encoder, xq, bs, device)
    n_classes = int(max(yb.max(), yq.max())) + 1
    ks = tuple(int(k) for k in eval_cfg.knn_k)
    results = {f"knn_top1_k{k}": float(v) for k, v in knn_classify(fb, yb, fq, yq, ks=ks, n_classes=n_classes).items()}
    if eval_cfg.linear_probe:
        probe = linear_probe(fb, yb, fq, yq, n_classes=n_classes, epochs=eval_cfg.probe_epochs)
        results["linear_probe_top1"] = float(probe["top1"])
        results["linear_probe_lr"] = float(probe["lr"])
    results.update(n_bank=int(xb.shape[0]), n_query=int(xq.shape[0]), feature_dim=int(fb.shape[1]),
                   seconds=time.perf_counter() - t0)
    return results


def format_table(checkpoint: str, data: str, results: dict) -> str:
    rows = [("checkpoint", checkpoint), ("data", data)]
    rows += [(k, f"{v:.2f}" if isinstance(v, float) else str(v)) for k, v in results.items()]
    w = max(len(k) for k, _ in rows)
    line = "-" * (w + 3 + max(len(v) for _, v in rows))
    return "\n".join([line] + [f"{k:<{w}} | {v}" for k, v in rows] + [line])


def run(cfg) -> dict:
    from rayssl.config import ConfigError

    if not cfg.checkpoint:
        raise ConfigError("checkpoint: required (a Ray checkpoint dir or an MLflow model URI: checkpoint=PATH)")
    results = evaluate(cfg.checkpoint, cfg, cfg.eval)
    print(format_table(cfg.checkpoint, f"{cfg.data.name} {cfg.data.path or ''}".strip(), results))
    return results


if __name__ == "__main__":
    from rayssl.cli import main

    sys.exit(main("evaluate", sys.argv[1:], {"evaluate": run}, config_name="evaluate"))
