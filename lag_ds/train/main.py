"""Command-line entry point of the trainer (thin: parse, build config, call :func:`train`)."""

from __future__ import annotations

import argparse
import sys

EXAMPLE = """examples:
  python -m lag_ds.train --config launch_scripts/configs/small_base.yaml
  deepspeed --num_gpus 2 --module lag_ds.train --config RUN.yaml --set train_steps=200
  deepspeed --num_gpus 2 --module lag_ds.train --config RUN.yaml --set tensor_parallel=2
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace | int:
    """The arguments, or the exit code of ``--help`` (0) / a usage error (2, one line printed)."""
    from lag_ds.cli import OneLineParser, parse_or_exit_code

    p = OneLineParser(
        prog="python -m lag_ds.train",
        description="UL2 pretraining of a megatron-core GPT model with the DeepSpeed engine. "
        "Resumes from RUN_DIR/checkpoints/latest when present.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="run config YAML (keys of lag_ds.train.config.TrainConfig)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, dotted for sections (e.g. optim.lr=3e-4); repeatable")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher passes it
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parse_or_exit_code(p, argv)


def main(argv: list[str] | None = None) -> int:
    # First thing, so that even a hang in an import can be diagnosed: on SIGUSR1 every thread's
    # stack goes to $LAG_DS_STACK_DUMP_DIR/stack-rank<R>.txt (the launcher's supervisor asks for
    # it before killing a job that makes no progress).
    from lag_ds.launch.diagnose import register_stack_dump

    register_stack_dump()
    args = parse_args(argv)
    if isinstance(args, int):
        return args
    import os

    from lag_ds.toolchain import pin_ninja

    pin_ninja(os.environ)  # the same ninja as every other process loading DeepSpeed's ops
    from lag_ds.config import apply_overrides, load_dataclass, load_yaml, to_dict
    from lag_ds.train.config import TrainConfig

    try:
        cfg = load_yaml(TrainConfig, args.config) if args.config else load_dataclass(TrainConfig, {})
        cfg = apply_overrides(cfg, args.set)
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0

    from lag_ds.train.preflight import preflight

    try:  # before distributed, data and DeepSpeed: a bad checkpoint is one line, not a traceback
        preflight(cfg)
    except ValueError as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2

    from lag_ds.train.distributed import shutdown_distributed
    from lag_ds.train.loop import EXIT_NON_FINITE, NonFiniteLoss, train

    try:
        train(cfg)
    except NonFiniteLoss as exc:
        print(f"error: {exc}; stopped before the optimizer step", file=sys.stderr)
        return EXIT_NON_FINITE
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
    return 0
