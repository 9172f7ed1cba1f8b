#!/usr/bin/env bash
# The suite at setup.py's torch floor: a fresh venv with that torch (the registry's CUDA build, run on the CPU),
# the triton it pins, a numpy its Triton interpreter works with, and every extra; then the README's test command.
# Several GB of downloads, so not part of every CI run; docs/versions.md records the last result.
#   bash tests/compat/torch_floor.sh [venv dir]        (default /tmp/deepseek_moe_torch_floor)
#   TORCH=2.15.0 bash tests/compat/torch_floor.sh DIR    another torch (e.g. the newest) the same way
set -euo pipefail
cd "$(dirname "$0")/../.."
FLOOR=$(python - <<'PY'
import re
print(re.search(r'"torch>=([0-9.]+)"', open("setup.py").read()).group(1))
PY
)
VENV=${1:-/tmp/deepseek_moe_torch_floor}
python -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install --quiet --disable-pip-version-check "torch==${TORCH:-${FLOOR}.*}"
# triton <= 3.6's CPU interpreter breaks on numpy 2.4 (InterpreterError on 0-d arrays); numpy 2.3 works.
python -m pip install --quiet --disable-pip-version-check -e ".[test,bench,hf,triton]" "numpy<2.4"
python -c "import torch, triton, numpy, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__, 'transformers', transformers.__version__)"
HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-default} python -m pytest -q tests benchmarks
