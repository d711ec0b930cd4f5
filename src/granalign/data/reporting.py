"""Progress and summary lines of the slow loaders: logged, or printed when nobody listens."""

from __future__ import annotations

import logging
import sys
from typing import Any


def report(logger: logging.Logger, message: str, *args: Any) -> None:
    """Log at INFO; print to stderr when INFO is not enabled (progress of a minutes-long first call)."""
    if logger.isEnabledFor(logging.INFO):
        logger.info(message, *args)
    else:
        print(message % args, file=sys.stderr, flush=True)
