"""Test hook: SIGKILL the orchestrator at a named point between two of its durable steps.

``LAG_DS_ORCH_KILL_AT=<point>[,<point>...]`` makes :func:`kill_point` SIGKILL this process when
the orchestrator reaches one of these points (RELIABILITY.md #8: killed anywhere and re-run, the
same command must give the same winner, launch nothing twice and retrain nothing past its last
checkpoint).  The points are the boundaries that last well under a second and that a test could
not hit by watching files from outside:

* ``candidate:<operator name>``: that candidate's grown checkpoint is complete (the others may
  not be);
* ``decided``: ``selection.json`` is written, the promotion has not started;
* ``promoted_init``: the winner's resharded checkpoint is complete, its job has not started.

No job runs at any of these points, so killing this one process is what a node failure would
do there too.  Kills *during* a job (base, race, promotion) are done by the test itself, with
the trainer's ``LAG_DS_HOLD_AT`` hook holding the job at a known step
(:mod:`lag_ds.train.loop`).  SIGKILL, not an exception: nothing may run after it (no
``finally``, no atexit, no flush), exactly as after ``kill -9``.

Separate from ``lag_ds/faults.py`` (the checkpoint write path's fault points) so that each
hook's points and variable stay next to the code they interrupt.
"""

from __future__ import annotations

import os
import signal
import sys

KILL_ENV = "LAG_DS_ORCH_KILL_AT"


def kill_point(name: str) -> None:
    """SIGKILL this process if ``name`` is one of the points in ``LAG_DS_ORCH_KILL_AT``."""
    wanted = {p.strip() for p in os.environ.get(KILL_ENV, "").split(",") if p.strip()}
    if name in wanted:
        print(f"[lag] {KILL_ENV}: SIGKILL at {name}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
