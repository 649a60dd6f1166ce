#!/usr/bin/env bash
# The second GPU command of a session, after scripts/gpu_check.sh: tuned configs for the four model shapes,
# the targets' rows re-measured with them, and where the Triton experts' fwd+bwd time goes.
#
#   scripts/gpu_followup.sh OUT_DIR          # budget H3MOE_GPU_FOLLOWUP_BUDGET_S, default 300 s
#
# OUT_DIR receives:
#   configs/*.json       python -m h3moe.ops.triton_experts for each shape (T = 1, 16, 4096; fwd and bwd
#                        roles): commit them to h3moe/configs/ to make them the configs on this GPU type
#   bench_tuned.{json,md} python -m bench, fwd and fwdbwd at T = 1, 16, 4096, h3moe:triton* and the
#                        grouped_mm baselines, with those configs (H3MOE_CONFIG_DIR); compare_tuned.md: against
#                        the newest committed record (python -m bench --compare-latest)
#   quant/profile_experts.{json,md} scripts/profile_experts.py --quant nf4,int8: the quantized decode (Mixtral,
#                        Qwen3; T = 1, 16) kernel by kernel, GB/s against the copy bandwidth: both 4-bit
#                        lookups, the GEMV against the tensor-core kernels, their words 1 or 2 K steps ahead
#   host/host_overhead.{json,md} scripts/host_overhead.py: per decode call (T = 1, 16; Qwen3, OLMoE, Mixtral)
#                        the host's cost against the device's, and where the host's time goes (cProfile)
#   profile_experts.{json,md} scripts/profile_experts.py --candidates at T=4096 with those configs (backward
#                        saved / recomputed, combine fp32 / lowp / atomic): per kernel
#                        role, every candidate timed; and the torch backend's kernel table on Mixtral
#   followup.log
set -u -o pipefail

OUT="${1:?usage: scripts/gpu_followup.sh OUT_DIR}"
mkdir -p "$OUT/configs"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d "$PWD/.gpu/site" ] && export PYTHONPATH="$PYTHONPATH:$PWD/.gpu/site"
unset TRITON_INTERPRET
export H3MOE_COMMIT="${H3MOE_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
PY="${PYTHON:-python3}"
TOTAL="${H3MOE_GPU_FOLLOWUP_BUDGET_S:-300}"
START=$(date +%s)
LOG="$OUT/followup.log"
: > "$LOG"
left() { echo $(( TOTAL - ($(date +%s) - START) )); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }
say() { echo "[gpu_followup $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# 0. the descriptor (TMA) kernels, once, in a child process: where they run and agree, the tuner and the
#    profile below also time the Tma candidates (H3MOE_TMA=auto; the default leaves them out)
if timeout -k 5 135 "$PY" -c "import sys; from h3moe.ops.triton_experts import tma_smoke; r = tma_smoke(); \
print('tma smoke:', r or 'ok'); sys.exit(1 if r else 0)" >> "$LOG" 2>&1; then
  export H3MOE_TMA=auto; say "tma: smoke ok, H3MOE_TMA=auto"
else
  say "tma: smoke failed (see followup.log): Tma candidates left out"
fi

# 1. autotune each model shape (about half the budget), in the order of the targets missed; each first
#    compiles every candidate in 12 processes at once on a stand-in shape (precompile(): ~40 variants per
#    shape, which the tuner would otherwise compile one after the other), then times them
TUNE_END=$(( TOTAL / 2 ))
for shape in "8 4096 14336 2 mixtral" "3 4096 11008 2 h3fusion" "128 2048 768 8 qwen3" "64 2048 1024 8 olmoe"; do
  set -- $shape
  L=$(( TUNE_END - ($(date +%s) - START) ))
  if [ "$L" -lt 20 ]; then say "tune $5: skipped (budget)"; continue; fi
  say "tune $5: limit ${L}s"
  timeout -k 10 "$L" "$PY" -m h3moe.ops.triton_experts --E "$1" --H "$2" --I "$3" --K "$4" \
    --tokens 1,16,4096 --precompile-jobs 12 --out "$OUT/configs" >> "$LOG" 2>&1
  say "tune $5: rc=$?"
done
ls "$OUT/configs" | tee -a "$LOG"

# 2. the targets' rows with the tuned configs (no run-time autotuning: the files apply)
export H3MOE_CONFIG_DIR="$OUT/configs" H3MOE_AUTOTUNE=0
B=$(( $(left) * 3 / 5 ))
say "bench (tuned): limit ${B}s"
timeout -k 10 "$B" "$PY" -m bench --cases fwd,fwdbwd --tokens 1,16,4096 --impls h3moe:triton,grouped_mm \
  --budget-s $(( B - 20 )) --out "$OUT/bench_tuned.json" >> "$LOG" 2>&1
say "bench (tuned): rc=$?"
[ -f "$OUT/bench_tuned.json" ] && timeout 60 "$PY" -m bench --compare-latest "$OUT/bench_tuned.json" \
  > "$OUT/compare_tuned.md" 2>&1

# 3. the quantized decode kernel by kernel (gate_up / down / combine GB/s, both 4-bit lookups), then the
#    per-kernel fwd+bwd breakdown with the tuned configs, every candidate timed
Q=$(min 100 $(( $(left) / 2 )))
say "profile (quantized decode): limit ${Q}s"
timeout -k 10 "$Q" "$PY" scripts/profile_experts.py --out "$OUT/quant" --models mixtral,qwen3 --tokens "" \
  --quant nf4,int8 --quant-tokens 1,16 --budget-s $(( Q - 15 )) >> "$LOG" 2>&1
say "profile (quantized decode): rc=$?"
# 4. host cost per decode call against its device time (is an eager decode step waiting on Python?)
HO=$(min 60 $(( $(left) / 3 )))
say "host overhead: limit ${HO}s"
timeout -k 10 "$HO" "$PY" scripts/host_overhead.py --out "$OUT/host" --models qwen3,olmoe,mixtral --tokens 1,16 \
  --calls 200 --budget-s $(( HO - 25 )) >> "$LOG" 2>&1
say "host overhead: rc=$?"
P=$(( $(left) - 5 ))
say "profile: limit ${P}s"
timeout -k 10 "$P" "$PY" scripts/profile_experts.py --out "$OUT" --candidates --tokens 4096 \
  --forms saved,recompute,lowp,atomic \
  --torch-profile mixtral --budget-s $(( P - 40 )) >> "$LOG" 2>&1
say "profile: rc=$?"
say "done in $(( $(date +%s) - START ))s of ${TOTAL}s"
[ -f "$OUT/compare_tuned.md" ] && grep -E "^\(against|^\| (fwd|fwdbwd|decode)" "$OUT/compare_tuned.md" | head -60
[ -f "$OUT/quant/profile_experts.md" ] && cat "$OUT/quant/profile_experts.md"
[ -f "$OUT/host/host_overhead.md" ] && head -60 "$OUT/host/host_overhead.md"
[ -f "$OUT/profile_experts.md" ] && cat "$OUT/profile_experts.md"
