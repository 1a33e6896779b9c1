"""Jobs that report on the work horse that runs them (for the worker-process tests)."""

from __future__ import annotations

import sys


def modules_already_loaded(names: list[str]) -> dict[str, bool]:
    """Which of ``names`` the horse had before RQ imported this module: it imports only
    ``sys``, so any of them present came from the worker process it was forked from."""
    return {name: name in sys.modules for name in names}
