"""Does joining pay?  A wrapper: ``python benchmarks/accrual.py ARGS`` is ``arkfed benchmark accrual ARGS``.

The benchmark lives in :mod:`arkfed.benchmarking.accrual` (protocol, budgets, measured results in
the README section "Does joining pay?"), so that an installed arkfed runs it on a user's sites.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if __name__ == "__main__":
    from arkfed.cli import main

    sys.argv = ["arkfed", "benchmark", "accrual", *sys.argv[1:]]
    main()
