#!/usr/bin/env bash
# The whole `cpu` quality benchmark on a 2-core machine, as two single-thread lanes (two 1-thread
# processes train 10-30 % more tokens per second together than one 2-thread process), then RESULTS.md:
#
#   lane A: ptb-word seed 0 (the learning-rate sweeps first, then every model, generation and length
#           generalisation), then seed 2 of the first group of models;
#   lane B: ptb-char seed 0, then ptb-word seed 1 (every model) and seed 2 of the second group, with the
#           learning rates lane A swept (it waits for them).
#
# Every invocation writes its own JSON under benchmarks/results/; `report.py` merges the seeds.
#   bash benchmarks/quality_cpu.sh            (~100 minutes on 2 cores; logs in benchmarks/results/logs)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
RESULTS=benchmarks/results
LOGS=${LOGS:-$RESULTS/logs}
mkdir -p "$LOGS"
rm -f "$RESULTS"/quality_cpu_ptb-*.json "$RESULTS"/quality_cpu_ptb-*.png  # the script rewrites the whole benchmark
SEED0=$RESULTS/quality_cpu_ptb-word_seeds0.json
FIRST=(gpt2-ar sfdlm-uniform "sfdlm-uniform no-ssm")
SECOND=(mdlm-transformer sfdlm-absorbing sedd-absorbing "sfdlm-uniform no-fourier-mlp")
WORD=(benchmarks/quality.py --threads 1 --setting ptb-word)

sweeps_done() {  # lane A's JSON has its first training run once every sweep is done
  [ -f "$SEED0" ] && "$PYTHON" -c 'import json, sys; sys.exit(not json.load(open(sys.argv[1]))["runs"])' "$SEED0"
}

lane_a() {
  "$PYTHON" "${WORD[@]}" --seeds 0
  "$PYTHON" "${WORD[@]}" --seeds 2 --no-extras --lr-from "$SEED0" --models "${FIRST[@]}" \
    --output $RESULTS/quality_cpu_ptb-word_seeds2_part1.json
}

lane_b() {
  "$PYTHON" benchmarks/quality.py --threads 1 --setting ptb-char --seeds 0
  until sweeps_done; do sleep 30; done
  "$PYTHON" "${WORD[@]}" --seeds 1 --no-extras --lr-from "$SEED0"
  "$PYTHON" "${WORD[@]}" --seeds 2 --no-extras --lr-from "$SEED0" --models "${SECOND[@]}" \
    --output $RESULTS/quality_cpu_ptb-word_seeds2_part2.json
}

lane_a > "$LOGS/quality_lane_a.log" 2>&1 &
A=$!
lane_b > "$LOGS/quality_lane_b.log" 2>&1 &
B=$!
wait $A
wait $B
"$PYTHON" benchmarks/quality_plot.py
"$PYTHON" benchmarks/report.py
