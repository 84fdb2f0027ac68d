"""Collect every benchmark JSON under benchmarks/results/ into benchmarks/RESULTS.md.

    python benchmarks/report.py            # rewrite benchmarks/RESULTS.md
    python benchmarks/report.py --check    # exit 1 if RESULTS.md is out of date

Each JSON file becomes a section headed by the command that made it (its `command` field) and the
machine it ran on. The quality benchmark (`benchmarks/quality.py`) gets dedicated tables, one section per
setting with every seed's JSON merged (mean ± standard deviation over seeds, Monte Carlo error, n-gram
baselines and published anchors, ratios to the AR model: of the means and per seed (mean ± std), the
learning-rate sweep with each candidate's error and whether the choice is resolved, length generalisation,
generation); every other benchmark (speed, scaling, throughput, ...) is rendered generically: its
`headline` if it has one, then each list of flat records as a table. A PNG next to a JSON with the
same stem is linked, and a `<stem>.notes.md` (a person's reading of that run) is appended.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_plot import group_key, summary_name  # noqa: E402

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
def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return fmt(values[0])
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{fmt(mean)} ± {fmt(std)}"


def _paired_ratios(model_runs: list[dict], reference_runs: list[dict], figure: str) -> str:
    """Each seed's figure over the AR model's of the same seed, mean ± std over the seeds that have both
    (seeds fix the data order and move every row together, so the paired ratio is the stabler figure)."""
    reference = {r["seed"]: r["test"][figure] for r in reference_runs}
    ratios = [r["test"][figure] / reference[r["seed"]] for r in model_runs if r["seed"] in reference]
    if not ratios:
        return ""
    pairs = f" ({len(ratios)} of {len(model_runs)} seeds)" if len(ratios) < len(model_runs) else ""
    return _mean_std(ratios) + "x" + pairs


def _sweep_cell(sweep: dict, lr: str) -> str:
    value = sweep["lrs"].get(lr)
    if value is None:
        return ""
    error = (sweep.get("stderr") or {}).get(lr)
    text = fmt(value) + (f" ± {fmt(error)}" if error else "")
    return f"**{text}**" if float(lr) == sweep["best_lr"] else text


def _sweep_verdict(sweep: dict) -> str:
    """Whether the winner's lead over the runner-up exceeds 2 standard errors (older JSONs did not record it)."""
    if "resolved" not in sweep:
        return "not recorded"
    leads = sweep.get("lead_of_best") or {}
    closest = min(leads.values(), key=lambda lead: lead["nats_per_token"], default=None)
    lead = f" (lead {fmt(closest['nats_per_token'])} ± {fmt(closest['stderr'])})" if closest else ""
    return ("resolved" if sweep["resolved"] else "**unresolved**") + lead


def _eval_samples(files: list[dict]) -> str:
    """The t samples per test block of the diffusion rows: one count, or each count with its models (an
    invocation may score a model family with more samples, `--eval-samples`)."""
    models: dict[int, list[str]] = {}
    for data in files:
        for run in data.get("runs", []):
            names = models.setdefault(data.get("settings", {}).get("eval_samples"), [])
            if run["kind"] != "ar" and run["name"] not in names:
                names.append(run["name"])
    counts = {count: names for count, names in models.items() if names}
    if len(counts) <= 1:
        return f"{next(iter(counts), files[0].get('settings', {}).get('eval_samples'))} t samples per test block"
    return "t samples per test block: " + "; ".join(f"{count} ({', '.join(names)})" for count, names in sorted(counts.items()))


def quality_section(files: list[dict]) -> list[str]:
    """One section for every quality JSON of a (preset, setting): seeds merged, mean ± std over seeds."""
    first = files[0]
    unit, settings = first["unit"], first.get("settings", {})
    figure = "perplexity" if unit == "word" else "bits_per_character"
    label = "test perplexity per word" if unit == "word" else "test bits per character"
    runs = [run for data in files for run in data.get("runs", [])]
    by_model: dict[str, list[dict]] = {}
    for run in runs:
        by_model.setdefault(run["name"], []).append(run)
    reference = [r["test"][figure] for r in by_model.get("gpt2-ar", [])]
    gpu = (first.get("machine") or {}).get("gpu")
    lines = [f"Device: {gpu or 'CPU only'}. Vocabulary {first['data']['vocabulary']:,} symbols (closed); "
             f"{first['data']['train']:,} training / {first['data']['test']:,} test tokens. Every model: "
             f"{settings.get('steps')} steps of {settings.get('batch_size')} x {settings.get('block_size')} tokens, "
             f"width {settings.get('hidden_size')}, its best learning rate of {settings.get('lrs')} "
             f"({settings.get('sweep_steps')}-step sweep on validation, seed 0), {_eval_samples(files)}. "
             "Diffusion rows are NELBO **upper bounds** (MC = Monte Carlo standard "
             "error of one seed's estimate, from independent replicates where recorded); AR and n-gram rows "
             "are exact. ± after the figure: standard deviation over seeds. \"vs AR\": ratio of the means; "
             "\"vs AR per seed\": each seed's figure over gpt2-ar's of the same seed, mean ± std over seeds.", ""]
    rows = []
    for name, model_runs in by_model.items():
        values = [r["test"][figure] for r in model_runs]
        mc = sum(r["test"].get(f"{figure}_stderr", 0.0) for r in model_runs) / len(model_runs)
        ratio = (f"{(sum(values) / len(values)) / (sum(reference) / len(reference)):.3g}x" if reference else "")
        rows.append([name, "bound" if model_runs[0]["kind"] != "ar" else "exact", len(model_runs), _mean_std(values),
                     fmt(mc) if mc else "", model_runs[0]["parameters"], model_runs[0]["tokens_seen"],
                     f"{model_runs[0]['lr']:g}", _mean_std([r["train_seconds"] for r in model_runs]),
                     _mean_std([r["tokens_per_second"] for r in model_runs]), ratio,
                     _paired_ratios(model_runs, by_model.get("gpt2-ar", []), figure)])
    for data in files:
        for row in data.get("baselines", []):
            rows.append([f"{row['name']} ({row['conditioning']})", "exact", "", fmt(row[figure]), "", "", "", "", "",
                         "", "", ""])
        for name, value in (data.get("anchors") or {}).items():
            rows.append([f"published: {name}", "exact", "", fmt(value), "", "", "", "", "", "", "", ""])
        if data.get("baselines"):
            break  # the count-based rows and anchors once
    lines += [f"### {first['setting']}: {label}", "",
              table(["model", "estimate", "seeds", label, "MC err", "params", "tokens", "lr", "train s", "tokens/s",
                     "vs AR", "vs AR per seed"], rows), ""]
    lines += _block_gap_lines(by_model, figure, label)
    sweeps = {name: sweep for data in files for name, sweep in data.get("sweeps", {}).items()}
    if sweeps:
        lrs = sorted({lr for sweep in sweeps.values() for lr in sweep["lrs"]}, key=float)
        lines += ["Learning-rate sweep (validation nats/token after the sweep steps ± Monte Carlo error where "
                  "recorded; best in bold; resolved: the best leads the runner-up by more than 2 standard errors of "
                  "their paired per-block difference):", "",
                  table(["model"] + [f"lr {lr}" for lr in lrs] + ["choice"],
                        [[name] + [_sweep_cell(s, lr) for lr in lrs] + [_sweep_verdict(s)]
                         for name, s in sweeps.items()]), ""]
    lengths = [(r["name"], r["seed"], g) for r in runs for g in r.get("length_generalisation", [])]
    if lengths:
        factors = sorted({g["factor"] for _, _, g in lengths})
        table_rows = {}
        for name, seed, g in lengths:
            table_rows.setdefault((name, seed), {})[g["factor"]] = g[figure]
        lines += [f"Length generalisation ({label} on test blocks of k x {settings.get('block_size')} tokens; "
                  "GPT-2's position rows beyond the training length are untrained; the Transformer denoiser's "
                  "rotary positions and SFDLM need no table):", "",
                  table(["model", "seed"] + [f"k = {f}" for f in factors],
                        [[name, seed] + [values.get(f) for f in factors] for (name, seed), values in table_rows.items()]),
                  ""]
    generation = [g for data in files for g in data.get("generation", [])]
    if generation:
        lines += ["Generation (unconditional samples, judged by the trained gpt2-ar; the AR row is the judge "
                  "scoring its own samples, a reference):", "",
                  table(["model", "sampler", "steps", "gen. ppl (judge)", "unigram entropy", "distinct-2", "seconds"],
                        [[g["model"], g["sampler"], g["steps"], g["gen_ppl"], g["unigram_entropy"], g["distinct_2"],
                          g.get("seconds")] for g in generation]), ""]
    return lines


def gap_closed(full: float, block: float, ar: float) -> float:
    """The share of the full-canvas model's gap to the AR model that its block model closes (BD3-LM's
    reading: 1 = as good as AR, 0 = no better than full canvas, < 0 = worse)."""
    return (full - block) / (full - ar)


def _block_gap_lines(by_model: dict[str, list[dict]], figure: str, label: str) -> list[str]:
    """Block models ("<model> b<size>") against their full-canvas model and gpt2-ar, paired per seed."""
    ar = {r["seed"]: r["test"][figure] for r in by_model.get("gpt2-ar", [])}
    rows = []
    for name, runs in by_model.items():
        base = name.rsplit(" b", 1)[0]
        if base == name or base not in by_model or not name.rsplit(" b", 1)[1].isdigit():
            continue
        full = {r["seed"]: r["test"][figure] for r in by_model[base]}
        seeds = sorted(r["seed"] for r in runs if r["seed"] in full and r["seed"] in ar)
        block = {r["seed"]: r["test"][figure] for r in runs}
        if seeds:
            rows.append([name, base, len(seeds), _mean_std([block[s] / full[s] for s in seeds]) + "x",
                         _mean_std([100 * gap_closed(full[s], block[s], ar[s]) for s in seeds]) + " %"])
    if not rows:
        return []
    return [f"Block diffusion against full canvas ({label}, paired per seed, mean ± std over seeds): the block "
            "model over its full-canvas model, and the share of the full-canvas model's gap to gpt2-ar that it "
            "closes, (full − block) / (full − AR):", "",
            table(["block model", "full-canvas model", "seeds", "block / full", "gap to AR closed"], rows), ""]


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
             "by hand. Each section names the command(s) that produced it. The machines are shared and noisy: "
             "compare within a section (one run, side by side), not across sections.", ""]
    paths = sorted(results.glob("*.json"))
    if not paths:
        lines.append("No benchmark results yet.")
    quality: dict[tuple, list[tuple[Path, dict]]] = {}
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError) as error:
            lines += [f"## {path.name}", "", f"Unreadable: {error}", ""]
            continue
        if not isinstance(data, dict):
            continue
        if data.get("benchmark") == "quality" and "setting" in data:  # seeds of one setting merge into one section
            quality.setdefault(group_key(data), []).append((path, data))
            continue
        lines += heading(path, data) + generic_section(data) + _attachments(path)
    for key, group in sorted(quality.items(), key=lambda item: str(item[0])):
        preset, setting, study = key
        names = ", ".join(f"`results/{path.name}`" for path, _ in group)
        lines += [f"## quality: {setting}, preset {preset}" + (f", study {study}" if study else "") + f" ({names})", ""]
        lines += [f"Command: `{data.get('command')}`" for _, data in group] + ["", machine_line(group[0][1]), ""]
        lines += quality_section([data for _, data in group])
        summary = results / summary_name(key)  # benchmarks/quality_plot.py, every seed merged
        if summary.exists():
            lines += [f"![quality {setting}](results/{summary.name})", ""]
        for path, _ in group:
            lines += _attachments(path)
    return "\n".join(lines).rstrip() + "\n"


def _attachments(path: Path) -> list[str]:
    """The plot next to a JSON (same stem) and a person's reading of that run (`<stem>.notes.md`)."""
    lines = []
    png = path.with_suffix(".png")
    if png.exists():
        lines += [f"![{path.stem}](results/{png.name})", ""]
    notes = path.with_suffix(".notes.md")
    if notes.exists():
        lines += [notes.read_text().strip(), ""]
    return lines


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
