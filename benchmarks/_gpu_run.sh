#!/usr/bin/env bash
# One device call: the CUDA GPU tests under both parent allocators, then the GPU benchmarks
# (bench_cuda.py, and bench_multigpu.py: its cross-device half needs two GPUs).
# Logs go under $OUT (tests_<alloc>.log, bench.log, cuda_bench_*.json, profile_parent.txt);
# a short table is printed at the end.   RUN_SLOW=0 skips the 5/6/12 GiB tests; RUN_TESTS=0 or
# RUN_BENCH=0 skips the tests or the benchmarks (to split the run over two device calls).
#   bash benchmarks/_gpu_run.sh            (carry .whl if cloudpickle/pytest are missing there)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/comfy_env_gpu_out}; mkdir -p "$OUT"; export OUT
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
if ! python3 -c "import cloudpickle, pytest, pytest_timeout, filelock, platformdirs" 2>/dev/null; then
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site
  else
    echo "missing Python packages and no .whl/ to install them from" >&2
  fi
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
T0=$SECONDS
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__)"; } 2>&1 | tee "$OUT/gpu.txt"
SUMMARY=()
run_tests() {   # label, PYTORCH_CUDA_ALLOC_CONF, time limit (s), extra pytest args...
  local label=$1 conf=$2 limit=$3; shift 3
  PYTORCH_CUDA_ALLOC_CONF="$conf" timeout "$limit" python3 -m pytest tests/test_cuda_gpu.py tests/test_devices_gpu.py -q \
    -p no:cacheprovider --timeout 150 -rfEs --durations=8 "$@" > "$OUT/tests_$label.log" 2>&1
  local rc=$?
  local line; line=$(grep -E "(passed|failed|error)" "$OUT/tests_$label.log" | tail -1)
  [ $rc -eq 124 ] && line="TIMED OUT after ${limit}s; last: $line"
  SUMMARY+=("tests parent=$label: ${line:-no result (rc $rc)} [at $((SECONDS - T0)) s]")
  echo "${SUMMARY[-1]}"
}
bench() {
  PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync timeout "${BENCH_LIMIT:-240}" \
    python3 benchmarks/bench_cuda.py ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
  echo "bench rc=$? [at $((SECONDS - T0)) s]"
}
[ "${BENCH_FIRST:-0}" = 1 ] && [ "${RUN_BENCH:-1}" = 1 ] && bench
if [ "${RUN_TESTS:-1}" = 1 ]; then
  # TEST_K: a pytest -k expression, e.g. "not 10000" for a short run
  run_tests async "backend:cudaMallocAsync" "${TEST_LIMIT:-170}" -m "gpu and not slow" ${TEST_K:+-k "$TEST_K"}
  run_tests native "" "${TEST_LIMIT:-170}" -m "gpu and not slow" ${TEST_K:+-k "$TEST_K"}
  if [ "${RUN_SLOW:-1}" = 1 ]; then
    run_tests async-slow "backend:cudaMallocAsync" "${SLOW_LIMIT:-150}" -m "slow"
  fi
fi
[ "${BENCH_FIRST:-0}" = 1 ] || [ "${RUN_BENCH:-1}" = 0 ] || bench
if [ "${RUN_BENCH:-1}" = 1 ] && [ -f benchmarks/bench_multigpu.py ]; then
  PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync timeout "${MULTI_LIMIT:-200}" \
    python3 benchmarks/bench_multigpu.py ${MULTI_ARGS:-} > "$OUT/bench_multigpu.log" 2>&1
  echo "bench_multigpu rc=$? [at $((SECONDS - T0)) s]"
fi
echo
echo "================ summary ================"
cat "$OUT/gpu.txt"
printf '%s\n' "${SUMMARY[@]}"
grep -hE "^(FAILED|ERROR)" "$OUT"/tests_*.log | head -20
if [ "${RUN_BENCH:-1}" = 1 ]; then
  sed -n '/^GPU: /,$p' "$OUT/bench.log"
  [ -f "$OUT/bench_multigpu.log" ] && tail -25 "$OUT/bench_multigpu.log"
  grep -q "^GPU: " "$OUT/bench.log" || tail -40 "$OUT/bench.log"
fi
