#!/usr/bin/env bash
# bench/gpu_check.sh OUTDIR — the one prepared check for a machine with an NVIDIA GPU
# (no network needed: torch, nvcc, cmake, ninja, pybind11 and scikit-build-core must
# already be installed for python3).
#
# Builds lowbit for this GPU only (LOWBIT_CUDA_ARCHS, default 90a = H100/H200), runs
# the CUDA tests, the GPU benchmarks (each after a probe that its newest kernel agrees with
# the one it replaced; a failed probe runs that bench on the old kernel), a
# compute-sanitizer memcheck of the small CUDA tests (CHECK_MEMCHECK_K: another -k) and a
# synccheck of the small W8A8 TMA / cluster tests (unless CHECK_SYNCCHECK=0) and,
# time permitting, the tuning sweeps of dev/gpu_sweep.py (unless CHECK_SWEEP=0;
# CHECK_SWEEP_PARTS picks the parts) and the CPU tests (unless CHECK_CPU_TESTS=0). Every step
# has its own timeout and the whole script stops starting steps once its budget
# (CHECK_BUDGET_S, default 450 s) is spent, so it ends in under 8 minutes. A failing step is recorded, not fatal.
#
# Writes at most 8 files (all a device lease brings back), all at the top of OUTDIR:
#   build.log (nvidia-smi, build, lowbit.info)  tests.log (CUDA tests, memcheck, CPU tests)
#   bench.log (probes and benches)  gpu_bench.json  gpu_attention.json  profile.txt  sweep.txt
#   summary.md
# and prints summary.md last, its status lines at the very end. Exit status: 0 if the build, the tests,
# memcheck and synccheck passed.
set -euo pipefail

if [ $# -ne 1 ]; then
  echo "usage: bench/gpu_check.sh OUTDIR" >&2
  exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
ROOT=$(pwd)

START=$SECONDS
BUDGET=${CHECK_BUDGET_S:-450}
ARCHS=${LOWBIT_CUDA_ARCHS:-90a}
CUDA_FILES="tests/test_int4_cuda.py tests/test_int8_cuda.py tests/test_attention_cuda.py"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="$PATH:/usr/local/cuda/bin"
fi

declare -A RC=() SECS=()

# step NAME LIMIT_S LOG CMD...: runs CMD under `timeout`, output appended to LOG;
# records its exit status in RC[NAME] (124 = timed out, "skipped" = no time left).
step() {
  local name=$1 limit=$2 log=$3
  shift 3
  local left=$((BUDGET - (SECONDS - START)))
  if ((left < 15)); then
    echo "[$name] skipped: the ${BUDGET}s budget is spent" | tee -a "$log"
    RC[$name]=skipped
    SECS[$name]=0
    return 0
  fi
  ((limit > left)) && limit=$left
  local t0=$SECONDS rc=0
  echo "[$name] \$ $* (timeout ${limit}s)" >>"$log"
  timeout -k 10 "$limit" "$@" >>"$log" 2>&1 || rc=$?
  RC[$name]=$rc
  SECS[$name]=$((SECONDS - t0))
  echo "[$name] exit $rc after ${SECS[$name]}s" | tee -a "$log"
}

# The last pytest summary line of a log ("3 failed, 120 passed, 2 skipped in 9.1s").
pytest_line() {
  grep -E '[0-9]+ (passed|failed|errors?|skipped|deselected)|no tests ran' "$1" 2>/dev/null | tail -n 1 || true
}

echo "lowbit gpu_check: archs=$ARCHS budget=${BUDGET}s out=$OUT"

# 1. the GPU
step nvidia_smi 30 "$OUT/build.log" nvidia-smi
GPU=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1 || true)

# 2. build + install, for this GPU only
step build 300 "$OUT/build.log" env LOWBIT_CUDA=on LOWBIT_CUDA_ARCHS="$ARCHS" CMAKE_BUILD_PARALLEL_LEVEL=16 \
  python3 -m pip install --no-build-isolation --no-deps -v .

if [ "${RC[build]}" = 0 ]; then
  # 3. what was built and what it sees (run outside the checkout: import the installed package)
  (cd "$TMP" && step info 60 "$OUT/build.log" python3 -m lowbit.info)

  # 4. CUDA tests (not -x: one run should show every failure; --maxfail stops a cascade)
  # (a test still running after 60 s, a hung kernel, ends the run: its id and stacks, the last
  # entry of hung.txt, go into the log)
  step cuda_tests 210 "$TMP/cuda_tests.log" env LOWBIT_TEST_TIMEOUT_S=60 LOWBIT_TEST_TIMEOUT_LOG="$TMP/hung.txt" \
    python3 -m pytest -q -rfE --maxfail=10 $CUDA_FILES
  if grep -q "^Timeout" "$TMP/hung.txt" 2>/dev/null; then
    { echo "===== a test hung (LOWBIT_TEST_TIMEOUT_S): the test, then the stacks"; grep -B1 -A30 "^Timeout" "$TMP/hung.txt"; } \
      >>"$TMP/cuda_tests.log"
  fi
  CUDA_TESTS=$(pytest_line "$TMP/cuda_tests.log")

  # 5. benchmarks: quantized matmul (attention after the sanitizers: its kernels changed least
  # lately, and a run short of time should still get the memcheck). Each first probes, in its own process, that
  # the newest kernels agree with the ones they replaced (W8A16 on tensor cores vs the CUDA-core
  # GEMV, W8A8 by default (the TMA kernel by shape) vs mma.sync, tensor-core decode vs CUDA-core
  # decode); if not, that bench runs with the old kernel (LOWBIT_CUDA_W8A16=simt,
  # LOWBIT_CUDA_W8A8=mma, LOWBIT_CUDA_DECODE=simt), so one wrong kernel cannot cost the tables.
  MM_ENV=() ATT_ENV=()
  step probe_matmul 60 "$OUT/bench.log" python3 bench/gpu_matmul.py --probe  # bit 0: W8A16, bit 1: W8A8
  case "${RC[probe_matmul]}" in
    0) ;;
    1) MM_ENV=(LOWBIT_CUDA_W8A16=simt) ;;
    2) MM_ENV=(LOWBIT_CUDA_W8A8=mma) ;;
    *) MM_ENV=(LOWBIT_CUDA_W8A16=simt LOWBIT_CUDA_W8A8=mma) ;;
  esac
  step bench 240 "$OUT/bench.log" env "${MM_ENV[@]}" python3 bench/gpu_matmul.py \
    --out "$OUT/gpu_bench.json"

  # 6. memcheck of the small CUDA tests (each tensor its own allocation so overruns are seen)
  SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1 || true)
  if [ -n "$SANITIZER" ]; then
    step memcheck 200 "$TMP/memcheck.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      "$SANITIZER" --tool memcheck --error-exitcode 1 python3 -m pytest -q -x -k "${CHECK_MEMCHECK_K:-small and not nobias}" $CUDA_FILES
  else
    echo "compute-sanitizer not found" >"$TMP/memcheck.log"
    RC[memcheck]=missing
    SECS[memcheck]=0
  fi
  MEMCHECK=$( (grep -E 'ERROR SUMMARY' "$TMP/memcheck.log" || true) | tail -n 1)
  # 6a. synccheck (barrier misuse: named barriers, divergent bar.sync) of the small fp16 tests of
  # the warp-specialized W8A8 kernels, alone and in clusters of 2 and 4 (14 tests; the dtypes
  # differ only in the epilogue's conversions; CHECK_SYNCCHECK=0 skips it)
  if [ -n "$SANITIZER" ] && [ "${CHECK_SYNCCHECK:-1}" != 0 ]; then
    step synccheck 90 "$TMP/synccheck.log" "$SANITIZER" --tool synccheck --error-exitcode 1 \
      python3 -m pytest -q -x -k "small and fp16 and (tensor_core_kernels_agree or cluster)" tests/test_int8_cuda.py
    SYNCCHECK=$( (grep -E 'ERROR SUMMARY' "$TMP/synccheck.log" || true) | tail -n 1)
  else
    RC[synccheck]=skipped
  fi

  # 6a'. the attention benchmark (after its own probe: see 5)
  step probe_decode 60 "$OUT/bench.log" python3 bench/gpu_attention.py --probe
  [ "${RC[probe_decode]}" = 0 ] || ATT_ENV=(LOWBIT_CUDA_DECODE=simt)
  step bench_attention 150 "$OUT/bench.log" env "${ATT_ENV[@]}" python3 bench/gpu_attention.py \
    --out "$OUT/gpu_attention.json"

  # 6b. a profile (stall reasons, instruction mix), when Nsight Compute is here: of the W4A16
  # kernel, or with CHECK_PROFILE=w8a8 of W8A8's TMA kernel at M = 2048 on 4096 x 4096
  NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1 || true)
  if [ -n "$NCU" ] && [ "${CHECK_PROFILE:-1}" != 0 ]; then
    # ncu matches the kernel's base name, not its template arguments: W4A16's is woq_kernel<...,
    # Int4<...>>, its 3rd to 5th launches M = 1, M = 16 and M = 1 on 8 blocks per SM; W8A8's two
    # launches are the TMA kernel alone and in clusters of two and four (see --profile)
    if [ "${CHECK_PROFILE:-1}" = w8a8 ]; then
      PROFILED=(--kernel-name regex:w8a8_tma_kernel --launch-count 3)
    else
      PROFILED=(--kernel-name regex:woq_kernel --launch-skip 2 --launch-count 3)
    fi
    step profile 90 "$OUT/profile.txt" "$NCU" "${PROFILED[@]}" \
      --section SpeedOfLight --section Occupancy --section WarpStateStats --section InstructionStats \
      --section SchedulerStats --section MemoryWorkloadAnalysis \
      python3 bench/gpu_matmul.py --profile "$([ "${CHECK_PROFILE:-1}" = w8a8 ] && echo w8a8 || echo w4a16)"
  else
    echo "Nsight Compute (ncu) not found, or CHECK_PROFILE=0" >"$OUT/profile.txt"
    RC[profile]=missing
  fi

  # 6c. the tuning sweeps of dev/gpu_sweep.py (default: the weight-only kernels' fixed cost, K
  # splits and bulk copies, the decode's merge overlap, splits and blocks per SM, W8A8 on each
  # kernel and the quantizer alone, each quantizer kernel), with what time is left: data for
  # the next tuning decision
  if [ "${CHECK_SWEEP:-1}" != 0 ]; then
    # shellcheck disable=SC2086
    step sweep 150 "$OUT/sweep.txt" python3 dev/gpu_sweep.py \
      ${CHECK_SWEEP_PARTS:-woq decode w8a8}
  fi

  # 7. the CPU tests, with what time is left
  CPU_FILES=$(ls tests/test_*.py 2>/dev/null | grep -v '_cuda.py' || true)
  if [ -n "$CPU_FILES" ] && [ "${CHECK_CPU_TESTS:-1}" != 0 ]; then
    # shellcheck disable=SC2086
    step cpu_tests 240 "$TMP/cpu_tests.log" python3 -m pytest -q -rfE --maxfail=10 $CPU_FILES
    CPU_TESTS=$(pytest_line "$TMP/cpu_tests.log")
  fi
  {
    echo "===== CUDA tests: $CUDA_FILES"
    cat "$TMP/cuda_tests.log" 2>/dev/null || true
    echo
    echo "===== CPU tests: ${CPU_FILES:-none}" | tr '\n' ' '
    echo
    cat "$TMP/cpu_tests.log" 2>/dev/null || true
    echo
    echo "===== memcheck"
    cat "$TMP/memcheck.log" 2>/dev/null || true
    echo
    echo "===== synccheck"
    cat "$TMP/synccheck.log" 2>/dev/null || true
  } >"$OUT/tests.log"
fi

# 8. summary
bench_table() {  # bench_table JSON: the bench's markdown table, marked if the bench was cut off
  python3 -c 'import json, sys
d = json.load(open(sys.argv[1]))
print(("(partial: the bench was cut off)\n\n" if d.get("partial") else "") + d["table_md"])' "$1" || true
}
status() {  # status NAME: "ok", "FAILED (exit N)", "TIMED OUT", ...
  local rc=${RC[$1]:-not run}
  case "$rc" in
    0) echo "ok" ;;
    124 | 137) echo "TIMED OUT" ;;
    skipped | missing | "not run") echo "$rc" ;;
    *) echo "FAILED (exit $rc)" ;;
  esac
}
{
  echo "# lowbit GPU check"
  echo
  echo "- GPU: ${GPU:-unknown}"
  if COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null); then
    git -C "$ROOT" diff --quiet HEAD 2>/dev/null || COMMIT="$COMMIT (+ local changes)"
    echo "- commit: $COMMIT"
  fi
  echo "- build (LOWBIT_CUDA_ARCHS=$ARCHS): $(status build), ${SECS[build]:-0}s"
  echo "- CUDA tests: $(status cuda_tests): ${CUDA_TESTS:-no summary} (${SECS[cuda_tests]:-0}s)"
  echo "- memcheck (-k small): $(status memcheck): ${MEMCHECK:-no summary} (${SECS[memcheck]:-0}s)"
  echo "- synccheck (W8A8 TMA / cluster, small): $(status synccheck): ${SYNCCHECK:-no summary} (${SECS[synccheck]:-0}s)"
  echo "- CPU tests: $(status cpu_tests): ${CPU_TESTS:-no summary} (${SECS[cpu_tests]:-0}s)"
  echo "- probe W8A16 tensor cores = CUDA cores, W8A8 default = mma.sync: $(status probe_matmul)${MM_ENV:+ (bench ran with ${MM_ENV[*]})}"
  echo "- benchmark (matmul): $(status bench) (${SECS[bench]:-0}s)"
  echo "- probe decode tensor cores = CUDA cores: $(status probe_decode)${ATT_ENV:+ (bench ran with ${ATT_ENV[*]})}"
  echo "- benchmark (attention): $(status bench_attention) (${SECS[bench_attention]:-0}s)"
  echo "- profile (ncu, $([ "${CHECK_PROFILE:-1}" = w8a8 ] && echo W8A8 || echo W4A16)): $(status profile) (${SECS[profile]:-0}s)"
  echo "- sweep (dev/gpu_sweep.py, in sweep.txt): $(status sweep) (${SECS[sweep]:-0}s)"
  echo "- total: $((SECONDS - START))s of a ${BUDGET}s budget"
} >"$TMP/head.md"
{
  if [ "${RC[build]}" != 0 ]; then
    echo
    echo "## build log (tail)"
    echo '```'
    tail -n 40 "$OUT/build.log"
    echo '```'
  fi
  if [ -s "$OUT/gpu_bench.json" ]; then
    echo
    echo "## benchmark"
    echo
    bench_table "$OUT/gpu_bench.json"
  fi
  if [ -s "$OUT/gpu_attention.json" ]; then
    echo
    echo "## attention benchmark"
    echo
    bench_table "$OUT/gpu_attention.json"
  fi
  if [ "${RC[profile]:-}" = 0 ] && [ -s "$OUT/profile.txt" ]; then  # what the next tuning decision needs
    echo
    echo "## profile digest (all of it in profile.txt)"
    echo '```'
    grep -E '\(([0-9]+, ){2}[0-9]+\)x\(|Duration|Throughput|Issued Warp Per Scheduler|No Eligible|Active Warps Per|Eligible Warps Per|Warp Cycles Per Issued|Occupancy|Registers Per Thread|stall|Stall' \
      "$OUT/profile.txt" | cut -c1-180 | head -n 75 || true
    echo '```'
  fi
  if [ -s "$OUT/gpu_bench.json" ]; then  # (after the tables: in the tail a caller keeps)
    echo
    echo "## matmul switches against their defaults (same run)"
    echo
    python3 -c 'import json, sys; print(json.load(open(sys.argv[1])).get("switch_md", ""))' "$OUT/gpu_bench.json" || true
  fi
  if [ -f "$TMP/cuda_tests.log" ] && [ "${RC[cuda_tests]:-}" != 0 ]; then
    echo
    echo "## CUDA test failures (tail)"
    echo '```'
    grep -E '^(FAILED|ERROR)' "$TMP/cuda_tests.log" | head -n 20 || true
    tail -n 30 "$TMP/cuda_tests.log"
    echo '```'
  fi
} >"$TMP/body.md"

cat "$TMP/head.md" "$TMP/body.md" >"$OUT/summary.md"
# printed with the status lines last: a caller that keeps only the tail of the output sees them
cat "$TMP/body.md" "$TMP/head.md"
for s in build cuda_tests memcheck synccheck; do
  case "${RC[$s]:-}" in
    0 | missing | skipped) ;;
    *) exit 1 ;;
  esac
done
exit 0
