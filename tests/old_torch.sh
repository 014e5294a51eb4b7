#!/usr/bin/env bash
# tests/old_torch.sh [PYTEST ARGS]: the test suite under the oldest torch lowbit declares
# (pyproject: torch>=2.4), against the lowbit already installed for python3. The native
# code never sees libtorch (ARCHITECTURE.md), so that same build must serve torch 2.4 as it
# serves the newest: only the Python side can break (an API torch 2.4 lacks).
#
# torch 2.4.1 comes from PyPI into a venv (LOWBIT_OLD_TORCH_VENV, default build/torch24):
# PyPI carries only its CUDA build, ~2.5 GB with its nvidia packages, which runs on the CPU
# as well. lowbit is linked into the venv, not rebuilt. transformers / accelerate are left
# out (the tests that compare against them skip): their current releases may need a newer torch.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LOWBIT_OLD_TORCH_VENV:-build/torch24}
TORCH=2.4.1
mkdir -p "$VENV" && VENV=$(cd "$VENV" && pwd)  # (the checks below run from /tmp)

PKG=$(cd /tmp && python3 -c "import lowbit, os; print(os.path.dirname(lowbit.__file__))")
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "torch==$TORCH" numpy "pytest>=7" "hypothesis>=6" gguf
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
ln -sfn "$PKG" "$SITE/lowbit"
(cd /tmp && "$VENV/bin/python" -c "
import torch, lowbit, sys
assert torch.__version__.startswith('$TORCH'), torch.__version__
print('lowbit', lowbit.__file__, 'under torch', torch.__version__)")
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests "$@"
