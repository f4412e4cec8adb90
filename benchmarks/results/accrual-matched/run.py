"""How results.* here were made: `arkfed benchmark accrual`'s default budget on the demo, restricted
to the arms of "is Ark better than one big site at the same cost?" (Ark on the three sources,
each source alone at Ark's cost, demo-nih alone for E epochs; random init comes with every seed),
3 seeds, through the command's own runner. Run from the repository root:

    OMP_NUM_THREADS=1 python benchmarks/results/accrual-matched/run.py runs/accrual-matched
"""

import sys
import time
from dataclasses import asdict
from pathlib import Path

from arkfed.benchmarking.accrual import DEMO_HELD_OUT, Plan, benchmark_sites, cache_images, environment, run_benchmark
from arkfed.benchmarking.budget import BUDGETS
from arkfed.benchmarking.report import write_outputs

budget = BUDGETS["default"]
out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/accrual-matched")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


sites = cache_images(benchmark_sites(None, budget, out), budget.img_size, log)
plan = Plan(list(sites), DEMO_HELD_OUT, budget)
sources = tuple(plan.sources)
plan.jobs = [("ark", sources), ("ark", ("demo-nih",))] + [("matched", (s,)) for s in sources]
results = run_benchmark(plan, sites, out, log)
results.update({"budget_name": "default (subset: Ark on sources, matched arms, single demo-nih)", "budget": asdict(budget),
                "environment": environment(budget)})
write_outputs(results, out)
