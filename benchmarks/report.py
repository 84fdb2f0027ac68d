"""Collect every benchmark JSON under benchmarks/results/ into benchmarks/RESULTS.md.

    python benchmarks/report.py            # rewrite benchmarks/RESULTS.md
    python benchmarks/report.py --check    # exit 1 if RESULTS.md is out of date

Each JSON file becomes a section headed by the command that made it (its `command` field) and the
machine it ran on. The quality benchmark (`benchmarks/quality.py`) gets dedicated tables (test
perplexities with standard errors and ratios to the AR baseline, ablations, generation quality,
infilling); every other benchmark (speed, scaling, throughput, ...) is rendered generically: its
`headline` if it has one, then each list of flat records as a table. A PNG next to a JSON with the
same stem is linked, and a `<stem>.notes.md` (a person's reading of that run) is appended.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OUTPUT = HERE / "RESULTS.md"
MAX_COLUMNS = 12
MAX_ROWS = 60


def fmt(value) -> str:
    """Numbers to 4 significant figures (integers with thousands separators); the rest as text."""
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell if isinstance(cell, str) else fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line(data: dict) -> str:
    machine, versions = data.get("machine"), data.get("versions")
    if machine is not None and not isinstance(machine, dict):
        return f"Machine: {fmt(machine)}"
    machine = dict(machine or {})
    if isinstance(versions, dict):
        machine.update(versions)
    keys = ("cpu_count", "torch_threads", "gpu", "cuda", "load_average_at_start", "load_average_1min", "torch",
            "transformers")
    parts = [f"{k}={fmt(machine[k]) if not isinstance(machine[k], list) else [round(x, 2) for x in machine[k]]}"
             for k in keys if machine.get(k) is not None]
    return "Machine: " + (", ".join(parts) if parts else "not recorded")


def heading(path: Path, data: dict) -> list[str]:
    command = data.get("command")
    lines = [f"## {data.get('benchmark', path.stem)} (`results/{path.name}`)", ""]
    lines.append(f"Command: `{command}`" if command else "Command: not recorded in the JSON")
    lines += ["", machine_line(data)]
    seconds = data.get("total_seconds") or data.get("wall_seconds")
    if isinstance(seconds, (int, float)):
        lines[-1] += f"; wall time {seconds / 60:.1f} min"
    return lines + [""]


# ---------------------------------------------------------------------------------------------- quality
def with_err(test: dict, name: str) -> str:
    value, err = test[name], test.get(f"{name}_stderr", 0.0)
    return fmt(value) if not err else f"{fmt(value)} ± {fmt(err)}"


def quality_section(data: dict) -> list[str]:
    settings = data.get("settings", {})
    gpu = (data.get("machine") or {}).get("gpu")
    lines = [f"Device: {gpu or 'CPU only (no GPU was used for this run)'}.", ""]
    lines += [f"Settings: preset `{data.get('preset')}`, tokenizer {data.get('tokenizer')}, "
             f"{settings.get('steps')} steps of {settings.get('batch_size')} x {settings.get('block_size')} tokens, "
             f"width {settings.get('hidden_size')}, lr {settings.get('lr')}, "
             f"{settings.get('eval_samples')} t samples per test block. Diffusion figures are NELBO upper bounds "
             "(± Monte Carlo standard error); AR figures are exact. Token-level perplexity is per GPT-2 BPE "
             "token; word-level is total NLL / (words + one <eos> per line).", ""]
    for dataset, info in data.get("datasets", {}).items():
        runs = [r for r in data["runs"] if r["dataset"] == dataset and "ablation" not in r]
        if not runs:
            continue
        lines += [f"### {dataset}: test perplexity", "",
                  f"Model vocabulary: {info['model_vocabulary']:,} ids (the most frequent training tokens + one "
                  f"'other' id spread uniformly over the rest; covers {info['train_token_coverage']:.1%} of training "
                  f"tokens); {info['train_tokens']:,} training tokens available; test: {info['test_subset']} "
                  f"({info['test_words']:,} words).", ""]
        lines.append(_perplexity_table(runs))
        lines.append("")
        ablations = [r for r in data["runs"] if r["dataset"] == dataset
                     and ("ablation" in r or r["name"] == "sfdlm-uniform")]
        if len(ablations) > 1:
            lines += [f"### {dataset}: ablations of sfdlm-uniform (same budget)", "", _perplexity_table(ablations), ""]
    generation = data.get("generation", [])
    if generation:
        lines += ["### Generation quality (unconditional, sampled in float64, judged by the trained gpt2-ar)", "",
                  table(["model", "sampler", "steps", "gen. ppl (judge)", "unigram entropy", "distinct-2",
                         "distinct-3", "seconds"],
                        [[g["model"], g["sampler"], g["steps"], g["gen_ppl"], g["unigram_entropy"], g["distinct_2"],
                          g["distinct_3"], g.get("seconds")] for g in generation]), "",
                  "Natural text scores a unigram entropy of about 5.6 nats over ~1000 tokens; these samples are "
                  f"{settings.get('block_size')} tokens long, so their entropy is bounded by "
                  f"log({settings.get('block_size')}) = {math.log(settings.get('block_size', 1)):.2f}. "
                  "The AR row is the judge scoring its own samples (a reference, not a fair comparison).", ""]
    infilling = data.get("infilling", [])
    if infilling:
        lines += ["### Infilling (a span in the middle of held-out test blocks, greedy fill)", "",
                  table(["model", "conditioning", "rows", "span tokens", "exact match", "token accuracy",
                         "span NLL (nats/token)"],
                        [[r["model"], r["conditioning"], r["rows"], r["span_tokens"], r["exact_match"],
                          r["token_accuracy"], r["span_nll_per_token"]] for r in infilling]), ""]
    return lines


def _perplexity_table(runs: list[dict]) -> str:
    reference = next((r for r in runs if r["kind"] == "ar"), None)
    header = ["model", "params", "non-emb. params", "tokens seen", "train s", "token ppl", "word ppl", "bits/byte"]
    if reference:
        header.append("word ppl / AR")
    rows = []
    for run in runs:
        test = run["test"]
        row = [run["name"], run["parameters"], run["non_embedding_parameters"], run["tokens_seen"],
               run["train_seconds"], with_err(test, "token_perplexity"), with_err(test, "word_perplexity"),
               with_err(test, "bits_per_byte")]
        if reference:
            row.append(f"{test['word_perplexity'] / reference['test']['word_perplexity']:.3g}x")
        rows.append(row)
    return table(header, rows)


# ---------------------------------------------------------------------------------------------- generic
def _flat(record: dict) -> dict:
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            for inner, item in value.items():
                if not isinstance(item, (dict, list)):
                    flat[f"{key}.{inner}"] = item
        elif not isinstance(value, list):
            flat[key] = value
    return flat


def generic_section(data: dict) -> list[str]:
    lines = []
    headline = data.get("headline")
    if isinstance(headline, dict):
        lines += [f"- {key}: {fmt(value)}" for key, value in headline.items()] + [""]
    elif isinstance(headline, (str, list)):
        lines += [f"- {item}" for item in ([headline] if isinstance(headline, str) else headline)] + [""]
    for key, value in data.items():
        if key in ("machine", "versions", "config", "settings") or not isinstance(value, list):
            continue
        records = [_flat(v) for v in value if isinstance(v, dict)]
        if not records:
            continue
        columns = []
        for record in records:
            columns += [c for c in record if c not in columns]
        columns = columns[:MAX_COLUMNS]
        lines += [f"**{key}**", "", table(columns, [[r.get(c) for c in columns] for r in records[:MAX_ROWS]])]
        if len(records) > MAX_ROWS:
            lines.append(f"\n({len(records) - MAX_ROWS} more rows in the JSON)")
        lines.append("")
    return lines


def render(results: Path = RESULTS) -> str:
    lines = ["# Benchmark results", "",
             "Generated by `python benchmarks/report.py` from the JSON files in `benchmarks/results/`; do not edit "
             "by hand. Each section names the command that produced it. The machines are shared and noisy: "
             "compare within a section (one run, side by side), not across sections.", ""]
    paths = sorted(results.glob("*.json"))
    if not paths:
        lines.append("No benchmark results yet.")
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError) as error:
            lines += [f"## {path.name}", "", f"Unreadable: {error}", ""]
            continue
        if not isinstance(data, dict):
            continue
        lines += heading(path, data)
        lines += quality_section(data) if data.get("benchmark") == "quality" else generic_section(data)
        png = path.with_suffix(".png")
        if png.exists():
            lines += [f"![{path.stem}](results/{png.name})", ""]
        notes = path.with_suffix(".notes.md")
        if notes.exists():  # a person's reading of that run, kept next to its data
            lines += [notes.read_text().strip(), ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--check", action="store_true", help="fail if the output is not up to date")
    args = parser.parse_args(argv)
    text = render(args.results)
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is out of date: run python benchmarks/report.py", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text)
    print(f"wrote {args.output} from {len(list(args.results.glob('*.json')))} JSON files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
