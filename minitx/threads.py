"""The engine's one thread budget (issue #20).

numba's pool and OpenBLAS's pool each default to every core; run hot at once they oversubscribe
the machine and spin against each other. The engine owns one number of threads and hands it to
whichever pool computes. This module is the only place that sets either pool's size.
"""
from __future__ import annotations

import os

_budget: int | None = None


def available_cores() -> int:
    """Cores this process may use (affinity mask; cgroup quota where one is set)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def configure(threads: int | None = None) -> int:
    """Set the budget (None or 0: every available core) and return it. Commands that compute call
    this once, from their ``--threads`` flag, before any kernel runs."""
    global _budget
    _budget = int(threads) if threads else available_cores()
    return _budget


def budget() -> int:
    """The current budget (configuring the default on first use)."""
    return _budget if _budget is not None else configure(None)
