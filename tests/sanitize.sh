#!/usr/bin/env bash
# tests/sanitize.sh [PYTEST ARGS]: the CPU test suite against an AddressSanitizer +
# UndefinedBehaviorSanitizer build of lowbit._C (CMake option LOWBIT_SANITIZE).
# Any report is fatal (halt_on_error / -fno-sanitize-recover), so a green run means
# no out-of-bounds access, use-after-free or UB was seen. Needs gcc, cmake, ninja.
#
# The sanitized extension is built into build/asan (LOWBIT_ASAN_BUILD) and put,
# with the Python sources, on PYTHONPATH ahead of any installed lowbit; the ASan
# and UBSan runtimes are preloaded into python. Leak checking is off: CPython and
# torch keep allocations alive until exit by design.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${LOWBIT_ASAN_BUILD:-build/asan}

python3 -m pip install -q "pybind11>=2.12"
cmake -S . -B "$BUILD" -G Ninja -DLOWBIT_CUDA=off -DLOWBIT_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v python3)" >/dev/null
cmake --build "$BUILD"

PKG="$BUILD/pkg"
rm -rf "$PKG" && mkdir -p "$PKG"
cp -r python/lowbit "$PKG/"
cp "$BUILD"/_C*.so "$PKG/lowbit/"

export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export PYTHONPATH="$(cd "$PKG" && pwd)"
python3 -c "import lowbit, sys; sys.exit(0 if lowbit.__file__.startswith('$PYTHONPATH/') else 'not the sanitized build: ' + lowbit.__file__)"
python3 -m pytest -q -p no:cacheprovider \
  tests/test_int8.py tests/test_int4.py tests/test_formats_int4.py tests/test_half.py tests/test_nn.py \
  tests/test_attention.py tests/test_kv_cache.py tests/test_info.py tests/test_fuzz.py tests/test_fused.py \
  tests/test_replay.py tests/test_models.py "$@"
