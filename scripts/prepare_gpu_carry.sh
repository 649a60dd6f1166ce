#!/usr/bin/env bash
# Here (CPU machine, before a GPU session): put what the GPU image lacks into .gpu/site (git-ignored), small
# enough to travel with the device tool's working tree (64 MiB cap): bitsandbytes' Python files plus only its
# CUDA 13.0 library (~5 MB of the 125 MB wheel), for the bench's bitsandbytes dequantize-then-matmul baseline.
# Then on the GPU:   run(carry=[".gpu"], command="... scripts/gpu_check.sh $OUT")   (gpu_check.sh adds
# .gpu/site to PYTHONPATH when it exists).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
SRC=$("$PY" -c "import bitsandbytes, os; print(os.path.dirname(bitsandbytes.__file__))" 2>/dev/null | tail -n 1)
rm -rf .gpu/site && mkdir -p .gpu/site/bitsandbytes
(cd "$SRC" && find . \( -name "*.py" -o -name py.typed \) -not -path "*/__pycache__/*" -exec cp --parents {} "$OLDPWD/.gpu/site/bitsandbytes/" \;)
cp "$SRC/libbitsandbytes_cuda130.so" .gpu/site/bitsandbytes/
du -sh .gpu/site
