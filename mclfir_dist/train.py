"""`python -m mclfir_dist.train --config FILE --out RUN_DIR [key=value ...]`

This is what `accelerate launch [--config_file launch/X.yaml] -m mclfir_dist.train ...` runs on
every process; it is the same as `mclfir train`.
"""
from __future__ import annotations

import argparse
import logging
import os
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


def exit_worker(rc: int) -> None:
    """A worker of a distributed launch leaves with os._exit once its run is over: every result is on disk and
    the process group is gone, and interpreter teardown can only hurt (once, a finished rank aborted there:
    "terminate called without an active exception", SIGABRT, and the other node's agent waited 300 s at
    torchrun's exit barrier)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":
    exit_worker(main())
