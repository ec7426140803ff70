"""An orchestrator for tests that must run *inside* an allocation (e.g. a SLURM batch job).

``python launch_driver.py SPEC.json`` reads ``{"root": DIR, "jobs": {name: {fake trainer
options} or {"jobspec": {script, module, args, env}}}, "run_jobs": {keyword arguments of
run_jobs}, "allocation": "slurm" | N}``, runs the jobs (in ``DIR/<name>``) with
:func:`lag_ds.launch.run_jobs` and writes ``DIR/allocation.json`` (the allocation it saw) and
``DIR/results.json`` (state, reason, attempt, exit code per job).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fake_trainer as ft  # noqa: E402

from lag_ds.launch import Allocation, JobSpec, run_jobs  # noqa: E402


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    root = Path(spec["root"])
    alloc = (Allocation.from_slurm() if spec.get("allocation", "slurm") == "slurm"
             else Allocation.local(int(spec["allocation"])))
    (root / "allocation.json").write_text(json.dumps(
        [[h.name, h.slots] for h in alloc.hosts]))
    jobs = [JobSpec(name=name, run_dir=root / name, **options["jobspec"])
            if "jobspec" in options else ft.job(root, name, **options)
            for name, options in spec["jobs"].items()]
    kwargs = dict(spec.get("run_jobs", {}))
    kwargs.setdefault("journal_path", str(root / "journal.jsonl"))
    results = run_jobs(jobs, alloc, **kwargs)
    (root / "results.json").write_text(json.dumps(
        {n: [r.state, r.reason, r.attempt, r.exit_code] for n, r in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
