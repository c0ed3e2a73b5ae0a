"""`python -m upcycle_fx.testing.fuzz --budget 2000 --seed 0`: run the campaign, print the table
and one reproducer per failure class; exit status 1 if anything failed."""

from __future__ import annotations

import argparse
import json
import sys

from .report import render
from .runner import FAMILIES, run_campaign


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m upcycle_fx.testing.fuzz", description=__doc__)
    parser.add_argument("--budget", type=int, default=300, help="trials in all (split over families)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--families", default=",".join(f.name for f in FAMILIES),
                        help="comma-separated subset of: " + ", ".join(f.name for f in FAMILIES))
    parser.add_argument("--json", help="also write every trial (verdict, detail, reproducer) here")
    parser.add_argument("--quiet", action="store_true", help="no per-trial progress dots")
    args = parser.parse_args(argv)

    def dot(trial) -> None:
        print("." if not trial.outcome.category.is_failure else "F", end="", flush=True, file=sys.stderr)

    campaign = run_campaign(args.budget, args.seed, tuple(args.families.split(",")),
                            progress=None if args.quiet else dot)
    if not args.quiet:
        print(file=sys.stderr)
    print(render(campaign))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([{"family": t.family, "kind": t.extra["kind"], "category": t.outcome.category.value,
                        "detail": t.outcome.detail, "reproducer": t.reproducer} for t in campaign.trials],
                      handle, indent=1)
    return 1 if campaign.failures() else 0


if __name__ == "__main__":
    sys.exit(main())
