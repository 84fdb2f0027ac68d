# Sourced by the quality lane scripts (`quality_long_cpu.sh`, `quality_errorbars_cpu.sh`): the paths they
# share, and one model-and-seed invocation of quality.py that is skipped when its JSON holds the scored run
# (quality.py writes the JSON before training, so the file's existence is not enough).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}
RESULTS=benchmarks/results
LOGS=${LOGS:-$RESULTS/logs}
mkdir -p "$LOGS"

finished() {  # finished JSON MODEL SEED: does JSON hold MODEL's scored run for SEED?
  [[ -e $1 ]] && "$PYTHON" -c 'import json, sys; runs = json.load(open(sys.argv[1])).get("runs", [])
sys.exit(not any(r["name"] == sys.argv[2] and r["seed"] == int(sys.argv[3]) and "test" in r for r in runs))' "$@"
}

run_once() {  # run_once OUTPUT SEED MODEL [QUALITY ARGS...]: quality.py for MODEL and SEED into OUTPUT, unless finished
  local output=$1 seed=$2 model=$3
  shift 3
  if finished "$output" "$model" "$seed"; then echo "skip $model seed $seed (finished in $output)"; return; fi
  echo "$(date -u +%H:%M:%S) start $model seed $seed"
  "$PYTHON" benchmarks/quality.py "$@" --seeds "$seed" --models "$model" --output "$output"
  echo "$(date -u +%H:%M:%S) done $model seed $seed"
}
