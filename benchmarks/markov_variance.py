"""Variance of the NELBO estimators at equal model calls on the Bayes-optimal factorised denoiser of a Markov
chain (the setting of tests/test_estimators.py: 3 states, one 8-token sequence, 4 calls per estimate, 20,000
independent estimates), for both processes and two schedules.

    python benchmarks/markov_variance.py       # ~1 minute
"""

from __future__ import annotations

import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from test_estimators import bayes_denoiser, markov_chain  # noqa: E402

from hf_sfdlm import DiscreteDiffusion, NoiseSchedule  # noqa: E402
from hf_sfdlm.diffusion import monte_carlo_nelbo  # noqa: E402


def main() -> int:
    torch.set_num_threads(1)
    transition, start = markov_chain()
    x0 = torch.tensor([[0, 0, 1, 2, 2, 1, 0, 2]]).expand(20_000, -1)
    scored = torch.ones_like(x0, dtype=torch.bool)
    rows = []
    for process in ("absorbing", "uniform"):
        for schedule in ("loglinear", "cosine"):
            mask = 3 if process == "absorbing" else None
            diffusion = DiscreteDiffusion(3 + (process == "absorbing"), process, NoiseSchedule(schedule), None, mask)
            denoise = bayes_denoiser(diffusion, transition, start, leave_one_out=process == "uniform")
            row = {"process": process, "schedule": schedule}
            for estimator in ("uniform_t", "importance", "masked_count"):
                estimates = monte_carlo_nelbo(diffusion, denoise, x0, scored, 4, torch.Generator().manual_seed(5),
                                              estimator=estimator).mean(-1)
                row[f"{estimator}_variance"] = float(estimates.var())
                row[f"{estimator}_mean"] = float(estimates.mean())
            row["uniform_t_over_masked_count"] = row["uniform_t_variance"] / row["masked_count_variance"]
            rows.append(row)
            print(row, flush=True)
    report = {"benchmark": "markov_variance", "command": "python benchmarks/markov_variance.py",
              "notes": "Variance over 20,000 independent 4-call estimates of one sequence's NELBO.", "rows": rows}
    with open(os.path.join(HERE, "results", "markov_variance.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
