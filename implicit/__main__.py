"""``python -m implicit``: the demo (``demo``) and the plugin listing (``solvers``)."""

from __future__ import annotations

import os
import sys

from ._cli import main

__all__ = ["main"]

if __name__ == "__main__":
    try:
        status = main()
        sys.stdout.flush()
    except BrokenPipeError:  # output piped into a command that stopped reading (`| head`)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        status = 1
    sys.exit(status)
