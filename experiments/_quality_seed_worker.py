#!/usr/bin/env python
"""The original module's side of ``experiments/bench_quality.py`` (run by it, in the interpreter
that has ``stable-pretraining==0.1.8``; see ``bench_quality.py``'s docstring).

    <seed-python> experiments/_quality_seed_worker.py SPEC.json RESULT.json

Trains ``stable_pretraining.methods.dinov3.DINOv3`` as released (its own losses, Sinkhorn
centring, random 0.3 masking, temperatures 0.1 / 0.07, KoLeo 0.1 on the first global crop, EMA
0.996 -> 1.0) on the timm ViT of the spec (``dynamic_img_size=True``; the module adds its own
4 register tokens; timm's defaults otherwise: no LayerScale, no drop path). What the module
leaves to its trainer is set as this project's side: AdamW betas (0.9, 0.999) over every
trainable parameter with torch's default weight decay 0.01, the recipe's LR schedule (linear
warm-up, cosine) at the same peak, no gradient clipping; the EMA coefficient follows the
module's own cosine per *step* (``update_ema_coefficient(step, steps)``, then
``update_teacher()``, what ``TeacherStudentCallback`` does per epoch). Data, crops and k-NN
come from ``bench_quality`` (same images, order, crop seeds and evaluation code).
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402  (torch + dinov3.augment / dinov3.evaluation only)
from dinov3.augment import normalize  # noqa: E402


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out_path = Path(sys.argv[2])
    torch.set_num_threads(int(spec["threads"]))
    warnings.filterwarnings("ignore")
    try:
        from loguru import logger

        logger.remove()
        logger.add(sys.stderr, level="ERROR")
    except Exception:
        pass
    import timm
    from stable_pretraining.methods.dinov3 import DINOv3

    m = spec["model"]
    torch.manual_seed(int(spec["seed"]))
    enc_kwargs = dict(pretrained=False, num_classes=0, img_size=m["img_size"], dynamic_img_size=True)
    for k in ("patch_size", "embed_dim", "depth", "num_heads"):
        if m.get(k) is not None:
            enc_kwargs[k] = m[k]
    encoder = timm.create_model(m["backbone"], **enc_kwargs)
    model = DINOv3(encoder_name=encoder, n_register_tokens=m["n_register_tokens"],
                   projector_hidden_dim=m["head_hidden_dim"], projector_bottleneck_dim=m["head_bottleneck_dim"],
                   n_cls_prototypes=m["n_cls_prototypes"], n_patch_prototypes=m["n_patch_prototypes"],
                   image_size=m["img_size"]).train()
    wrappers = [w for w in model.modules() if hasattr(w, "update_teacher")]
    params = [p for p in model.parameters(with_callbacks=False) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.0, betas=(0.9, 0.999))  # weight_decay: torch default 0.01

    # the CLS Sinkhorn targets, for their entropy
    captured = {}
    dino = model.dinov2_loss.dino_loss
    sk = dino.sinkhorn_knopp_teacher

    def sk_capture(*a, **kw):
        q = sk(*a, **kw)
        captured["q"] = q.detach()
        return q

    dino.sinkhorn_knopp_teacher = sk_capture

    geo = spec["geometry"]
    data = bq.load_cifar10(Path(spec["cifar10_dir"]), Path(spec["cache_dir"]))
    sets = bq.knn_sets(data, spec["knn_bank"], spec["knn_query"], geo["eval_size"], seed=int(spec["seed"]))
    stream = bq.CropStream(data["train_x"], spec["batch"], geo["global_size"], geo["local_size"], geo["n_local"],
                           geo["blur"], seed=int(spec["seed"]))
    steps = int(spec["steps"])
    ln_k = math.log(m["n_cls_prototypes"])
    evals = bq.eval_steps(steps, int(spec["eval_every"]))
    prog = bq.Progress("seed", steps)
    points, window = [], []

    def embed(x):
        return model(images=normalize(x)).embedding

    hp = {}
    for step in range(steps + 1):
        if step in evals:
            model.eval()
            knn = bq.knn_top1(embed, sets)
            model.train()
            row = {"step": step, "knn": knn, **hp}
            if window:
                for k in window[0]:
                    row[k] = float(np.mean([w[k] for w in window]))
            points.append(row)
            window.clear()
            prog.line(step, knn, f"H/lnK {row.get('entropy_frac', float('nan')):.3f}  "
                                 f"loss {row.get('loss', float('nan')):.3f}")
        if step == steps:
            break
        t0 = time.perf_counter()
        g, loc = stream(step)
        lr = spec["lr"][step]
        for group in opt.param_groups:
            group["lr"] = lr
        gv = [normalize(g[:, i]) for i in range(g.shape[1])]
        lv = [normalize(loc[:, i]) for i in range(loc.shape[1])]
        out = model(global_views=gv, local_views=lv)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for w in wrappers:
            w.update_ema_coefficient(step, steps)
            w.update_teacher()
        prog.train_s += time.perf_counter() - t0
        loss = float(out.loss)
        if not math.isfinite(loss):
            raise FloatingPointError(f"[seed] loss {loss} at step {step}")
        q = captured["q"].flatten(0, -2).float()
        ent = float(-(q * q.clamp_min(1e-30).log()).sum(-1).mean())
        hp = {"lr": lr, "wd": 0.01, "momentum": float(wrappers[0].ema_coefficient), "teacher_temp": 0.07}
        window.append({"loss": loss, "loss_cls": float(out.loss_cls), "loss_patch": float(out.loss_patch),
                       "loss_koleo": float(out.loss_koleo), "entropy_frac": ent / ln_k})
    res = {"name": "seed", "model": m, "geometry": geo, "steps_per_epoch": stream.steps_per_epoch,
           "train_s": prog.train_s, "s_per_step": prog.train_s / steps, "points": points,
           "optimizer": "AdamW betas (0.9, 0.999), weight decay 0.01 (torch default), recipe LR schedule",
           "ema": "module cosine 0.996 -> 1.0 per step"}
    out_path.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
