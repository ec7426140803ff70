"""What does the race cost?  LAG@k vs successive-halving LAG vs the winner alone (prints JSON).

From a *study* run directory (candidates trained past ``base_step + k``; see
``tools/analyze_lag.py``), for each way to choose:

* ``candidate_steps``: training steps spent on candidates until the decision (LAG@k ``n * k``;
  SH-LAG, replayed with ``--eta``/``--r0``: each candidate up to the rung that eliminated it;
  winner alone: ``k`` -- the cost of k steps of the pick without any race, a lower bound that
  presumes the pick is known);
* ``candidate_wall_s``: the sum over candidates of the wall time from each candidate's first
  ``metrics.jsonl`` record at/after ``base_step`` to its last record at or before the step where
  it stopped (``wall_time`` fields; a resumed candidate's restart gap is included), and
  ``max_candidate_wall_s``, the longest single candidate (the elapsed time if all ran at once);
* ``regret`` / ``relative_regret`` of the pick against the final losses (last step reached).

Nothing is timed here; all times come from the run's own records.

    python benchmarks/lag_cost.py runs/ul2_lag --eta 3 --r0 200
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from lag_ds.select.curves import read_records  # noqa: E402
from lag_ds.select.policies import replay_lag, replay_sh, sh_trained_steps  # noqa: E402
from lag_ds.select.report import (  # noqa: E402
    candidate_dirs,
    default_replays,
    final_losses,
    load_run,
)


def wall_seconds(path: Path, *, base_step: int, stop_step: int) -> float | None:
    """Wall time from the first record with ``step >= base_step`` to the last record with
    ``step <= stop_step`` (``None`` if the file has no such ``wall_time`` records)."""
    times = [(r["step"], r["wall_time"]) for r in read_records(path)
             if isinstance(r.get("wall_time"), (int, float)) and r["step"] >= base_step]
    inside = [w for s, w in times if s <= stop_step]
    if not times or not inside:
        return None
    return float(max(inside) - times[0][1])


def _walls(files: dict[str, Path], stops: dict[str, int], base: int) -> dict[str, float | None]:
    return {n: wall_seconds(files[n], base_step=base, stop_step=base + t)
            for n, t in stops.items()}


def _sum(walls: dict[str, float | None]) -> dict[str, float | None]:
    known = [w for w in walls.values() if w is not None]
    full = len(known) == len(walls)
    return {"candidate_wall_s": sum(known) if full else None,
            "max_candidate_wall_s": max(known) if full and known else None}


def lag_cost(run_dir: str | Path, *, eta: int = 3, r0: int | None = None,
             k: int | None = None) -> dict:
    """The JSON this script prints (see the module docstring)."""
    sf, curves, _ = load_run(run_dir)
    sel = sf.selection
    base = sel.base_step
    k = sel.k if k is None else k
    final_t, finals, _ = final_losses(curves, base_step=base)
    if final_t <= k:
        raise ValueError(f"{run_dir}: a race-only run (curves end at t={final_t} <= k={k}); "
                         "cost vs regret needs a study run")
    raced = {n: c for n, c in curves.items()
             if not sel.excluded.get(n, "").startswith("failed")}
    dirs = candidate_dirs(Path(run_dir), sf)
    files = {n: dirs[n] / "run" / "metrics.jsonl" for n in raced}
    if r0 is None:  # about k/9, on a multiple of the evaluation interval (as the report does)
        every = math.gcd(*(int(s) - base for c in raced.values() for s in c.steps
                           if base < s <= base + k)) or 1
        r0 = int(default_replays(k, eval_every=every)[0].params["r0"]) if k >= 1 else 1

    lag = replay_lag(raced, base_step=base, k=k, final_losses=finals)
    sh = replay_sh(raced, base_step=base, k=k, min_steps=r0, eta=eta, final_losses=finals)
    _, sh_stops = sh_trained_steps(raced, base_step=base, k=k, min_steps=r0, eta=eta)
    def row(out, stops: dict[str, int]) -> dict:
        return {"pick": out.pick, "decided_at": out.decided_at,
                "candidate_steps": sum(stops.values()), **_sum(_walls(files, stops, base)),
                "regret": out.regret, "relative_regret": out.relative_regret}

    rows = {lag.policy: row(lag, {n: k for n in raced}), sh.policy: row(sh, sh_stops),
            "winner_alone": row(lag, {lag.pick: k})}
    lag_row, sh_row = rows[lag.policy], rows[sh.policy]
    return {
        "run_dir": str(run_dir), "base_step": base, "k": k, "final_t": final_t,
        "num_candidates": len(raced), "policies": rows,
        "sh_over_lag_candidate_steps": sh_row["candidate_steps"] / lag_row["candidate_steps"]
        if lag_row["candidate_steps"] else None,
        "sh_over_lag_wall": (sh_row["candidate_wall_s"] / lag_row["candidate_wall_s"]
                             if sh_row["candidate_wall_s"] and lag_row["candidate_wall_s"]
                             else None),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--eta", type=int, default=3, help="SH reduction factor (default 3)")
    p.add_argument("--r0", type=int, default=None, help="first SH rung (default ~k/9 on the evaluation grid)")
    p.add_argument("--k", type=int, default=None, help="race length (default: selection.json k)")
    args = p.parse_args(argv)
    try:
        result = lag_cost(args.run_dir, eta=args.eta, r0=args.r0, k=args.k)
    except ValueError as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
