#!/usr/bin/env python
"""Train a vlmpress reference CLIP model; same options as ``vlmpress train-reference``.

    python scripts/train_reference.py --name digits
    nohup python scripts/train_reference.py --name caltech101 --no-progress > caltech.log 2>&1 &
"""

import sys

from vlmpress.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-reference", *sys.argv[1:]]))
