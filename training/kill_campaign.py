#!/usr/bin/env python
"""Kill campaign: SIGKILL a small training run again and again, resume it each time, compare with an
uninterrupted run.

    python training/kill_campaign.py --kills 25 --seed 14 --work outputs/kill-campaign

Each attempt runs the driver of `tests/test_training.py` (the tiny test model on the synthetic corpus,
`resume=True`, short sleeps that widen the windows a kill can land in without changing any number) and
kills it: at a random moment once it trains, in the middle of a checkpoint write, of a `best/` save or — the
last `--final-kills` attempts — of the final save. Then it runs to the end, an uninterrupted reference run
is made, and `<work>/result.json` reports the kills by kind, the resumes, whether the final weights (model,
EMA, best) and every logged value are bit-identical, and any leftover temporary folder.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from hf_sfdlm.tracking import read_metrics  # noqa: E402
from test_training import DRIVER, _subprocess_env, make_config  # noqa: E402

AIMED = {  # what must exist in the output folder for the kill to land inside that operation
    "checkpoint-write": lambda out: any((out / "checkpoints").glob(".tmp-step-*")),
    "best-save": lambda out: any(out.glob(".tmp-save-best-*")),
    "final-save": lambda out: any(out.glob(".tmp-save-model-*")),
}


def write_config(work: Path, name: str, steps: int) -> Path:
    config = make_config(work / name, max_steps=steps, checkpoint_every=5, keep_checkpoints=2, eval_every=10)
    path = work / f"{name}.json"
    path.write_text(json.dumps(config.to_dict()))
    return path


def launch(config: Path, log: Path, pause: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(config), str(pause)],
                            env=dict(_subprocess_env(), PYTHONUNBUFFERED="1"), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)


def kill_once(process: subprocess.Popen, out: Path, kind: str, rng: random.Random) -> bool:
    """Kill `process` at the moment `kind` asks for; False if it finished first."""
    metrics = out / "logs" / "metrics.jsonl"
    size = metrics.stat().st_size if metrics.exists() else -1
    moment = None
    while process.poll() is None:
        if kind == "random":
            if moment is None and metrics.exists() and metrics.stat().st_size != size:  # it trains
                moment = time.time() + rng.uniform(0.0, 0.8)
            hit = moment is not None and time.time() >= moment
        else:
            hit = AIMED[kind](out)
        if hit:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.003)
    if process.returncode != 0:
        raise SystemExit(f"an attempt failed with exit code {process.returncode}")
    return False


def compare(out: Path, reference: Path, steps: int) -> dict:
    figures = {}
    for name in ("model.safetensors", "best/model.safetensors", f"checkpoints/step-{steps}/model.safetensors",
                 f"checkpoints/step-{steps}/ema.safetensors"):
        a, b = load_file(out / name), load_file(reference / name)
        figures[name] = {"bit_identical": all(torch.equal(a[k], b[k]) for k in b),
                         "max_abs_diff": max(float((a[k] - b[k]).abs().max()) for k in b)}
    ignore = ("time", "train/tokens_per_second")
    records = [[{k: v for k, v in r.items() if k not in ignore} for r in read_metrics(d / "logs" / "metrics.jsonl")]
               for d in (out, reference)]
    figures["metrics_records"] = len(records[0])
    figures["metrics_identical"] = records[0] == records[1]
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=25)
    parser.add_argument("--final-kills", type=int, default=3, help="How many of the kills land in the final save.")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--pause", type=float, default=0.02, help="Seconds slept per step and per state file.")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--work", type=Path, default=Path("outputs/kill-campaign"))
    args = parser.parse_args(argv)
    if args.work.exists() and any(args.work.iterdir()):
        raise SystemExit(f"--work {args.work} is not empty: choose a fresh folder.")
    args.work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    out, config = args.work / "killed", write_config(args.work, "killed", args.steps)
    kinds = dict.fromkeys(["random", *AIMED], 0)
    resumed_with_checkpoint, attempts, started = 0, 0, time.time()
    while True:
        attempts += 1
        if attempts > 1:
            resumed_with_checkpoint += any((out / "checkpoints").glob("step-*"))
        process = launch(config, args.work / f"attempt-{attempts:02d}.log", args.pause)
        kills = sum(kinds.values())
        if kills >= args.kills:
            if process.wait() != 0:
                raise SystemExit("the last attempt failed: see its log")
            break
        if kills >= args.kills - args.final_kills:
            kind = "final-save"
        else:
            kind = rng.choice(["random"] * 6 + ["checkpoint-write"] * 2 + ["best-save"])
        if not kill_once(process, out, kind, rng):
            break  # finished before the aimed moment
        kinds[kind] += 1
    seconds = time.time() - started

    reference = launch(write_config(args.work, "reference", args.steps), args.work / "reference.log", args.pause)
    if reference.wait() != 0:
        raise SystemExit("the reference run failed: see reference.log")
    result = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
              "kills": sum(kinds.values()), "kills_by_kind": kinds, "attempts": attempts,
              "resumes": attempts - 1, "resumes_from_a_checkpoint": resumed_with_checkpoint,
              "campaign_seconds": round(seconds), **compare(out, args.work / "reference", args.steps),
              "leftover_temporary_folders": [str(p) for p in args.work.rglob(".tmp*")]}
    (args.work / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
