#!/usr/bin/env bash
# The `cpu` table's rows that still carried 2-sample error bars (SFDLM-uniform, its two ablations, SEDD),
# re-run at the `cpu` preset (PTB word, 400 steps, 3 seeds) and scored with the finite-variance estimator:
# 24 t samples per test block for the uniform family (its estimator's variance per sample is about twice
# the absorbing one's), 8 for SEDD. GPT-2 is re-run beside them so each row has its paired ratio within
# this study (and its rows check that training is reproducible: they should equal the `blocks` study's).
#
# One invocation and one JSON per model and seed; a job whose JSON holds its scored run is skipped, so a
# stopped run is resumed by running the script again (report.py merges the JSONs into the `errorbars`
# study section). The two single-thread lanes take jobs from one queue (longest first), so they balance.
# Planned from the `cpu` JSONs' single-thread minutes with both lanes busy: uniform family ~9 training +
# ~13 scoring (32 s per sample over the test set), SEDD ~6 + 2, GPT-2 ~5: about 235 minutes of work,
# ~120 on two lanes.
#   bash benchmarks/quality_errorbars_cpu.sh        (logs in benchmarks/results/logs)
set -euo pipefail
source "$(dirname "$0")/lanes.sh"
CLAIMS=$LOGS/errorbars_claims
QUALITY=(--threads 1 --setting ptb-word --preset cpu --study errorbars --no-extras
         --lr-from $RESULTS/quality_cpu_ptb-word_seeds0.json --models-dir $RESULTS/models)

JOBS=()  # "SEED|MODEL|SAMPLES", longest first
for model in sfdlm-uniform "sfdlm-uniform no-fourier-mlp" "sfdlm-uniform no-ssm"; do
  for seed in 0 1 2; do JOBS+=("$seed|$model|24"); done
done
for seed in 0 1 2; do JOBS+=("$seed|sedd-absorbing|8"); done
for seed in 0 1 2; do JOBS+=("$seed|gpt2-ar|8"); done

lane() {  # take the next unclaimed job (mkdir is atomic) until the queue is empty
  local index seed model samples
  for index in "${!JOBS[@]}"; do
    mkdir "$CLAIMS/$index" 2>/dev/null || continue
    IFS='|' read -r seed model samples <<< "${JOBS[$index]}"
    run_once "$RESULTS/quality_cpu_ptb-word_errorbars_seeds${seed}_${model// /-}.json" "$seed" "$model" \
      "${QUALITY[@]}" --eval-samples "$samples"
  done
}

rm -rf "$CLAIMS" && mkdir -p "$CLAIMS"
lane >> "$LOGS/quality_errorbars_lane_a.log" 2>&1 & A=$!
lane >> "$LOGS/quality_errorbars_lane_b.log" 2>&1 & B=$!
wait $A; wait $B
"$PYTHON" benchmarks/report.py
