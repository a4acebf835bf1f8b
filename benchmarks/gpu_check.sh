#!/usr/bin/env bash
# The CUDA tests and the GPU benchmarks in one call, for an offline GPU machine (shared/GPU.md):
# wheels in .whl/ are installed first when present. Each step has its own time limit (seconds,
# overridable: T_TESTS=300 bash benchmarks/gpu_check.sh) and writes OUT_DIR/<step>.log
# (OUT_DIR defaults to $OUT, else ./gpu_check).
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
export PYTHONUNBUFFERED=1
out=${OUT_DIR:-${OUT:-gpu_check}}; mkdir -p "$out"
step() {
  local name=$1 limit=$2; shift 2
  echo "== $name ($(date +%T))" | tee -a "$out/summary.log"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "rc=$? $name ($(date +%T))" | tee -a "$out/summary.log"
  grep -v "Warning\|warner\|warnings.warn" "$out/$name.log" | tail -n 30
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$out/summary.log"
# -x stops at the first failure, so its name (-rfE) is printed before a time limit can cut the run.
step tests "${T_TESTS:-240}" python3 -m pytest -q -p no:cacheprovider -rfE -x -n "${WORKERS:-8}" \
  tests/test_cuda_graph.py tests/test_feedback.py tests/test_device_data.py \
  tests/test_training_speed.py tests/test_fa_theory.py tests/test_detect_training.py tests/test_scale_training.py \
  tests/test_metrics_models.py tests/test_trainer.py
step epoch_time "${T_EPOCH:-150}" python3 benchmarks/epoch_time.py --device cuda --cuda-graph \
  --eager-bp
step scale "${T_SCALE:-120}" python3 benchmarks/scale_throughput.py --rounds 5
step retinanet "${T_RETINANET:-150}" python3 benchmarks/scale_throughput.py --models retinanet \
  --settings fp32 amp --steps 2 --rounds 2
step fa_theory "${T_FA:-240}" python3 benchmarks/fa_theory.py --device cuda --no-progress
