#!/usr/bin/env bash
# Block diffusion against full canvas on PTB word (the `cpu` preset, 3 seeds), then the 4x-token run
# (`cpu-long`), as two single-thread lanes on a 2-core machine. Every model of the block study is re-run
# here with one code version (its own report section, `--study blocks`), at the learning rates of the
# committed `cpu` sweep (a block model takes its full-canvas model's), with 8 t samples per test block.
#
#   lane A: seed 0 (with generation and length generalisation), then seed 2 of the first three models,
#           then cpu-long seed 0 of SFDLM-absorbing full canvas, b = 4, b = 16;
#   lane B: seed 1, then seed 2 of the other three, then cpu-long seed 0 of GPT-2, MDLM full canvas, b = 4.
#
# Single-thread minutes per model with both lanes busy (cpu / cpu-long, training + scoring): GPT-2 5 / 20,
# SFDLM-absorbing 3 / 10, b4 7 / 21, b16 5 / 16, MDLM 4 / 14, MDLM b4 8 / 24, SFDLM-uniform 14 / 46.
#   bash benchmarks/quality_blocks_cpu.sh [A|B]   (both lanes without an argument; logs in benchmarks/results/logs)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
RESULTS=benchmarks/results
LOGS=${LOGS:-$RESULTS/logs}
mkdir -p "$LOGS"
LR_FROM=($RESULTS/quality_cpu_ptb-word_seeds0.json $RESULTS/quality_cpu_ptb-word_mdlm.json)
FIRST=(gpt2-ar sfdlm-absorbing "sfdlm-absorbing b4")
SECOND=("sfdlm-absorbing b16" mdlm-transformer "mdlm-transformer b4")
STUDY=(benchmarks/quality.py --threads 1 --setting ptb-word --study blocks --eval-samples 8 --lr-from "${LR_FROM[@]}")
LONG=(benchmarks/quality.py --threads 1 --setting ptb-word --preset cpu-long --lr-from "${LR_FROM[@]}" --no-extras)

lane_a() {
  "$PYTHON" "${STUDY[@]}" --seeds 0 --models "${FIRST[@]}" "${SECOND[@]}"
  "$PYTHON" "${STUDY[@]}" --seeds 2 --no-extras --models "${FIRST[@]}" \
    --output $RESULTS/quality_cpu_ptb-word_blocks_seeds2_part1.json
  "$PYTHON" "${LONG[@]}" --seeds 0 --models sfdlm-absorbing "sfdlm-absorbing b4" "sfdlm-absorbing b16" \
    --output $RESULTS/quality_cpu-long_ptb-word_seeds0_part1.json
}

lane_b() {
  "$PYTHON" "${STUDY[@]}" --seeds 1 --no-extras --models "${FIRST[@]}" "${SECOND[@]}"
  "$PYTHON" "${STUDY[@]}" --seeds 2 --no-extras --models "${SECOND[@]}" \
    --output $RESULTS/quality_cpu_ptb-word_blocks_seeds2_part2.json
  "$PYTHON" "${LONG[@]}" --seeds 0 --models gpt2-ar mdlm-transformer "mdlm-transformer b4" \
    --output $RESULTS/quality_cpu-long_ptb-word_seeds0_part2.json
}

case "${1:-both}" in
  A) lane_a > "$LOGS/quality_blocks_lane_a.log" 2>&1 ;;
  B) lane_b > "$LOGS/quality_blocks_lane_b.log" 2>&1 ;;
  *) lane_a > "$LOGS/quality_blocks_lane_a.log" 2>&1 & A=$!
     lane_b > "$LOGS/quality_blocks_lane_b.log" 2>&1 & B=$!
     wait $A; wait $B
     "$PYTHON" benchmarks/report.py ;;
esac
