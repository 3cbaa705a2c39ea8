#!/usr/bin/env python
"""Run a benchmark suite (YAML in eval/suites/ or configs/suites/) and write its Table-2 report.

    python scripts/run_suite.py eval/suites/caltech101-grid.yaml --data-root DIR [--out DIR] [--device cpu]

Relative paths in a suite file resolve from the file's directory (data_root) or from the data root
/ $VLMPRESS_DATA (split_file), never from the current directory. Data is checked before the model
is loaded or trained.
"""

import argparse
import logging
import sys

from vlmpress.errors import VlmpressError
from vlmpress.evaluation.suite import SuiteConfig, run_suite


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite")
    p.add_argument("--out")
    p.add_argument("--device")
    p.add_argument("--data-root")
    p.add_argument("--limit", type=int, help="stratified subset of each test set (smoke runs)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = SuiteConfig.from_yaml(args.suite, out=args.out, device=args.device, data_root=args.data_root, limit=args.limit)
        result = run_suite(cfg)
    except VlmpressError as err:  # bad suite file or missing data: one line, exit 2
        print(f"run_suite: error: {err}", file=sys.stderr)
        return 2
    print(result.table_markdown)
    print(f"\n{len(result.records)} evaluations in {result.seconds:.0f} s; files: {result.files}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
