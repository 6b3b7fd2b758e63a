"""Redraw the curves of one or several runs on one figure: `python -m jaxrl_llm.plot RUN_DIR [RUN_DIR ...]`."""

from __future__ import annotations

import argparse
import os
import sys

from jaxrl_llm import cli
from jaxrl_llm.metrics import MAIN_CURVES, plot_runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="folders holding metrics.jsonl")
    parser.add_argument("-o", "--out", help="output PNG (default: RUN_DIR/metrics.png for one run, "
                                            "comparison.png for several)")
    parser.add_argument("--metrics", help=f"comma-separated metric names (default: {','.join(MAIN_CURVES)})")
    parser.add_argument("--title", help="a title over the panels")
    args = parser.parse_args(argv)
    out = args.out or (os.path.join(args.run_dirs[0], "metrics.png") if len(args.run_dirs) == 1 else "comparison.png")
    names = [name.strip() for name in args.metrics.split(",")] if args.metrics else MAIN_CURVES
    return cli.run(lambda: print(plot_runs(args.run_dirs, out, names, args.title)))


if __name__ == "__main__":
    sys.exit(main())
