"""One figure per quality setting, every seed's JSON merged: each model's test figure (mean and the
individual seeds; diffusion rows are NELBO upper bounds) against the count-based baselines and the
published anchors. Writes benchmarks/results/quality_<preset>_<setting>[_<study>].png, which `report.py` links.

    python benchmarks/quality_plot.py                  # every (preset, setting) with results
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BASELINE_STYLE = {"unigram (add-one)": ("gray", ":"), "interpolated Kneser-Ney 5-gram": ("tab:green", "--")}


def group_key(data: dict) -> tuple[str, str, str]:
    """The section a quality JSON belongs to: its preset, setting and study (`--study`, "" if none)."""
    return data.get("preset"), data["setting"], data.get("study") or ""


def summary_name(key: tuple[str, str, str]) -> str:
    """The merged figure's file name: quality_<preset>_<setting>[_<study>].png."""
    preset, setting, study = key
    return f"quality_{preset}_{setting}" + (f"_{study}" if study else "") + ".png"


def groups(results: Path) -> dict[tuple[str, str, str], list[dict]]:
    """Quality JSONs by (preset, setting, study)."""
    found: dict[tuple[str, str, str], list[dict]] = {}
    for path in sorted(results.glob("quality_*.json")):
        data = json.loads(path.read_text())
        if data.get("benchmark") == "quality" and "setting" in data:
            found.setdefault(group_key(data), []).append(data)
    return found


def plot(files: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit = files[0]["unit"]
    figure = "perplexity" if unit == "word" else "bits_per_character"
    by_model: dict[str, list[dict]] = {}
    for data in files:
        for run in data.get("runs", []):
            by_model.setdefault(run["name"], []).append(run)
    names = sorted(by_model, key=lambda name: (by_model[name][0]["kind"] != "ar", list(by_model).index(name)))
    fig, ax = plt.subplots(figsize=(11, 0.5 * len(names) + 2.2))
    for row, name in enumerate(names):
        values = [run["test"][figure] for run in by_model[name]]
        bound = by_model[name][0]["kind"] != "ar"
        color = "tab:blue" if name.startswith("sfdlm") or name.startswith("sedd") else "tab:orange"
        ax.barh(row, sum(values) / len(values), color=color, alpha=0.35 if bound else 0.7)
        ax.plot(values, [row] * len(values), "k.", markersize=5)
    baselines = next((data["baselines"] for data in files if data.get("baselines")), [])
    for baseline in baselines:
        if baseline["conditioning"] == "test stream" and baseline["name"] in BASELINE_STYLE:
            color, style = BASELINE_STYLE[baseline["name"]]
            ax.axvline(baseline[figure], color=color, linestyle=style, label=f"{baseline['name']}: {baseline[figure]:.4g}")
    for label, value in (files[0].get("anchors") or {}).items():
        ax.axvline(value, color="tab:red", linestyle="-.", linewidth=0.8, label=f"published {label}: {value:g}")
    ax.set_yticks(range(len(names)), [f"{n} ({'bound' if by_model[n][0]['kind'] != 'ar' else 'exact'})" for n in names],
                  fontsize=8)
    ax.invert_yaxis()
    if unit == "word":
        ax.set_xscale("log")
    seeds = sorted({run["seed"] for runs in by_model.values() for run in runs})
    ax.set_xlabel(("test perplexity per word" if unit == "word" else "test bits per character")
                  + f" (bars: mean, dots: seeds {seeds}; lower is better)")
    settings = files[0].get("settings", {})
    study = f", study {files[0]['study']}" if files[0].get("study") else ""
    ax.set_title(f"{files[0]['setting']}, preset {files[0]['preset']}{study}: {settings.get('steps')} steps x "
                 f"{settings.get('batch_size')} x {settings.get('block_size')} tokens per model", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(axis="x", alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    for key, files in groups(args.results).items():
        if any(data.get("runs") for data in files):
            path = args.results / summary_name(key)
            plot(files, path)
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
