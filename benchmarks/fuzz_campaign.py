"""The fuzz and fault campaign at a chosen budget (the test suite runs a small one).

    python benchmarks/fuzz_campaign.py --budget 2000 --seed 0 [--families models,numerics] [--json out.json]

Prints the verdicts per family (tried / exact / named / silent wrong / unnamed / NaN / mutated /
lost) and one two-line reproducer per failure class. See upcycle_fx/testing/fuzz/.
"""

import sys

from upcycle_fx.testing.fuzz.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
