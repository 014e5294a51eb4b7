#!/usr/bin/env bash
# tests/floor.sh [PYTEST ARGS]: the test suite at the oldest versions the package declares:
# torch 2.4 (pyproject: torch>=2.4) on Python 3.9 (requires-python >= 3.9), where a
# python3.9 runs (on PATH, or among pyenv's versions); else on python3, said so. The CPU
# extension is built for that Python into a venv (LOWBIT_FLOOR_VENV, default build/floor;
# LOWBIT_CUDA=off: the CUDA module is the same code whatever the torch, and the main run
# covers it). torch 2.4.1 comes from PyPI, which has only its CUDA build (~2.5 GB with its
# nvidia packages); it runs on the CPU as well. transformers / accelerate are left out (the
# tests comparing against them skip): their current releases may need a newer torch.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LOWBIT_FLOOR_VENV:-build/floor}
mkdir -p "$VENV" && VENV=$(cd "$VENV" && pwd)  # (the check below runs from /tmp)
TORCH=2.4.1
PY=""
for cand in python3.9 "$(pyenv root 2>/dev/null || echo /nonexistent)"/versions/3.9*/bin/python3.9; do
  # (a pyenv shim exists even where 3.9 is not the selected version: ask it to run)
  if "$cand" -c "import sys; assert sys.version_info[:2] == (3, 9)" 2>/dev/null; then PY=$cand; break; fi
done
if [ -z "$PY" ]; then
  PY=$(command -v python3)
  echo "floor.sh: no Python 3.9 found; torch $TORCH on $("$PY" --version) instead"
fi

"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "torch==$TORCH" numpy "pytest>=7" "hypothesis>=6" gguf \
  "scikit-build-core>=0.10" "pybind11>=2.12" cmake ninja
LOWBIT_CUDA=off CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$VENV/bin/python" -m pip install -q --no-build-isolation \
  --no-deps .
(cd /tmp && "$VENV/bin/python" -c "
import sys, torch, lowbit
assert torch.__version__.startswith('$TORCH'), torch.__version__
print('floor.sh: lowbit', lowbit.__version__, 'under torch', torch.__version__, 'on Python', sys.version.split()[0])")
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests "$@"
