#!/usr/bin/env bash
# A/B of the bf16 kernel path choice (src/tuili/model/paths.py): the crossover measured on
# this machine against fixed crossovers, engine throughput on the peers workload (prompts
# 100-300 tokens, 128 out, greedy) at 16 and 32 sequences per step, alternating the settings
# so the machine's noise falls on both. Usage: benchmarks/kernel_paths_ab.sh [reps] [fixed...]
# (fixed crossovers, default "8": the rule before measurement on CPUs without AMX).
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${1:-3}
shift || true
FIXED=${*:-8}
PY=.venv/bin/python
OUT=${OUT:-bench-results/kernel_paths_ab.jsonl}
lscpu | grep -E "Model name" | sed 's/  */ /g'
echo "flags: $(grep -o -w -E 'avx2|avx512f|avx512_bf16|avx512_vnni|amx_tile|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')"
$PY -c "from tuili.model.paths import bf16_paths; print('measured:', bf16_paths([(960,576),(576,576),(3072,576),(576,1536)]).describe())"
for rep in $(seq 1 "$REPS"); do
  for seqs in 16 32; do
    for setting in measured $FIXED; do
      if [ "$setting" = measured ]; then unset TUILI_PACKED_MAX_ROWS; else export TUILI_PACKED_MAX_ROWS=$setting; fi
      line=$($PY -m tuili.cli bench throughput --num-prompts "$((2 * seqs))" --max-num-seqs "$seqs" --output "$OUT" 2>/dev/null | tail -1)
      echo "rep $rep seqs $seqs crossover=$setting: $line"
    done
  done
done
unset TUILI_PACKED_MAX_ROWS
