#!/usr/bin/env bash
# Every GPU check in one go (a lent GPU is scarce): the CUDA tests of the method, then
# the step benchmark at ViT-S/16, 224/96 crops (2 global + 8 local), batch 64,
# 65536/8192 prototypes, bf16 autocast, for this repo and, when SEED_SITE points at an
# importable stable-pretraining (see ../shared/baselines), the original module side by
# side on the same GPU. Results: one JSON line each, also written under OUT (default ./gpu_out).
#
#   bash experiments/bench_gpu.sh
#   SEED_SITE=/path/to/site SEED_BENCH=/path/to/seed_step_bench.py bash experiments/bench_gpu.sh
set -uo pipefail
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD:$PWD/platform${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
STEPS=${STEPS:-20}
VITS=(--device cuda --encoder vit_small_patch16_224 --img-size 224 --local-size 96 --patch-size 16
      --batch 64 --n-local 8 --n-cls-prototypes 65536 --n-patch-prototypes 8192 --hidden 2048
      --bottleneck 256 --registers 4 --warmup 5 --steps "$STEPS")

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"

echo "== CUDA tests of the method"
timeout 300 $PY -m pytest -q -p no:cacheprovider tests/test_method_cuda.py 2>&1 | tail -n 15

echo "== this repo, ViT-S/16 bf16"
timeout 300 $PY experiments/bench_step.py "${VITS[@]}" --precision bf16 --json "$OUT/ours_vits_bf16.json" \
    --profile "$OUT/ours_vits_bf16_profile.txt"
if [[ -n "${SEED_SITE:-}" ]]; then
  echo "== original module (stable-pretraining DINOv3), ViT-S/16 bf16 autocast"
  # The baseline script has no precision flag: run it under the same bf16 autocast.
  PYTHONPATH="$SEED_SITE:$PYTHONPATH" HF_HUB_OFFLINE=1 timeout 300 $PY - "${VITS[@]}" --json "$OUT/seed_vits_bf16.json" <<EOF
import json, runpy, sys, torch
sys.argv = ["seed_step_bench.py", *sys.argv[1:]]
torch.backends.cuda.matmul.allow_tf32 = True
with torch.autocast("cuda", dtype=torch.bfloat16):
    runpy.run_path("${SEED_BENCH:-seed_step_bench.py}", run_name="__main__")
print(json.dumps({"seed_peak_cuda_mem_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)}))
EOF
fi

if [[ -z "${SKIP_RECIPE:-}" ]]; then
  echo "== this repo, ViT-S/16 bf16, recipe schedules + drop-path 0.1 + uint8 input"
  timeout 300 $PY experiments/bench_step.py "${VITS[@]}" --precision bf16 --schedules --drop-path 0.1 --uint8 \
      --json "$OUT/ours_vits_bf16_recipe.json"
fi

if [[ -z "${SKIP_COMPILE:-}" ]]; then
  for what in backbone model; do
    echo "== this repo, ViT-S/16 bf16, torch.compile of the $what"
    timeout ${COMPILE_TIMEOUT:-300} $PY experiments/bench_step.py "${VITS[@]}" --precision bf16 --compile $what \
        --json "$OUT/ours_vits_bf16_compile_$what.json" 2>&1 | grep -v "^W1\|Warning\|check(\|warn_once"
  done
fi
