"""Counterfactual for the simulated Mixtral frontier (docs/benchmarks.md, issues 17-18): the hybrid
configurations again with a chunk that does NOT re-read the routed experts its tokens touch
beyond the decode rows' (StepCostModel._experts_beyond_s priced at 0), so the gap it leaves
against the real map is what the re-read costs the best chunk. Not a mode of the engine: a
what-if of the step-cost model only.

    python scripts/sim_moe_reread_counterfactual.py lmsys-like 0.5,1,1.5,2,3,4,6,8 OUT_DIR
    python scripts/sim_moe_reread_counterfactual.py arxiv-like 0.1,0.2,0.3,0.5,0.75,1,1.5,2 OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rapidserve.entrypoints.cli import main
from rapidserve.resources.cost_model import StepCostModel

PROFILE = str(Path(__file__).resolve().parents[1] / "docs/results/2026-11-30-sim/profiles/mixtral-8x7b-h200.json")
CONFIGS = "hybrid-128,hybrid-256,hybrid-512,hybrid-1024,hybrid-2048"


def run(dataset: str, rates: str, out: str) -> int:
    # NOTE: the what-if: a chunk pays its compute only, as a dense model's does
    StepCostModel._experts_beyond_s = lambda self, tokens, more: 0.0  # type: ignore[method-assign]
    return main(["simulate", "--profile", PROFILE, "--configs", CONFIGS, "--request-rates", rates,
                 "--dataset-name", dataset, "--num-prompts", "200", "--seed", "0", "--itl-slos", "1.5x,2x,3x,6x",
                 "--jobs", "1", "--quiet", "--no-plots", "--output-dir", out])


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    sys.exit(run(*sys.argv[1:]))
