"""Peak memory of the data pipeline on a file holding one very long line (issue 13: 50 MB needed 7.6 GB).

For each size, a fresh process (so `ru_maxrss` is that run's peak) runs the real pipeline on a one-line text file
of random words: `load_text_dataset`, then either tokenising + packing with the GPT-2 tokenizer (`tokenize`) or
training the byte-level BPE on the data first (`all`). The process's RSS right after the imports and after loading
is recorded too, so the pipeline's own share can be read off. `--pythonpath` runs another checkout's `hf_sfdlm`
(e.g. the code before the change) for a side-by-side figure.

    python benchmarks/long_line_memory.py --sizes-mb 5 50 --stages tokenize all
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402

GPT2 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "gpt2-tokenizer"

CHILD = r"""
import json, os, resource, sys, tempfile, time
if os.environ.get("SFDLM_CHECKOUT"):  # import that checkout's hf_sfdlm, not the editable install's
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path.insert(0, os.environ["SFDLM_CHECKOUT"])
def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
from transformers import AutoTokenizer
from hf_sfdlm.data import DataConfig, load_text_dataset, load_tokenizer, prepare_tokenizer, tokenize_dataset
import hf_sfdlm
path, stage, gpt2 = sys.argv[1:4]
out = {"hf_sfdlm": hf_sfdlm.__file__, "after_imports_mb": rss_mb()}
start = time.perf_counter()
config = DataConfig(dataset=path, block_size=64, cache_dir=tempfile.mkdtemp())
raw = load_text_dataset(config)["train"]
out["after_load_mb"] = rss_mb()
if stage == "all":
    tokenizer = load_tokenizer(None, config, raw_train=raw, vocab_size=300)
else:
    tokenizer = AutoTokenizer.from_pretrained(gpt2)
    prepare_tokenizer(tokenizer)
out["blocks"] = len(tokenize_dataset(raw, tokenizer, config))
out["seconds"] = round(time.perf_counter() - start, 1)
out["peak_mb"] = rss_mb()
print(json.dumps(out))
"""


def write_line(path: Path, megabytes: float, seed: int = 0) -> None:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]
    rng = random.Random(seed)
    parts, size = [], 0
    while size < megabytes * 1_000_000:
        word = rng.choice(words)
        parts.append(word)
        size += len(word) + 1
    path.write_text(" ".join(parts) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[5, 50])
    parser.add_argument("--stages", nargs="+", default=["tokenize", "all"], choices=["tokenize", "all"])
    parser.add_argument("--pythonpath", default=None, help="import hf_sfdlm from this checkout instead")
    parser.add_argument("--name", default="long_line_memory")
    args = parser.parse_args(argv)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if args.pythonpath:
        env["SFDLM_CHECKOUT"] = str(Path(args.pythonpath).resolve())
    runs = []
    with tempfile.TemporaryDirectory() as directory:
        for megabytes in args.sizes_mb:
            path = Path(directory) / f"line{megabytes:g}mb.txt"
            write_line(path, megabytes)
            for stage in args.stages:
                result = subprocess.run([sys.executable, "-c", CHILD, str(path), stage, str(GPT2.resolve())],
                                        env=env, capture_output=True, text=True)
                lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
                record = {"line_mb": megabytes, "stage": stage, "returncode": result.returncode}
                record.update(json.loads(lines[-1]) if lines else {"error": result.stderr[-800:]})
                print(json.dumps(record))
                runs.append(record)
    command = "python benchmarks/long_line_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(write_json(args.name, {"command": command, "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
