#!/usr/bin/env bash
# The second GPU command of a session, after scripts/gpu_check.sh: where the Triton experts' fwd+bwd time goes
# (per kernel role, every candidate config timed) and autotuned configs for the four model shapes.
#
#   scripts/gpu_followup.sh OUT_DIR          # budget H3MOE_GPU_FOLLOWUP_BUDGET_S, default 300 s
#
# OUT_DIR receives: profile_experts.{json,md} (scripts/profile_experts.py --candidates, T=4096, saved and
# recompute backward forms), configs/*.json (python -m h3moe.ops.triton_experts for each model shape: commit
# them to h3moe/configs/ to make them the defaults on this GPU type), followup.log.
set -u -o pipefail

OUT="${1:?usage: scripts/gpu_followup.sh OUT_DIR}"
mkdir -p "$OUT/configs"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d "$PWD/.gpu/site" ] && export PYTHONPATH="$PYTHONPATH:$PWD/.gpu/site"
unset TRITON_INTERPRET
PY="${PYTHON:-python3}"
TOTAL="${H3MOE_GPU_FOLLOWUP_BUDGET_S:-300}"
START=$(date +%s)
LOG="$OUT/followup.log"
: > "$LOG"
left() { echo $(( TOTAL - ($(date +%s) - START) )); }
say() { echo "[gpu_followup $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# 1. per-kernel breakdown (about 40% of the budget)
PROF_S=$(( TOTAL * 2 / 5 ))
say "profile: limit ${PROF_S}s"
timeout -k 10 "$PROF_S" "$PY" scripts/profile_experts.py --out "$OUT" --candidates --tokens 4096 --torch-profile mixtral \
  --budget-s $(( PROF_S - 40 )) >> "$LOG" 2>&1
say "profile: rc=$?"

# 2. autotune each model shape (fwd + bwd roles) while the budget lasts; shapes in the order of the targets missed
for shape in "8 4096 14336 2 mixtral" "3 4096 11008 2 h3fusion" "128 2048 768 8 qwen3" "64 2048 1024 8 olmoe"; do
  set -- $shape
  L=$(( $(left) - 10 ))
  if [ "$L" -lt 30 ]; then say "tune $5: skipped (budget)"; continue; fi
  say "tune $5: limit ${L}s"
  timeout -k 10 "$L" "$PY" -m h3moe.ops.triton_experts --E "$1" --H "$2" --I "$3" --K "$4" \
    --tokens 1,16,1024,4096 --out "$OUT/configs" >> "$LOG" 2>&1
  say "tune $5: rc=$?"
done
say "done in $(( $(date +%s) - START ))s of ${TOTAL}s"
ls "$OUT/configs" | tee -a "$LOG"
[ -f "$OUT/profile_experts.md" ] && cat "$OUT/profile_experts.md"
