#!/usr/bin/env bash
# The whole GPU check in one command, at most BUDGET seconds (default 540, the install included)
# on one GPU machine without network: installs the platform from the wheelhouse when ray,
# mlflow or hydra is missing, then runs experiments/gpu_check.py (the logic; its docstring says
# more): the method's CUDA tests, (a) the step benchmark (ViT-S/16 and ViT-B/16, 224/96 px,
# 2 + 8 crops, bf16, eager and compiled, split and one backward, the original module side by
# side when SEED_BENCH and SEED_SITE are set), (b) a real train.py run of the ViT-B/16 recipe
# on generated JPEGs through Ray Train + Ray Data into MLflow, (c) a 2-trial sweep sharing the
# GPU. One table on stdout; OUT (default ./gpu_out) gets gpu_check.json, gpu_check.txt,
# gpu_check.log and bench_gpu.log. Exit 0 only when a GPU was found and every section passed
# (1: a section failed; 3: no GPU found; 124: the hard limit).
#
#   bash experiments/bench_gpu.sh                                # OUT, WHEELHOUSE, BUDGET, PYTHON
#   SEED_BENCH=.seed/seed_step_bench.py SEED_SITE=/tmp/seed_site bash experiments/bench_gpu.sh
#   bash experiments/bench_gpu.sh --sections c                   # gpu_check.py's options pass through
#
# The wheelhouse (built where an index is reachable; ~60 MiB, carried to the machine):
#   python platform/cluster/wheelhouse.py --out .wheelhouse --python-version 3.12 \
#     --platform manylinux_2_28_x86_64 --base-packages platform/cluster/base-images/nvidia-cuda-py312.txt
set -uo pipefail
START=$(date +%s)
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu_out}
BUDGET=${BUDGET:-540}
WHEELHOUSE=${WHEELHOUSE:-.wheelhouse}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

main() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "no nvidia-smi"
  if ! $PY -c "import ray, mlflow, hydra" 2>/dev/null; then
    if [[ -d "$WHEELHOUSE" ]]; then
      echo "== installing the platform offline from $WHEELHOUSE"
      timeout 240 $PY -m pip install -q --no-index --find-links "$WHEELHOUSE" --no-compile -e . \
        || echo "pip install from $WHEELHOUSE failed: the check says what is missing"
    else
      echo "ray/mlflow/hydra missing and no wheelhouse at $WHEELHOUSE: (b) and (c) will fail"
    fi
  fi
  local left=$(( BUDGET - ($(date +%s) - START) ))
  (( left < 90 )) && left=90
  echo "== set-up took $(( $(date +%s) - START )) s; gpu_check.py gets $(( left - 15 )) s"
  timeout -k 10 "$left" $PY experiments/gpu_check.py --out "$OUT" --budget $(( left - 15 )) "$@"
  local rc=$?
  echo "== bench_gpu.sh: exit $rc after $(( $(date +%s) - START )) s"
  return $rc
}

main "$@" 2>&1 | tee "$OUT/bench_gpu.log"
exit "${PIPESTATUS[0]}"
