#!/usr/bin/env python
"""One LAG candidate's start-up, phase by phase, at any model shape (prints JSON).

Why: ``job_startup.py`` times the demo's candidates inside a LAG run; a 1.1B candidate cannot run
a race on a CPU box, but its start-up can still be measured: this starts ``python -m lag_ds.train``
as one rank from a grown checkpoint (``init_from``) with ``train_steps`` equal to the checkpoint's
step, so the job goes through imports, distributed init, data, model build, DeepSpeed engine,
checkpoint load and the LAG@0 validation, then stops before training (``--steps 1`` trains one
step too, where memory allows). Phases come from ``RUN_DIR/startup.json``; ``max_rss_bytes`` is
the child's peak resident set (memory-mapped checkpoint pages included).

    # the paper's candidate shape: grow the 1.1B synthetic first
    python benchmarks/grow_checkpoint_benchmark.py --workdir /tmp/lagbench --keep
    python benchmarks/candidate_startup.py --init-from /tmp/lagbench/grown --preset ul2-1.1b \\
        --num-layers 16 --ds-config ds_configs/bf16_zero1_ul2_1.1b.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from json_stdout import keep_stdout_for_json

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init-from", type=Path, required=True, help="a grown checkpoint directory")
    p.add_argument("--preset", default="ul2-1.1b")
    p.add_argument("--num-layers", type=int, required=True, help="the grown model's layers")
    p.add_argument("--ds-config", default="ds_configs/bf16_zero1_ul2_1.1b.json")
    p.add_argument("--eval-samples", type=int, default=3, help="LAG@0 validation samples (>= 3)")
    p.add_argument("--steps", type=int, default=0, help="training steps after the load (0: none)")
    p.add_argument("--workdir", type=Path, default=None, help="run directory (default: a temp dir)")
    args = p.parse_args(argv)
    emit = keep_stdout_for_json()

    from lag_ds.checkpoint.formats import read_checkpoint_info

    try:
        info = read_checkpoint_info(args.init_from)
    except ValueError as exc:
        raise SystemExit(f"error: --init-from: {exc}") from None
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lag_startup_"))
    run_dir = workdir / "run"
    config = {
        "run_dir": str(run_dir), "preset": args.preset, "num_layers": args.num_layers,
        "init_from": str(args.init_from.resolve()), "growth_step": info.step,
        "global_batch_size": 1, "micro_batch_size": 1, "train_steps": info.step + args.steps,
        "eval_interval": 1_000_000, "eval_samples": args.eval_samples, "save_interval": 1_000_000,
        "ds_config": args.ds_config,
        "optim": {"name": "adamw", "lr": 3.0e-4, "betas": [0.9, 0.95], "weight_decay": 0.0},
    }
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(config, indent=1))  # YAML is a JSON superset
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": os.environ.get("MASTER_PORT", "29611")}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "lag_ds.train", "--config", str(workdir / "config.json")],
                          cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    startup_path = run_dir / "startup.json"
    startup = json.loads(startup_path.read_text()) if startup_path.exists() else None
    marks = startup["marks"] if startup else []
    phases, last = {}, 0.0
    for name, at in marks:
        phases[name] = round(at - last, 2)
        last = at
    report = {
        "benchmark": "candidate_startup", "init_from": str(args.init_from), "format": info.format,
        "step": info.step, "preset": args.preset, "num_layers": args.num_layers,
        "ds_config": args.ds_config, "eval_samples": args.eval_samples, "steps": args.steps,
        "returncode": proc.returncode, "wall_s": round(wall, 1),
        "phases_s": phases, "to_last_mark_s": marks[-1][1] if marks else None,
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
    }
    if proc.returncode != 0:
        report["stderr_tail"] = proc.stderr[-1500:]
    emit(report)
    return report


if __name__ == "__main__":
    main()
