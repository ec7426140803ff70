"""``python -m lag_ds.stacking``: one LAG growth stage end to end (see ``--help``)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from lag_ds.stacking.config import LagRunConfig

HELP = {
    "out_dir": "output directory (base/, candidates/, selection.json, promoted/, tb/)",
    "train_config": "TrainConfig YAML shared by base, candidates and the promoted run",
    "train_overrides": "key=value override for every training job (repeatable)",
    "base_checkpoint": "pretrained L-layer DeepSpeed checkpoint dir (with 'latest'); omit to pretrain one",
    "base_steps": "base pretraining steps when no --base-checkpoint (default: the train config's)",
    "grow_layers": "k in L -> L+k",
    "space": 'design space: "paper", "all", or "starts0=0,2;blocks=1,2;inits=duplicate,random"',
    "lag_steps": "k of LAG@k: steps each candidate trains before the decision",
    "eval_interval": "candidates' validation interval",
    "smoothing_window": "trailing window (validation points) averaged for the decision",
    "total_steps": "absolute step the promoted winner trains to",
    "allocation": "local:N | hostfile:PATH | slurm | include:HOST:IDS[@HOST:IDS] (DeepSpeed --include syntax)",
    "slots_per_slice": "slots per candidate job (candidates run concurrently on slices)",
    "optimizer_state": "Adam moments of duplicated layers: copy | zero",
    "seed": "seed of random-init layers",
    "hang_timeout_s": "a job with no progress for this long is killed and marked failed",
    "max_retries": "retries of a crashed or hung candidate",
    "base_port": "first master port; each concurrent job gets its own",
    "policy": "race policy: lag (LAG@k) | sh (successive halving up to k) | settle (stop when "
              "the ranking settles, at most k)",
    "sh_eta": "SH: keep the best ceil(n/eta) at each rung",
    "sh_min_steps": "SH: first rung r0; rungs r0, eta*r0, ... < k, then k (default k // eta**2)",
    "settle_tau": "settle: Spearman threshold between consecutive evaluations",
    "settle_m": "settle: consecutive evaluation pairs that must reach tau",
    "settle_floor": "settle: earliest step since growing it may stop at (default: one chunk)",
    "settle_chunk": "settle: steps per round between checks (default k // 4)",
    "study": "study mode: every candidate continues to --total-steps (for tools/analyze_lag.py)",
    "dense_eval_steps": "validate every --dense-eval-interval steps for this many steps after "
                        "growing (0: off)",
    "dense_eval_interval": "validation interval right after growing",
}
OPTIONAL_INT = {"base_steps", "sh_min_steps", "settle_floor", "settle_chunk"}

EPILOG = """examples:
  python -m lag_ds.stacking                                   # CPU demo (small preset, demo corpus, local:2)
  python -m lag_ds.stacking --base-checkpoint runs/ul2_1.1b_base/checkpoints \\
      --train-config launch_scripts/configs/ul2_1.1b_base.yaml --grow-layers 4 --space paper \\
      --lag-steps 2000 --total-steps 400000 --allocation hostfile:/job/hostfile --slots-per-slice 8
  python -m lag_ds.stacking --policy sh --sh-eta 3 --sh-min-steps 5   # successive halving to k
  python -m lag_ds.stacking --study --dense-eval-steps 20             # every candidate to the end
Re-running the same command resumes (finished candidates are not rerun; the winner is the same)."""


def build_parser() -> argparse.ArgumentParser:
    from lag_ds.cli import OneLineParser

    p = OneLineParser(prog="python -m lag_ds.stacking", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Landscape-Aware Growing: grow a base checkpoint with every operator of a "
                                "design space, train each candidate k steps concurrently through the deepspeed "
                                "launcher, keep the lowest validation loss (LAG@k), continue training it.")
    for f in dataclasses.fields(LagRunConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if f.name == "train_overrides":
            p.add_argument(flag, action="append", default=[], metavar="KEY=VALUE", help=HELP[f.name])
        elif isinstance(default, bool):
            p.add_argument(flag, action="store_true", help=HELP[f.name])
        else:
            kind = {int: int, float: float}.get(type(default), str)
            if f.name in OPTIONAL_INT:
                kind = int
            p.add_argument(flag, type=kind, default=default, help=f"{HELP[f.name]} (default: {default})")
    return p


def main(argv: list[str] | None = None) -> int:
    from lag_ds.cli import parse_or_exit_code

    parsed = parse_or_exit_code(build_parser(), argv)
    if isinstance(parsed, int):  # --help, or a usage error already printed as one line
        return parsed
    args = vars(parsed)
    args["train_overrides"] = tuple(args["train_overrides"])
    try:
        cfg = LagRunConfig(**args)
        from lag_ds.stacking.lag_run import run_lag
        from lag_ds.stacking.preflight import check_lag_run

        check_lag_run(cfg)  # nothing written, no job started, before this passes

        run_lag(cfg)
    except ValueError as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
