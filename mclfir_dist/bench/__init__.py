"""Benchmarks: each prints measured numbers and ratios against a baseline; none asserts a time."""
from __future__ import annotations

import sys
from typing import Callable


def run_main(main: Callable) -> None:
    """A bench's command line: a wrong key or shard folder is one line and exit 2, not a traceback."""
    from ..errors import USER_ERRORS
    try:
        main()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:   # Ctrl-C mid-bench: nothing to save, no traceback
        print("stopped: no results written", file=sys.stderr)
        sys.exit(130)
