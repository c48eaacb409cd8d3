"""`python -m mclfir_dist.train --config FILE --out RUN_DIR [key=value ...]`

This is what `accelerate launch [--config_file launch/X.yaml] -m mclfir_dist.train ...` runs on
every process; it is the same as `mclfir train`.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .cli import add_train_args, cmd_train
from .errors import USER_ERRORS


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mclfir_dist.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(p)
    args = p.parse_args(argv)
    try:
        return cmd_train(args)
    except USER_ERRORS as e:
        print(f"mclfir train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
