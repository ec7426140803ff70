#!/usr/bin/env python
"""Job start-up: from the launch of a candidate to its first metrics record and its first step.

Why: a LAG candidate trains only k steps, so start-up can cost more than training. This script
reads a LAG run directory (``launch_scripts/ul2_grow.sh``'s OUT_DIR) and, for every job of it
(base, candidates, promotion), splits the time from the supervisor's launch to the first step:

* ``launcher``: launch -> the trainer process exists (the ``deepspeed`` runner: its own imports,
  then spawning ranks);
* the trainer's phases from ``RUN_DIR/startup.json`` (``lag_ds/train/startup.py``): imports,
  distributed init, data, model, engine, checkpoint load, the LAG@0 validation, the first step;
* ``to_first_record``: launch -> the first line of ``metrics.jsonl`` (what the supervisor's
  start-up timeout waits for).

Without ``--run-dir`` it first runs a short CPU demo race into ``--workdir`` (the demo's small
preset and candidates, two jobs at a time as in ``make demo``, few steps); ``--quick`` uses the
tiny preset. Prints JSON; nothing here is a timed assertion.

    python benchmarks/job_startup.py                         # run a short race, then report
    python benchmarks/job_startup.py --run-dir runs/lag_demo # report on an existing run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from json_stdout import keep_stdout_for_json

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _jobs(out: Path) -> list[tuple[str, Path, float]]:
    """(name, run_dir, launch time) of the first launch of every job of a LAG run."""
    where = {"journal-base.jsonl": lambda name: out / "base",
             "journal-promoted.jsonl": lambda name: out / "promoted" / "run",
             "journal-candidates.jsonl": lambda name: out / "candidates" / name / "run"}
    jobs = []
    for journal, run_dir in where.items():
        seen = set()
        for r in _records(out / journal):
            if r["state"] == "running" and r["candidate"] not in seen:
                seen.add(r["candidate"])
                jobs.append((r["candidate"], run_dir(r["candidate"]), r["time"]))
    return jobs


def job_report(name: str, run_dir: Path, launched: float) -> dict | None:
    startup_path = run_dir / "startup.json"
    metrics = _records(run_dir / "metrics.jsonl")
    if not startup_path.exists() or not metrics:
        return None
    startup = json.loads(startup_path.read_text())
    start = startup["process_start"]
    phases, before = {"launcher": round(start - launched, 2)}, 0.0
    for phase, at in startup["marks"]:
        phases[phase] = round(at - before, 2)
        before = at
    return {"job": name, "phases_s": phases,
            "to_first_record_s": round(min(r["wall_time"] for r in metrics) - launched, 2),
            "to_first_step_s": round(start + before - launched, 2)}


def report(out: Path) -> dict:
    jobs = [r for r in (job_report(*j) for j in _jobs(out)) if r is not None]
    if not jobs:
        raise SystemExit(f"error: {out}: no job with startup.json and metrics (not a LAG run dir?)")
    cands = [j for j in jobs if j["job"] not in ("base", "promoted")]
    summary = {}
    if cands:
        summary = {"candidates": len(cands),
                   "median_to_first_record_s": statistics.median(
                       j["to_first_record_s"] for j in cands),
                   "median_to_first_step_s": statistics.median(j["to_first_step_s"] for j in cands),
                   "median_phases_s": {p: statistics.median(j["phases_s"].get(p, 0.0) for j in cands)
                                       for p in cands[0]["phases_s"]}}
    return {"run_dir": str(out), "jobs": jobs, "candidates": summary}


def run_race(workdir: Path, *, quick: bool) -> Path:
    out = workdir / "race"
    if (out / "summary.json").exists():
        return out
    config = "tiny_base.yaml" if quick else "small_base.yaml"
    env = {**os.environ, "PYTHON": sys.executable, "OUT_DIR": str(out),
           "TRAIN_CONFIG": str(REPO / "launch_scripts/configs" / config), "BASE_STEPS": "10",
           "GROW_LAYERS": "2", "SPACE": "starts0=0;blocks=1,2;inits=duplicate",
           "LAG_STEPS": "4", "EVAL_INTERVAL": "2", "TOTAL_STEPS": "16", "SLOTS_PER_SLICE": "1",
           "NUM_SLOTS": "2"}
    env.pop("ALLOCATION", None)
    proc = subprocess.run(["bash", str(REPO / "launch_scripts/ul2_grow.sh")], env=env, cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: the race failed:\n{proc.stderr[-3000:]}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, help="an existing LAG run (OUT_DIR); default: run one")
    p.add_argument("--workdir", type=Path, help="where to run the race (default: a temp dir)")
    p.add_argument("--quick", action="store_true", help="tiny preset instead of the demo's small")
    args = p.parse_args(argv)
    emit = keep_stdout_for_json()  # DeepSpeed prints to stdout; the JSON alone goes there
    if args.run_dir is not None:
        if not args.run_dir.is_dir():
            print(f"error: --run-dir {args.run_dir}: not a directory", file=sys.stderr)
            return 2
        out = args.run_dir
    else:
        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lag_startup_"))
        workdir.mkdir(parents=True, exist_ok=True)
        out = run_race(workdir, quick=args.quick)
    emit({"benchmark": "job_startup", **report(out)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
