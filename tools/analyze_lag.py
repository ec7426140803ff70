#!/usr/bin/env python
"""Does LAG choose well?  Analyse one LAG run directory (paper Fig. 3, Tables 1-2).

Thin entry point over :func:`lag_ds.select.report_files.write_report`; see ``--help``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

EPILOG = """\
reads: RUN_DIR/selection.json and RUN_DIR/candidates/<name>/run/metrics.jsonl (val/loss) only.
  study run (curves go on past base_step+k): final losses at the last step reached, regret,
    recall@{1,2,3}, correlation with the final loss, the paper's strategy table;
  race-only run (curves end at base_step+k): self-correlation and a proposed k only.

writes: RUN_DIR/analysis/{report.md,report.json,*.png} (or --out) and one TensorBoard run
  RUN_DIR/tb/analysis (figures as images, table and verdict as text).  Each directory is
  built aside and renamed into place; an older report is replaced.

replay (offline evaluation of a race policy on the curves; repeatable):
  lag:k=K[,w=W]                LAG@K with trailing smoothing over W points
  sh:eta=E,r0=R,k=K            successive halving, rungs R, E*R, E^2*R, ... < K, then K
  settle:tau=T,m=M,floor=F,cap=C  stop when Spearman between the last M pairs of evaluations
                               is >= T (not before F, at the latest at C)
  Missing keys default to the run's k (SH eta=3, r0=k//9; settle tau=0.9, m=3, floor=0, cap=k).
  SH and settle with those defaults are always replayed; LAG@t for every evaluated t is always
  in report.json.

examples:
  python tools/analyze_lag.py runs/ul2_lag
  python tools/analyze_lag.py runs/ul2_lag --smoothing 11 --threshold 0.95 --margin 2
  python tools/analyze_lag.py runs/ul2_lag --replay "lag:k=40" --replay "sh:eta=3,r0=10,k=40" \\
      --replay "settle:tau=0.9,m=3,floor=10,cap=40"
  python tools/analyze_lag.py runs/ul2_lag --out /tmp/lag_report --no-tensorboard

exit codes: 0 ok, 2 bad input (one line 'error: ...' on stderr, nothing written).
"""


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog="python tools/analyze_lag.py",
        description="Analyse a LAG run: correlation of early with final losses, self-correlation "
        "heatmap, recall@k, regret, a proposed k from the phase transition, and the paper's "
        "strategy table (Oracle, LAG@k, LAG@0, stack-on-top, replayed policies).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a LAG run directory")
    p.add_argument("--smoothing", type=int, default=1,
                   help="centred moving average over this many points (odd; paper: 11)")
    p.add_argument("--threshold", type=float, default=None,
                   help="correlation the ranking must keep to count as settled (default 0.9)")
    p.add_argument("--margin", type=float, default=None,
                   help="proposed k = margin x transition step (default 2)")
    p.add_argument("--horizon", type=int, default=None,
                   help="self-correlation heatmap over t <= HORIZON (default: the run's k)")
    p.add_argument("--replay", action="append", default=[], metavar="SPEC",
                   help="policy to replay, e.g. 'sh:eta=3,r0=10,k=40' (repeatable)")
    p.add_argument("--out", type=Path, default=None,
                   help="report directory (default RUN_DIR/analysis)")
    p.add_argument("--tb-dir", type=Path, default=None,
                   help="TensorBoard run directory (default RUN_DIR/tb/analysis)")
    p.add_argument("--no-tensorboard", action="store_true", help="skip the TensorBoard run")
    return p


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other bad input
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help (0) or a usage error (2)
        return int(done.code or 0)
    from lag_ds.select.phase import DEFAULT_MARGIN, DEFAULT_THRESHOLD
    from lag_ds.select.report import parse_replay
    from lag_ds.select.report_files import write_report

    try:
        out = write_report(
            args.run_dir, out=args.out, tb_dir=args.tb_dir, tensorboard=not args.no_tensorboard,
            smoothing=args.smoothing,
            threshold=DEFAULT_THRESHOLD if args.threshold is None else args.threshold,
            margin=DEFAULT_MARGIN if args.margin is None else args.margin,
            horizon=args.horizon, replays=[parse_replay(s) for s in args.replay])
    except (ValueError, OSError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"wrote {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
