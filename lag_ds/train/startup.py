"""Where a job's start-up time goes: wall-clock marks from process start to the first step.

Why: a LAG candidate trains only k steps, so its start-up (Python imports, DeepSpeed init, data
preparation, checkpoint load, the LAG@0 validation) can cost more than its training. Rank 0
writes ``RUN_DIR/startup.json`` after the LAG@0 validation and again once the first step is done
(``first_step`` is then the last mark), one entry per phase, so that
``benchmarks/job_startup.py`` (and a user wondering why a candidate is slow to start) can see
which phase to blame. Times are wall-clock epochs (``time.time()``), so they can be compared with
the launcher's journal, which records when the launch was made.

Example ``startup.json``::

    {"process_start": 1796216892.1, "marks": [["imports", 6.2], ["distributed", 6.9], ...],
     "first_step": 14.8}

(seconds since ``process_start``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

FILE_NAME = "startup.json"


def process_start_time(pid: int | str = "self") -> float:
    """Epoch seconds at which the process started (``/proc``; now, where /proc is missing)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 of stat(5), counted after the command name
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


class StartupClock:
    """Marks phases; :meth:`write` saves them once (rank 0 only, after the first step)."""

    def __init__(self, *, enabled: bool = True) -> None:
        self.start = process_start_time()
        self.marks: list[tuple[str, float]] = []
        self.enabled = enabled
        self.written = False

    def mark(self, phase: str) -> None:
        """Record that ``phase`` has just ended."""
        self.marks.append((phase, round(time.time() - self.start, 3)))

    def write(self, run_dir: Path, *, final: bool = True) -> None:
        """Save the marks so far; ``final=False`` writes them without closing the clock (the
        trainer does so before its first step, so a job that never gets that far -- killed for
        memory, say -- still shows the phases it went through)."""
        if not self.enabled or self.written:
            return
        self.written = final
        data = {"process_start": self.start, "marks": self.marks}
        tmp = Path(run_dir) / f".{FILE_NAME}.tmp"
        tmp.write_text(json.dumps(data) + "\n")
        tmp.replace(Path(run_dir) / FILE_NAME)
