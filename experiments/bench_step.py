#!/usr/bin/env python
"""Time one DINOv3 training step of this repo's method (the counterpart of
``shared/baselines/seed_step_bench.py``, same workload and flags).

One step = apply_schedules + the method's ``forward_backward`` (what rayssl/loop.py calls: one
backward for the global crops and one for the locals, or with --no-split-backward one for all)
+ clip_gradients + AdamW step + EMA teacher update, on random data. Default workload (CPU): timm
``vit_tiny_patch16_224`` rebuilt with img_size 32 / patch_size 4, 4 registers, batch 32, 2 global crops 32x32 +
6 local crops 16x16, 4096 CLS / 1024 patch prototypes, head hidden 512, bottleneck 256.
Drop path 0 like the baseline's encoder. The defaults run the recipe (block masking of half
the global crops, LayerScale, per-module clipping); the baseline's own choices (every global
crop masked at random at ratio 0.3, no LayerScale, no clipping) are flags:

    PYTHONPATH=.:platform python experiments/bench_step.py
    PYTHONPATH=.:platform python experiments/bench_step.py --mask-strategy random --no-layerscale --no-clip
    PYTHONPATH=.:platform python experiments/bench_step.py --device cuda            # bf16 autocast
    PYTHONPATH=.:platform python experiments/bench_step.py --device cuda --compile backbone

Prints one JSON line (median s/step, the warm-up's seconds (compilation included), peak RSS,
losses; on CUDA also images/s, peak CUDA memory and an MFU estimate: the FLOPs of one eager
step counted by torch.utils.flop_counter.FlopCounterMode over the median step time and the
device's dense bf16 peak, 989 TFLOP/s on an H100/H200). experiments/gpu_check.py runs it.
"""

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

# dense bf16 peak FLOP/s by device-name substring (for the MFU estimate)
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def rss_now_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="vit_tiny_patch16_224")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--local-size", type=int, default=16)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--embed-dim", type=int, default=None, help="override the backbone's width (micro models)")
    p.add_argument("--depth", type=int, default=None, help="override the backbone's depth (micro models)")
    p.add_argument("--num-heads", type=int, default=None, help="override the backbone's heads (micro models)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--n-global", type=int, default=2, help="must be 2 (DINOv3 uses two global crops)")
    p.add_argument("--n-local", type=int, default=6)
    p.add_argument("--n-cls-prototypes", type=int, default=4096)
    p.add_argument("--n-patch-prototypes", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--bottleneck", type=int, default=256)
    p.add_argument("--registers", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=5e-4, help="unused with --schedules")
    p.add_argument("--threads", type=int, default=0, help="0 = torch default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--mask-strategy", default="block", choices=("block", "random"))
    p.add_argument("--drop-path", type=float, default=0.0)
    p.add_argument("--no-ema", action="store_true", help="skip EMA teacher update")
    p.add_argument("--no-clip", action="store_true", help="skip per-module gradient clipping")
    p.add_argument("--no-layerscale", action="store_true", help="blocks without LayerScale (the baseline's timm ViT)")
    p.add_argument("--no-split-backward", action="store_true",
                   help="one backward for all crops (default: locals, then globals; same gradients)")
    p.add_argument("--schedules", action="store_true", help="recipe lr/wd schedules instead of fixed lr")
    p.add_argument("--uint8", action="store_true", help="feed uint8 crops (normalised inside)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto: bf16 autocast on CUDA, fp32 on CPU; bf16 on CPU needs avx512_bf16/AMX to pay off")
    p.add_argument("--compile", default="none", choices=("none", "backbone", "model"),
                   help="torch.compile the backbones (what train.compile does) or the whole forward")
    p.add_argument("--profile", default=None, help="write torch.profiler tables of 3 extra steps here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args()
    if args.n_global != 2:
        p.error("--n-global must be 2")

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    from dinov3 import DINOv3Config, build_method

    import_s = time.perf_counter() - t0
    rss_after_import = rss_now_mib()

    dev = torch.device(args.device)
    cfg = DINOv3Config(
        backbone=args.encoder, img_size=args.img_size, patch_size=args.patch_size,
        embed_dim=args.embed_dim, depth=args.depth, num_heads=args.num_heads,
        n_register_tokens=args.registers, drop_path_rate=args.drop_path,
        layerscale_init=None if args.no_layerscale else 1e-5,
        head_hidden_dim=args.hidden, head_bottleneck_dim=args.bottleneck,
        n_cls_prototypes=args.n_cls_prototypes, n_patch_prototypes=args.n_patch_prototypes,
        mask_strategy=args.mask_strategy, mask_seed=args.seed, split_backward=not args.no_split_backward,
    )
    model = build_method(cfg)
    model.configure(total_steps=100, steps_per_epoch=10, global_batch_size=args.batch)
    model = model.to(dev).train()
    rss_after_build = rss_now_mib()

    groups = model.param_groups()
    if not args.schedules:
        for g in groups:  # the baseline's fixed AdamW settings
            g["lr"], g["weight_decay"] = args.lr, 0.05
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.05, betas=(0.9, 0.95),
                            fused=dev.type == "cuda")
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())

    g = torch.Generator().manual_seed(args.seed)

    def batch():
        shape_g = (args.batch, 2, 3, args.img_size, args.img_size)
        shape_l = (args.batch, args.n_local, 3, args.local_size, args.local_size)
        if args.uint8:
            gl = torch.randint(0, 256, shape_g, generator=g, dtype=torch.uint8)
            lo = torch.randint(0, 256, shape_l, generator=g, dtype=torch.uint8)
        else:
            gl, lo = torch.randn(shape_g, generator=g), torch.randn(shape_l, generator=g)
        return gl.to(dev), (lo.to(dev) if args.n_local > 0 else None)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    use_bf16 = args.precision == "bf16" or (args.precision == "auto" and dev.type == "cuda")
    autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # FLOPs of one step, counted on the eager model before any compilation (the FLOP counter
    # does not see inside compiled graphs); its memory is not part of the reported peak.
    flops = count_flops(model, batch, autocast)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    runner = torch.compile(model) if args.compile == "model" else None
    if args.compile == "backbone":
        model.compile()

    def forward_backward(gl, lo):
        """The method's forward + backward of one step (rayssl/loop.py's call): one backward per
        crop group (--no-split-backward: one for all). Returns (output, seconds)."""
        t0 = time.perf_counter()
        o = model.forward_backward(gl, lo, runner=runner, autocast=autocast)
        sync()
        return o, time.perf_counter() - t0

    times, cpu_times, losses = [], [], []
    phase = {"fwd_bwd": [], "opt": [], "ema": []}
    out = None
    t_warmup = time.perf_counter()
    warmup_s = 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            warmup_s = time.perf_counter() - t_warmup
        gl, lo = batch()
        sync()
        t = time.perf_counter()
        c = time.process_time()
        hp = model.apply_schedules(opt, step) if args.schedules else {"momentum": 0.996}
        out, _ = forward_backward(gl, lo)
        t2 = time.perf_counter()
        if not args.no_clip:
            model.clip_gradients()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        if not args.no_ema:
            model.update_teacher(hp["momentum"])
        sync()
        t4 = time.perf_counter()
        if step >= args.warmup:
            times.append(t4 - t)
            cpu_times.append(time.process_time() - c)
            for k, v in zip(phase, (t2 - t, t3 - t2, t4 - t3)):
                phase[k].append(v)
        losses.append({"loss": float(out.loss), "cls": float(out.loss_cls),
                       "patch": float(out.loss_patch), "koleo": float(out.loss_koleo)})

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(3):
                gl, lo = batch()
                forward_backward(gl, lo)
                if not args.no_clip:
                    model.clip_gradients()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if not args.no_ema:
                    model.update_teacher(0.996)
            sync()
        table = prof.key_averages()
        with open(args.profile, "w") as f:
            if dev.type == "cuda":
                f.write(table.table(sort_by="self_cuda_time_total", row_limit=40) + "\n")
            f.write(table.table(sort_by="self_cpu_time_total", row_limit=40) + "\n")

    model.eval()
    with torch.no_grad(), autocast():
        emb = model.embed(torch.randn(4, 3, args.img_size, args.img_size, device=dev))
    model.train()

    med = statistics.median(times)
    res = {
        "method": "dinov3 (this repo)",
        "torch": torch.__version__,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "ema": not args.no_ema,
        "clip": not args.no_clip,
        "layerscale": not args.no_layerscale,
        "split_backward": not args.no_split_backward,
        "mask_strategy": args.mask_strategy,
        "precision": "bf16-autocast" if use_bf16 else "fp32",
        "compile": args.compile,
        "config": {k: getattr(args, k) for k in (
            "encoder", "img_size", "local_size", "patch_size", "embed_dim", "depth", "num_heads", "batch", "n_global",
            "n_local", "n_cls_prototypes", "n_patch_prototypes", "hidden", "bottleneck", "registers")},
        "params_trainable": n_train,
        "params_total_incl_teacher": n_all,
        "import_s": round(import_s, 2),
        "median_s_per_step": round(med, 4),
        "mean_s_per_step": round(statistics.mean(times), 4),
        "min_s_per_step": round(min(times), 4),
        "max_s_per_step": round(max(times), 4),
        "median_cpu_s_per_step": round(statistics.median(cpu_times), 4),
        "median_phase_s": {k: round(statistics.median(v), 4) for k, v in phase.items()},
        "warmup_steps": args.warmup,
        "warmup_s": round(warmup_s, 2),
        "loadavg_1m_at_end": os.getloadavg()[0],
        "rss_after_import_mib": round(rss_after_import, 1),
        "rss_after_build_mib": round(rss_after_build, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "first_losses": losses[0],
        "last_losses": losses[-1],
        "all_finite": all(all(v == v and abs(v) != float("inf") for v in d.values()) for d in losses),
        "eval_embedding_shape": list(emb.shape),
    }
    if dev.type == "cuda":
        res["images_per_s"] = round(args.batch / med, 1)
        res["peak_cuda_mem_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        res["gpu"] = torch.cuda.get_device_name()
    res.update(mfu_estimate(flops, med, res.get("gpu", "")))
    s = json.dumps(res)
    print(s)
    if args.json:
        with open(args.json, "w") as f:
            f.write(s + "\n")


def count_flops(model, batch, autocast) -> int:
    """FLOPs of one step's forward + backward: torch.utils.flop_counter.FlopCounterMode (matrix
    products, convolutions, attention) around one eager ``forward_backward``; the gradients it
    leaves are dropped."""
    from torch.utils.flop_counter import FlopCounterMode

    gl, lo = batch()
    counter = FlopCounterMode(display=False)
    with counter:
        model.forward_backward(gl, lo, autocast=autocast)
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def mfu_estimate(flops: int, s_per_step: float, gpu_name: str) -> dict:
    """The step's FLOPs (:func:`count_flops`) / step time / the device's dense bf16 peak."""
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu_name), None)
    out = {"flops_per_step": flops, "flops_counted_by": "torch.utils.flop_counter.FlopCounterMode, one eager step",
           "achieved_tflops": round(flops / s_per_step / 1e12, 2)}
    if peak:
        out["peak_bf16_tflops"] = peak / 1e12
        out["mfu"] = round(flops / s_per_step / peak, 4)
    return out


if __name__ == "__main__":
    main()
