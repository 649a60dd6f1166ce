#!/usr/bin/env bash
# One command for a GPU machine: build csrc/, run the gpu test tier, run the benchmark driver, and write
# everything into OUT_DIR, all in under 8 minutes (hard cap H3MOE_GPU_CHECK_BUDGET_S, default 450 s).
#
#   scripts/gpu_check.sh OUT_DIR
#
# Needs: python3 with torch (CUDA), triton, transformers, pytest (+ pytest-timeout); cmake, ninja, nvcc for
# the CUDA library (skipped without them). Installs nothing: h3moe and bench/ are used from this tree
# through PYTHONPATH. Each step has its own timeout and log; the budget left decides what the next step gets,
# and the benchmark driver stops adding cases at its --budget-s (its JSON is rewritten as it goes, and on
# SIGTERM, so a step cut short still leaves its results).
#
# OUT_DIR receives (8 files): gpu_check.log (environment, build, step times), pytest_gpu.log, bench.json,
# bench.md, bench.log, bench.png (when matplotlib is there), compare.md (python -m bench --compare-latest:
# against the newest committed record of this GPU), kernel_report.txt.
# Commit the results as bench/results/<gpu>-<date>.json + .md (+ .png): see bench/results/README.md.
# H3MOE_COMMIT=<sha> names the commit where this tree has no .git; PYTHON=... picks the interpreter;
# H3MOE_GPU_CHECK_SKIP_BUILD=1 skips the CUDA build (a dry run of the script on a CPU machine).
set -u -o pipefail

OUT="${1:?usage: scripts/gpu_check.sh OUT_DIR}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
ROOT="$PWD"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Packages the GPU image lacks (bitsandbytes, for its baseline rows), carried by scripts/prepare_gpu_carry.sh.
[ -d "$ROOT/.gpu/site" ] && export PYTHONPATH="$PYTHONPATH:$ROOT/.gpu/site"
unset TRITON_INTERPRET
PY="${PYTHON:-python3}"
TOTAL="${H3MOE_GPU_CHECK_BUDGET_S:-450}"
START=$(date +%s)
LOG="$OUT/gpu_check.log"
: > "$LOG"
SUMMARY=""

left() { echo $(( TOTAL - ($(date +%s) - START) )); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }
say() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# step NAME LIMIT_S LOGFILE CMD...: run CMD under timeout (SIGTERM, then SIGKILL 10 s later), output to LOGFILE.
step() {
  local name="$1" limit="$2" logf="$3"; shift 3
  if [ "$limit" -lt 5 ]; then
    say "$name: skipped (budget spent)"; SUMMARY+="$(printf '%-10s skipped (budget)' "$name")"$'\n'; return 99
  fi
  say "$name: start (limit ${limit}s): $*"
  local t0=$(date +%s)
  timeout -k 10 "$limit" "$@" >> "$logf" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  local what="rc=$rc"; [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && what="TIMED OUT (rc=$rc)"
  say "$name: $what in ${dt}s"
  SUMMARY+="$(printf '%-10s %-22s %4ss' "$name" "$what" "$dt")"$'\n'
  return $rc
}

# ---------------------------------------------------------------------------------------------- environment
{
  echo "== $(date -u +%FT%TZ) $(hostname)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv 2>&1 | head -5
  echo "nvcc: $(nvcc --version 2>/dev/null | tail -1)"; echo "cmake: $(cmake --version 2>/dev/null | head -1)"
  echo "commit: ${H3MOE_COMMIT:-$(git -C "$ROOT" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
} >> "$LOG" 2>&1
export H3MOE_COMMIT="${H3MOE_COMMIT:-$(git -C "$ROOT" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
timeout 60 "$PY" - >> "$LOG" 2>&1 <<'EOF'
import torch, importlib
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for m in ("triton", "transformers", "pytest", "pytest_benchmark", "pytest_timeout", "matplotlib", "bitsandbytes"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except Exception as e:
        print(m, "not importable:", type(e).__name__)
EOF

# ------------------------------------------------------------------------------------------ build csrc/
if [ -n "${H3MOE_GPU_CHECK_SKIP_BUILD:-}" ]; then
  say "build: skipped (H3MOE_GPU_CHECK_SKIP_BUILD)"; SUMMARY+="build      skipped"$'\n'
elif command -v nvcc >/dev/null && command -v cmake >/dev/null && [ -f CMakeLists.txt ]; then
  GEN=(); command -v ninja >/dev/null && GEN=(-G Ninja)
  step build "$(min 150 $(( $(left) - 240 )))" "$LOG" \
    bash -c "cmake -S . -B build/csrc -DH3MOE_CUDA_ARCHS=90a ${GEN[*]} && cmake --build build/csrc -j 16"
else
  say "build: skipped (needs nvcc, cmake and CMakeLists.txt)"; SUMMARY+="build      skipped"$'\n'
fi
timeout 60 "$PY" -c "import h3moe; [print(' ', s) for s in h3moe.backends().values()]" >> "$LOG" 2>&1

# ------------------------------------------------------------------------------------------ gpu tests
TO=""; "$PY" -c "import pytest_timeout" 2>/dev/null && TO="--timeout=120"
# The gpu-marked tests of tests/ and bench/ (the bench smoke file's CUDA-graph and lowp rows). One pytest
# process per test file, three at a time (all at once ran the GPU out of memory): a kernel fault stays in its
# file, and Triton's compiles (CPU-bound) spread over the cores. Heaviest files first.
gpu_tests() {
  local files f
  files=$(for f in $(grep -l "pytest.mark.gpu" tests/test_*.py bench/test_*.py); do echo "$(wc -c < "$f") $f"; done | sort -rn | cut -d' ' -f2)
  mkdir -p "$OUT/.pt"
  printf '%s\n' $files | xargs -P 3 -I{} bash -c \
    'timeout -k 5 "$PER_FILE_S" "$PY" -m pytest -q -m gpu "{}" $TO -p no:cacheprovider -o addopts="-ra" > "$OUT/.pt/$(basename "{}").log" 2>&1'
  local rc=$?
  for f in $files; do
    echo "===== $f: $(tail -n 1 "$OUT/.pt/$(basename "$f").log")"; cat "$OUT/.pt/$(basename "$f").log"; echo
  done
  rm -rf "$OUT/.pt"
  return $rc
}
TESTS_S=$(min 260 $(( $(left) - 170 ))); PER_FILE_S=$(( TESTS_S - 15 ))
export -f gpu_tests; export PY TO OUT PER_FILE_S
step tests "$TESTS_S" "$OUT/pytest_gpu.log" bash -c gpu_tests

# ---------------------------------------------------------------------------------------------- bench
BUDGET=$(( $(left) - 45 ))
step bench "$(( $(left) - 20 ))" "$OUT/bench.log" \
  "$PY" -m bench --quick --budget-s "$BUDGET" --out "$OUT/bench.json" --plot --plot-combined

# what changed against the newest committed record of this GPU (targets newly met / missed, rows that moved)
[ -f "$OUT/bench.json" ] && timeout 60 "$PY" -m bench --compare-latest "$OUT/bench.json" > "$OUT/compare.md" 2>&1

# ------------------------------------------------------------------------------------ static kernel report
{
  echo "== libh3moe_cuda.so resource usage (cuobjdump)"
  LIB=build/csrc/libh3moe_cuda.so
  CUOBJ=$(command -v cuobjdump || "$PY" -c "import triton,os;print(os.path.join(os.path.dirname(triton.__file__),'backends/nvidia/bin/cuobjdump'))" 2>/dev/null)
  if [ -f "$LIB" ] && [ -x "$CUOBJ" ]; then timeout 30 "$CUOBJ" --dump-resource-usage "$LIB" 2>&1 | grep -E "Function|REG|spill" | head -80
  else echo "(no library or no cuobjdump)"; fi
  echo; echo "== Triton kernels (scripts/kernel_report.py --arch 90 --jobs N)"
} > "$OUT/kernel_report.txt" 2>&1
if [ -f scripts/kernel_report.py ]; then
  # every spec of the compile tier (~500 since the TMA and quant kernels): on all but a few of the cores
  step kernels "$(min 60 $(( $(left) - 5 )))" "$OUT/kernel_report.txt" "$PY" scripts/kernel_report.py --arch 90 \
    --jobs "$(min 12 "$(nproc)")"
fi

# --------------------------------------------------------------------------------------------- summary
# Printed last, most important last (only the tail of stdout may come back): bench tables, tests, steps.
say "done in $(( $(date +%s) - START ))s of ${TOTAL}s"
echo
echo "== bench (all rows and per-point targets: $OUT/bench.md)"
if [ -f "$OUT/bench.md" ]; then
  sed -n '1,6p' "$OUT/bench.md" | grep -v '^$'
  sed -n '/^## Summary/,/^## All rows/p' "$OUT/bench.md" | grep -v -e '^## All rows' -e '^$'
  echo "Targets:"
  sed -n '/^## Targets/,/^## Summary/p' "$OUT/bench.md" | sed -n '/^| target | needs/,/^$/p' | grep -v '^$'
else
  tail -n 30 "$OUT/bench.log"
fi
echo "== against the last record ($OUT/compare.md)"; grep -E "^\(against|now met|now missed" "$OUT/compare.md" 2>/dev/null | head -n 30
echo "== gpu tests ($OUT/pytest_gpu.log)"; grep -E '^===== tests/|^(FAILED|ERROR)' "$OUT/pytest_gpu.log" 2>/dev/null | cut -c1-200 | head -n 60
echo "== steps"; printf '%s' "$SUMMARY"
