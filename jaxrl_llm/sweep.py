"""A sweep's comparison: `python -m jaxrl_llm.sweep RUN_DIR [--metric eval/accuracy] [--plot OUT.png]`.

Prints each configuration's final metric (mean and 95% interval over seeds) and every pair's
paired difference, and draws a line per run with a mean and 95% band per configuration.
"""

from __future__ import annotations

import argparse
import os
import sys

from jaxrl_llm import cli
from jaxrl_llm.compare import plot_sweep, report
from jaxrl_llm.metrics import MAIN_CURVES


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run_dir of a sweep (it holds sweep.json)")
    parser.add_argument("--metric", help="the final metric compared (default: eval/accuracy, else eval/reward, ...)")
    parser.add_argument("--plot", help="draw the runs' curves to this PNG (default: RUN_DIR/sweep.png)")
    parser.add_argument("--metrics", help=f"comma-separated curves to draw (default: {','.join(MAIN_CURVES)})")
    args = parser.parse_args(argv)

    def compare():
        print(report(args.run_dir, args.metric))
        names = [name.strip() for name in args.metrics.split(",")] if args.metrics else list(MAIN_CURVES)
        print("plot:", plot_sweep(args.run_dir, args.plot or os.path.join(args.run_dir, "sweep.png"), names))

    return cli.run(compare)


if __name__ == "__main__":
    sys.exit(main())
