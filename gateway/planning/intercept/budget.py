"""The CPU budget of one interception: a deadline the detectors check between units of work.

Every detector is linear in the text, but a constant that is small for one text can still add up over a large
request; the caller (the planner) sets one deadline for everything it does for a request, and the detectors
call :func:`check` between styles, chains and runs. Past the deadline :class:`BudgetExceeded` is raised and the
caller forwards the text unchanged (and counts it).

The clock is the calling thread's CPU time (``time.thread_time``), not the wall clock: on a machine busy with
other processes a wall-clock budget would skip ordinary prompts that merely waited for a core, while what the
budget must bound is the work this request makes the thread do. A deadline is therefore only meaningful in the
thread that made it: call :func:`deadline_in` in the thread that runs the detectors.
"""

from __future__ import annotations

import time

__all__ = ["BudgetExceeded", "check", "deadline_in"]


class BudgetExceeded(Exception):
    """The request's interception budget is spent: leave the rest of its text alone."""


def deadline_in(seconds: float) -> float:
    """The deadline after ``seconds`` more CPU time of the calling thread, on the clock :func:`check` reads."""
    return time.thread_time() + seconds


def check(deadline: float | None) -> None:
    """Raise :class:`BudgetExceeded` when ``deadline`` (from :func:`deadline_in`) has passed."""
    if deadline is not None and time.thread_time() > deadline:
        raise BudgetExceeded
