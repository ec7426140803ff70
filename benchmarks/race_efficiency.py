#!/usr/bin/env python
"""The race against its ideal: wall time vs candidate-steps x step time / slices.

Why: LAG's cost is the race (every candidate trains k steps). Its ideal wall time on S slices is
``candidate-steps x step time / S``; the difference is start-up (imports, DeepSpeed init,
checkpoint load, the LAG@0 validation), validation passes, checkpoint saves, and slices left
idle. This script reads a finished LAG run (``launch_scripts/ul2_grow.sh``'s OUT_DIR, e.g.
``runs/lag_demo`` after ``make demo``) and prints, as JSON:

* ``race_wall_s``: first candidate launch -> last candidate end (the race journal);
* ``step_s``: median wall time of one training step (between consecutive train records of the
  same candidate, every candidate, steps after the first of each launch);
* ``ideal_s`` and ``ratio`` = race wall / ideal;
* where the rest went, summed over candidates: start-up (launch -> first train step, from
  ``startup.json`` where present), and the idle slice-seconds (slices x wall - busy time).

Slices are free as soon as a candidate ends (the supervisor starts the next candidate then, with
no wave barrier), so idle time is what the last, unpaired candidates leave.

    python benchmarks/race_efficiency.py runs/lag_demo
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def race_report(out: Path) -> dict:
    journal = _records(out / "journal-candidates.jsonl")
    if not journal:
        raise ValueError(f"{out}: no journal-candidates.jsonl (not a LAG run dir, or policy "
                         f"sh/settle, whose rounds this script does not cover)")
    launches = [r for r in journal if r["state"] == "running"]
    ends = [r for r in journal if r["state"] in ("finished", "failed")]
    slices = len({r["include"] for r in launches})
    start, end = min(r["time"] for r in launches), max(r["time"] for r in ends)
    step_times, candidate_steps, busy, startup = [], 0, 0.0, []
    for name in sorted({r["candidate"] for r in launches}):
        run_dir = out / "candidates" / name / "run"
        train = [r for r in _records(run_dir / "metrics.jsonl") if "train/loss" in r]
        first_launch = min(r["time"] for r in launches if r["candidate"] == name)
        last_end = max((r["time"] for r in ends if r["candidate"] == name), default=end)
        busy += last_end - first_launch
        if not train:
            continue
        steps = [r["step"] for r in train]
        candidate_steps += len(set(steps))
        step_times += [b["wall_time"] - a["wall_time"] for a, b in zip(train, train[1:])
                       if b["step"] == a["step"] + 1]
        startup.append(train[0]["wall_time"] - first_launch)
    if not step_times:
        raise ValueError(f"{out}: no consecutive train steps to time (log_interval > 1?)")
    step_s = statistics.median(step_times)
    wall = end - start
    ideal = candidate_steps * step_s / slices
    return {"run_dir": str(out), "candidates": len({r["candidate"] for r in launches}),
            "slices": slices, "candidate_steps": candidate_steps, "step_s": round(step_s, 3),
            "race_wall_s": round(wall, 1), "ideal_s": round(ideal, 1),
            "ratio": round(wall / ideal, 2) if ideal else None,
            "startup_to_first_step_s": {"sum": round(sum(startup), 1),
                                        "median": round(statistics.median(startup), 1)},
            "idle_slice_s": round(slices * wall - busy, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="a finished LAG run (OUT_DIR of ul2_grow.sh)")
    args = p.parse_args(argv)
    try:
        report = race_report(args.run_dir)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"benchmark": "race_efficiency", **report}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
