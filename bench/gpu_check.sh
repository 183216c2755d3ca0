#!/usr/bin/env bash
# The GPU path check (issue #4), run ONCE on a machine with CUDA from the repository root:
#     bash bench/gpu_check.sh
# 1. the environment (torch version, CUDA, GPUs); 2. the training tests with CUDA visible (the CUDA ones share GPU 0
# between two ranks when there is one GPU: the staged gloo path); 3. tiny-GPT steps/s for 1 and 2 stages on cuda;
# 4. the schedule bubble bench on the machine's CPU cores (16 there: 4 ranks each get a core).
# Every command has a timeout (about 8 minutes in all). Logs go to $OUT (if set) or bench/gpu_logs; the last lines
# summarise: "gpu_check tests=PASS|FAIL(rc)" and "gpu_steps stages1=X stages2=Y".
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
LOGS="${OUT:-bench/gpu_logs}"
mkdir -p "$LOGS"
export PYTHONPATH=src OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1

echo "== environment" | tee "$LOGS/env.log"
timeout 60 "$PY" -c 'import torch; print(torch.__version__, torch.cuda.is_available())' 2>&1 | tee -a "$LOGS/env.log"
timeout 60 "$PY" -c 'import torch; print("gpus", torch.cuda.device_count(), [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])' 2>&1 | tee -a "$LOGS/env.log"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>&1 | tee -a "$LOGS/env.log" || true

echo "== tests"
timeout 300 "$PY" -m pytest -q -x -p no:cacheprovider -rs --durations=10 \
    tests/test_train_cuda.py tests/test_train.py 2>&1 | tee "$LOGS/pytest.log"
test_rc=${PIPESTATUS[0]}

echo "== throughput"
timeout 150 "$PY" bench/gpu_steps.py --steps 30 --device cuda 2>&1 | tee "$LOGS/gpu_steps.log"
bench_rc=${PIPESTATUS[0]}

echo "== schedules on this machine's CPU cores (4 ranks need 4 free cores to show each schedule's bubble)"
timeout 120 "$PY" bench/train_schedules.py 2>&1 | tee "$LOGS/train_schedules.log"

echo "== summary" | tee "$LOGS/summary.log"
if [ "$test_rc" -eq 0 ]; then echo "gpu_check tests=PASS" | tee -a "$LOGS/summary.log"
else echo "gpu_check tests=FAIL($test_rc)" | tee -a "$LOGS/summary.log"; fi
tail -n 3 "$LOGS/pytest.log" | tee -a "$LOGS/summary.log"
grep '^gpu_steps ' "$LOGS/gpu_steps.log" | tee -a "$LOGS/summary.log" || echo "gpu_steps FAILED($bench_rc)" | tee -a "$LOGS/summary.log"
grep '^train_schedules ' "$LOGS/train_schedules.log" | tee -a "$LOGS/summary.log" || true
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
