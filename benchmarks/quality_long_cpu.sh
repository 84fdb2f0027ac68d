#!/usr/bin/env bash
# The rest of the 4x-token run (`cpu-long`, PTB word, 1,600 steps), as two single-thread lanes on a 2-core
# machine. Seed 0 of GPT-2, MDLM, SFDLM-absorbing and its b = 4 came from `quality_blocks_cpu.sh`; this
# finishes seed 0 and runs seed 1. One invocation per model, each writing its own JSON; a model whose JSON
# holds its finished run is skipped, so a lane stopped at any point is resumed by running it again
# (report.py merges the JSONs).
# SFDLM-uniform is scored with 24 t samples per test block (its estimator's variance per sample is about
# twice the absorbing one's; 8 samples give the absorbing rows ~0.8 %), every other diffusion row with 8.
#
# Planned from the single-thread minutes measured with both lanes busy (cpu-long, training + scoring):
# GPT-2 20, SFDLM-absorbing 11, b4 25, b16 16, MDLM 14, MDLM b4 24, SFDLM-uniform 46 (+5 for the samples).
#   lane A: seed 0 uniform, MDLM b4, SFDLM b16; seed 1 SFDLM b16, b4          ~132 min (took 140)
#   lane B: seed 1 GPT-2, SFDLM-absorbing, MDLM, uniform, MDLM b4             ~120 min (took 127)
# (SFDLM-uniform took 55: 40 training, 14 scoring 24 samples.)
#   bash benchmarks/quality_long_cpu.sh [A|B]   (both lanes without an argument; logs in benchmarks/results/logs)
set -euo pipefail
source "$(dirname "$0")/lanes.sh"
LONG=(--threads 1 --setting ptb-word --preset cpu-long --no-extras
      --lr-from $RESULTS/quality_cpu_ptb-word_seeds0.json $RESULTS/quality_cpu_ptb-word_mdlm.json)

run() {  # run SEED MODEL [ARGS...]: one model, one seed, its own JSON (skipped when already finished)
  run_once "$RESULTS/quality_cpu-long_ptb-word_seeds$1_${2// /-}.json" "$1" "$2" "${LONG[@]}" "${@:3}"
}

lane_a() {
  run 0 sfdlm-uniform --eval-samples 24
  run 0 "mdlm-transformer b4"
  run 0 "sfdlm-absorbing b16"
  run 1 "sfdlm-absorbing b16"
  run 1 "sfdlm-absorbing b4"
}

lane_b() {
  run 1 gpt2-ar
  run 1 sfdlm-absorbing
  run 1 mdlm-transformer
  run 1 sfdlm-uniform --eval-samples 24
  run 1 "mdlm-transformer b4"
}

case "${1:-both}" in
  A) lane_a >> "$LOGS/quality_long_lane_a.log" 2>&1 ;;
  B) lane_b >> "$LOGS/quality_long_lane_b.log" 2>&1 ;;
  *) lane_a >> "$LOGS/quality_long_lane_a.log" 2>&1 & A=$!
     lane_b >> "$LOGS/quality_long_lane_b.log" 2>&1 & B=$!
     wait $A; wait $B
     "$PYTHON" benchmarks/report.py ;;
esac
