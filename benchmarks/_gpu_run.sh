#!/usr/bin/env bash
# One device call: the CUDA GPU tests under both parent allocators, then the GPU benchmarks
# (bench_cuda.py, and bench_multigpu.py: its cross-device half needs two GPUs).
# Logs go under $OUT (tests_<alloc>.log, bench.log, cuda_bench_*.json; at most 8 files come back);
# a short table is printed at the end.   RUN_SLOW=0 skips the 5/6/12 GiB tests; RUN_TESTS=0 or
# RUN_BENCH=0 skips the tests or the benchmarks (to split the run over two device calls); RUN_MULTI=0
# skips bench_multigpu.py; PARENTS="async" (or "native") tests under one parent allocator only.
# BENCH_CONFS="async native mixed": bench_cuda.py once per parent allocator (async: workers on
# cudaMallocAsync too, COMFY_ENV_CUDA_HEAP=pool; mixed: the defaults under a cudaMallocAsync
# parent (ComfyUI's): workers on the native allocator, the parent's tensors in an exportable
# pool; parent-torch: mixed with COMFY_ENV_CUDA_PARENT_HEAP=torch, the parent's tensors in
# torch's default pool); with BASE_SRC, each conf but parent-torch runs against that tree
# first ($OUT/compare_<conf>.txt).
# RUN_PROFILE=1 runs benchmarks/profile_w2p.py --primitives --e2e-only --fresh-driver first
# ($OUT/profile_w2p.log: what building a received tensor costs, the driver's time per new tensor);
# RUN_PROBE=1 runs benchmarks/probe_ipc_free_while_mapped.py first ($OUT/probe.log);
# RUN_TRIM_PROBE=1 runs benchmarks/probe_pool_trim.py at 1 GiB and 64 MiB ($OUT/probe_trim.log).
# BASE_SRC=<dir>/src runs the benchmark against that tree first and writes $OUT/compare.txt.
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
  python3 -c "import torch; print('torch', torch.__version__)"; } 2>&1 | tee /tmp/comfy_env_gpu.txt
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
bench_one() {   # label, PYTORCH_CUDA_ALLOC_CONF of the parent (its workers inherit it), VAR=value...
  local label=$1 conf=$2; shift 2
  # parent-torch's base would be mixed's: run mixed beside it.
  if [ -n "${BASE_SRC:-}" ] && [ "$label" != parent-torch ]; then
    # The same script against the base tree first (the base has no COMFY_ENV_CUDA_HEAP=native).
    mkdir -p "/tmp/bench_base_$label"
    env "$@" PYTORCH_CUDA_ALLOC_CONF="$conf" COMFY_ENV_BENCH_SRC="$BASE_SRC" OUT="/tmp/bench_base_$label" \
      PYTHONPATH="$BASE_SRC:$PYTHONPATH" timeout "${BENCH_LIMIT:-240}" \
      python3 benchmarks/bench_cuda.py ${BENCH_ARGS:-} > "$OUT/bench_base_$label.log" 2>&1
    echo "bench base $label rc=$? [at $((SECONDS - T0)) s]"
    # The run's JSON, not cuda_bench_partial.json (two sources would make cp fail).
    cp "$(ls /tmp/bench_base_$label/cuda_bench_*.json | grep -v _partial | head -1)" \
      "$OUT/cuda_bench_base_$label.json" 2>/dev/null
  fi
  mkdir -p "/tmp/bench_$label"
  env "$@" PYTORCH_CUDA_ALLOC_CONF="$conf" OUT="/tmp/bench_$label" timeout "${BENCH_LIMIT:-240}" \
    python3 benchmarks/bench_cuda.py ${BENCH_ARGS:-} > "$OUT/bench_$label.log" 2>&1
  echo "bench $label rc=$? [at $((SECONDS - T0)) s]"
  cp "$(ls /tmp/bench_$label/cuda_bench_*.json | grep -v _partial | head -1)" "$OUT/cuda_bench_$label.json" 2>/dev/null
  if [ -f "$OUT/cuda_bench_base_$label.json" ] && [ -f "$OUT/cuda_bench_$label.json" ]; then
    python3 benchmarks/bench_cuda.py --compare "$OUT/cuda_bench_base_$label.json" "$OUT/cuda_bench_$label.json" \
      > "$OUT/compare_$label.txt" 2>&1
  fi
}
bench() {
  if [ -n "${BENCH_CONFS:-}" ]; then
    # BENCH_CONFS="async native": one benchmark per parent allocator, workers the same
    # (native: legacy IPC's own setting, the ipc route's).
    for c in $BENCH_CONFS; do
      # mixed: a cudaMallocAsync parent (ComfyUI's), every COMFY_ENV_CUDA_* at its default.
      case $c in async) bench_one async "backend:cudaMallocAsync" COMFY_ENV_CUDA_HEAP=pool;; native) bench_one native "";;
                 mixed) bench_one mixed "backend:cudaMallocAsync";;
                 # parent-torch: mixed, the parent's own tensors left in torch's default pool.
                 parent-torch) bench_one parent-torch "backend:cudaMallocAsync" COMFY_ENV_CUDA_PARENT_HEAP=torch;; esac
    done
    return
  fi
  if [ -n "${BASE_SRC:-}" ]; then
    # The same script against another tree's src (e.g. main's), first, in the same call:
    # H100 and H200 figures differ, so a before/after comparison must share the machine.
    mkdir -p /tmp/bench_base    # (workers import comfy_env through PYTHONPATH: the base tree's too)
    PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync COMFY_ENV_BENCH_SRC="$BASE_SRC" OUT=/tmp/bench_base \
      PYTHONPATH="$BASE_SRC:$PYTHONPATH" \
      timeout "${BENCH_LIMIT:-240}" python3 benchmarks/bench_cuda.py ${BENCH_ARGS:-} > "$OUT/bench_base.log" 2>&1
    echo "bench (base $BASE_SRC) rc=$? [at $((SECONDS - T0)) s]"
    cp /tmp/bench_base/cuda_bench_cudaMallocAsync.json "$OUT/cuda_bench_base.json" 2>/dev/null
  fi
  # Its own OUT: $OUT brings back at most 8 files (the JSON is copied back below).
  mkdir -p /tmp/bench_new
  PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync OUT=/tmp/bench_new timeout "${BENCH_LIMIT:-240}" \
    python3 benchmarks/bench_cuda.py ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
  echo "bench rc=$? [at $((SECONDS - T0)) s]"
  cp /tmp/bench_new/cuda_bench_cudaMallocAsync.json "$OUT/" 2>/dev/null
  if [ -f "$OUT/cuda_bench_base.json" ] && [ -f "$OUT/cuda_bench_cudaMallocAsync.json" ]; then
    python3 benchmarks/bench_cuda.py --compare "$OUT/cuda_bench_base.json" "$OUT/cuda_bench_cudaMallocAsync.json" \
      > "$OUT/compare.txt" 2>&1
  fi
}
if [ "${RUN_PROFILE:-0}" = 1 ]; then
  # Where worker → parent time per tensor goes: the wrap primitives, then the driver's share
  # per new tensor in both processes ($OUT/profile_w2p.log).
  PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync timeout "${PROFILE_LIMIT:-120}" \
    python3 benchmarks/profile_w2p.py --primitives --e2e-only --fresh-driver --calls 100 > "$OUT/profile_w2p.log" 2>&1
  SUMMARY+=("profile_w2p rc=$? [at $((SECONDS - T0)) s]"); echo "${SUMMARY[-1]}"
fi
if [ "${RUN_PROBE:-0}" = 1 ]; then
  timeout 120 python3 benchmarks/probe_ipc_free_while_mapped.py > "$OUT/probe.log" 2>&1
  SUMMARY+=("probe_ipc_free_while_mapped rc=$? [at $((SECONDS - T0)) s]"); echo "${SUMMARY[-1]}"
fi
if [ "${RUN_TRIM_PROBE:-0}" = 1 ]; then
  { timeout 120 python3 benchmarks/probe_pool_trim.py --gib 1; timeout 120 python3 benchmarks/probe_pool_trim.py --gib 0.0625; } \
    > "$OUT/probe_trim.log" 2>&1
  SUMMARY+=("probe_pool_trim rc=$? [at $((SECONDS - T0)) s]"); echo "${SUMMARY[-1]}"
fi
[ "${BENCH_FIRST:-0}" = 1 ] && [ "${RUN_BENCH:-1}" = 1 ] && bench
if [ "${RUN_TESTS:-1}" = 1 ]; then
  # TEST_K: a pytest -k expression, e.g. "not 10000" for a short run
  # PARENTS: which parent allocators to test under ("async native" by default)
  case " ${PARENTS:-async native} " in *" async "*)
    run_tests async "backend:cudaMallocAsync" "${TEST_LIMIT:-300}" -m "gpu and not slow" ${TEST_K:+-k "$TEST_K"};; esac
  case " ${PARENTS:-async native} " in *" native "*)
    K=${TEST_K_NATIVE:-${TEST_K:-}}     # TEST_K_NATIVE: another -k for the native parent's run
    run_tests native "" "${TEST_LIMIT:-300}" -m "gpu and not slow" ${K:+-k "$K"};; esac
  if [ "${RUN_SLOW:-1}" = 1 ]; then
    run_tests async-slow "backend:cudaMallocAsync" "${SLOW_LIMIT:-150}" -m "slow"
  fi
  # The parent-heap test once more with its output shown (its memory figures).
  [ "${SHOW_HEAP:-1}" = 1 ] && run_tests parent-heap "backend:cudaMallocAsync" 150 -m gpu -k parent_heap -s
fi
[ "${BENCH_FIRST:-0}" = 1 ] || [ "${RUN_BENCH:-1}" = 0 ] || bench
if [ "${RUN_BENCH:-1}" = 1 ] && [ "${RUN_MULTI:-1}" = 1 ] && [ -f benchmarks/bench_multigpu.py ]; then
  PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync timeout "${MULTI_LIMIT:-200}" \
    python3 benchmarks/bench_multigpu.py ${MULTI_ARGS:-} > "$OUT/bench_multigpu.log" 2>&1
  echo "bench_multigpu rc=$? [at $((SECONDS - T0)) s]"
fi
echo
echo "================ summary ================"
cat /tmp/comfy_env_gpu.txt
printf '%s\n' "${SUMMARY[@]}"
[ -f "$OUT/profile_w2p.log" ] && grep -vE "^(Traceback|  File)" "$OUT/profile_w2p.log" | tail -60
[ -f "$OUT/probe.log" ] && cat "$OUT/probe.log"
[ -f "$OUT/probe_trim.log" ] && cat "$OUT/probe_trim.log"
grep -hE "^(FAILED|ERROR)" "$OUT"/tests_*.log | head -20
if [ "${RUN_BENCH:-1}" = 1 ]; then
  for f in "$OUT"/bench.log "$OUT"/bench_base_*.log "$OUT"/bench_async.log "$OUT"/bench_native.log "$OUT"/bench_mixed.log "$OUT"/bench_parent-torch.log; do
    [ -f "$f" ] || continue
    echo "--- $f"
    sed -n '/^GPU: /,$p' "$f"
    grep -q "^GPU: " "$f" || tail -40 "$f"
  done
  [ -f "$OUT/bench_multigpu.log" ] && tail -25 "$OUT/bench_multigpu.log"
  for f in "$OUT"/compare*.txt; do [ -f "$f" ] && { echo "--- $f"; cat "$f"; }; done
fi
