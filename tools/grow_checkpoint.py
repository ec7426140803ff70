#!/usr/bin/env python
"""Grow (and/or reshard) a checkpoint with one LAG growth operator — offline, shard by shard.

Thin entry point over :func:`lag_ds.checkpoint.grow.grow_checkpoint`; see ``--help``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

EPILOG = """\
operators (--op): comma-separated k=<new layers>, i0=<0-indexed start> or i1=<1-indexed start>,
  b=<block size dividing k>, init=duplicate|random|zero|zero-random.  A bare i= needs --index-base.
  The paper's section 2.1 writes i 1-indexed, its section 3 / appendix A 0-indexed; names such as
  k4-i4-b2-duplicate are always 0-indexed and are accepted too.

examples:
  # grow a 12-layer ZeRO-2 checkpoint to 16 layers (duplicate blocks of 2 starting at layer 4, 0-indexed)
  python tools/grow_checkpoint.py --src runs/base/checkpoints --dst grown/k4-i4-b2 --op "k=4,i0=4,b=2,init=duplicate"
  # the same, written for 2-way tensor parallelism (loads at any DP degree)
  python tools/grow_checkpoint.py --src runs/base/checkpoints --dst grown/tp2 --op k4-i4-b2-duplicate --target-tp 2
  # only reshard (no growth): e.g. a ZeRO-2 TP=2 checkpoint for TP=1
  python tools/grow_checkpoint.py --src runs/base/checkpoints --dst resharded --target-tp 1
  # the same command for every format; the tool names the one it found (first line of output):
  #   a ZeRO-3 run (zero_pp_rank_<d>_mp_rank_00_*.pt per DP rank), TP=1
  python tools/grow_checkpoint.py --src runs/base_zero3/checkpoints --dst grown/z3 --op k4-i4-b2-duplicate
  #   DeepSpeed pipeline layer files (Megatron-DeepSpeed, GPT-NeoX)
  python tools/grow_checkpoint.py --src neox/global_step1000 --dst grown/pipe --op k=4,i0=8,b=4,init=duplicate
  #   a Hugging Face model directory (safetensors shards)
  python tools/grow_checkpoint.py --src hf/llama-1b --dst hf/llama-1b-grown --op k=4,i0=12,b=4,init=zero
  #   megatron-core torch_dist (dist_checkpointing.save, or a Megatron-LM run directory)
  python tools/grow_checkpoint.py --src megatron_run --dst grown/mcore --op k=4,i0=8,b=4,init=duplicate
  # print the plan and exit; list the paper's 12->16 design space
  python tools/grow_checkpoint.py --src runs/base/checkpoints --op "k=4,i1=5,b=4,init=random" --dry-run
  python tools/grow_checkpoint.py --list-space --num-layers 12 --num-new-layers 4 --space paper
  # check an output against its manifest (sha256 + size per file)
  python tools/grow_checkpoint.py --verify grown/k4-i4-b2

output: ZeRO-1/2 sources give DeepSpeed's universal layout (load with {"checkpoint": {"load_universal": true}};
  python -m lag_ds.train does this by itself for init_from); ZeRO-3 sources give the same universal
  layout (TP=1; stock ZeRO-3 loads it at any DP degree); ZeRO-0 sources give native files for the
  target TP; DeepSpeed PipelineModule sources (layer_XX-*model_states.pt: Megatron-DeepSpeed, GPT-NeoX)
  give renumbered layer files (hard links where unchanged) plus universal optimizer state keyed by
  pipe parameter names (loads at any PP and DP degree); Hugging Face sources give sharded safetensors.
  megatron-core torch_dist sources (metadata.json + .metadata + *.distcp, or a Megatron-LM directory
  with latest_checkpointed_iteration.txt) give a torch_dist checkpoint whose stacked layer tensors
  have L+k rows (model and optimizer.state.*); it loads at any TP/DP. The first line of output names
  the format found.
  An option a format cannot honour (e.g. --optimizer-state on HF) is an error. A manifest.json is written last; the
  destination appears only when complete. Exit codes: 0 ok, 1 verification failed, 2 bad input.
"""


def build_parser() -> argparse.ArgumentParser:
    from lag_ds.cli import OneLineParser

    p = OneLineParser(
        prog="python tools/grow_checkpoint.py",
        description="Grow an L-layer checkpoint into L+k layers with one growth operator (LAG paper, "
        "section 2.1), including the optimizer state, working directly on sharded DeepSpeed ZeRO 0/1/2 x "
        "TP files, DeepSpeed pipeline layer files (PP x TP x DP), megatron-core torch_dist checkpoints or Hugging Face safetensors shards. The source is never modified.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", type=Path, help="DeepSpeed checkpoint dir (with 'latest') or tag dir, a HF model dir, or a "
                   "megatron-core torch_dist dir (--dry-run names the format it found)")
    p.add_argument("--dst", type=Path, help="output directory; must not exist")
    p.add_argument("--op", help='growth operator, e.g. "k=4,i0=4,b=2,init=duplicate" (omit to only reshard)')
    p.add_argument("--index-base", type=int, choices=(0, 1), default=None,
                   help="how to read a bare i= in --op / starts= in --space (0: appendix A, 1: section 2.1)")
    p.add_argument("--seed", type=int, default=0, help="base seed of random-init layers (default 0)")
    p.add_argument("--target-tp", type=int, default=None, help="tensor-parallel degree of the output (default: source's)")
    p.add_argument("--target-dp", type=int, default=None,
                   help="data-parallel degree the output is meant for (recorded; universal output loads at any DP)")
    p.add_argument("--optimizer-state", choices=("copy", "zero"), default=None,
                   help="Adam moments of duplicated layers: copy the source layer's (default) or zero; "
                   "DeepSpeed formats only")
    p.add_argument("--init-std", type=float, default=None,
                   help="std of random-init layers (default 0.02, megatron init_method_std; output projections "
                   "get std/sqrt(2L)); DeepSpeed formats only")
    p.add_argument("--dry-run", action="store_true", help="print the plan (new layer <- old layer / init) and exit")
    p.add_argument("--verify", nargs="?", const=True, default=None, metavar="DIR",
                   help="after growing, re-hash the output against its manifest; or with DIR, only verify DIR")
    p.add_argument("--list-space", action="store_true", help="list a design space (with --num-layers/--num-new-layers)")
    p.add_argument("--num-layers", type=int, help="L for --list-space / --dry-run without --src")
    p.add_argument("--num-new-layers", type=int, help="k for --list-space")
    p.add_argument("--space", default="paper",
                   help='design space for --list-space: "paper", "all", or "starts0=0,2;blocks=1,2;inits=duplicate,random"')
    p.add_argument("--unsafe-load", action="store_true",
                   help="allow arbitrary pickles in source files (only for checkpoints you trust)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="machine-readable output for --list-space / --dry-run")
    return p


def main(argv: list[str] | None = None) -> int:
    from lag_ds.cli import parse_or_exit_code

    args = parse_or_exit_code(build_parser(), argv)
    if isinstance(args, int):  # --help, or a usage error already printed as one line
        return args
    try:
        return _run(args)
    except ValueError as exc:
        print(f"error: {str(exc).splitlines()[0].replace('pass index_base=', 'pass --index-base ')}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from lag_ds.checkpoint.formats import read_checkpoint_info
    from lag_ds.checkpoint.grow import grow_checkpoint
    from lag_ds.checkpoint.manifest import verify_manifest
    from lag_ds.growth import parse_operator, parse_space, plan_growth

    if isinstance(args.verify, str):
        problems = verify_manifest(Path(args.verify))
        for line in problems:
            print(line, file=sys.stderr)
        print(f"{args.verify}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
        return 1 if problems else 0
    if args.list_space:
        if args.num_layers is None or args.num_new_layers is None:
            raise ValueError("--list-space needs --num-layers and --num-new-layers")
        ops = parse_space(args.space, num_layers=args.num_layers, num_new_layers=args.num_new_layers,
                          index_base=args.index_base)
        if args.json:
            print(json.dumps([op.name for op in ops]))
        else:
            for op in ops:
                print(f"{op.name:28s} start i0={op.start} (i1={op.start + 1}) b={op.block_size} init={op.init}")
            print(f"{len(ops)} operators")
        return 0
    if args.src is None:
        if args.dry_run and args.num_layers is not None and args.op:
            num_layers = args.num_layers
        else:
            raise ValueError("--src is required")
    else:
        _check_paths(args)
        info = read_checkpoint_info(args.src, unsafe_load=args.unsafe_load)
        num_layers = info.num_layers
    plan = None
    if args.op:
        op = parse_operator(args.op, index_base=args.index_base, num_layers=num_layers)
        plan = plan_growth(op, num_layers, seed=args.seed)
    if args.src is not None and not args.json:  # the sniffed format, before anything else
        print(f"source: {info.format}, {info.num_layers} layers, step {info.step} ({info.path})",
              flush=True)
    if args.dry_run:
        if plan is None:
            print(f"no --op: reshard only ({num_layers} layers)")
        else:
            print(json.dumps(plan.to_dict(), indent=1) if args.json else plan.describe())
        return 0
    if args.dst is None:
        raise ValueError("--dst is required")
    if plan is None and args.target_tp is None and args.target_dp is None:
        raise ValueError("nothing to do: give --op and/or --target-tp/--target-dp")
    manifest = grow_checkpoint(args.src, args.dst, plan, target_tp=args.target_tp, target_dp=args.target_dp,
                               optimizer_state=args.optimizer_state, init_std=args.init_std,
                               show_progress=not args.no_progress, unsafe_load=args.unsafe_load)
    total = sum(f["size"] for f in manifest["files"].values())
    print(f"wrote {args.dst} ({manifest['kind']}, {len(manifest['files'])} files, {total / 1e6:.1f} MB)")
    if args.verify:
        problems = verify_manifest(args.dst)
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            return 1
        print(f"{args.dst}: verified")
    return 0


def _check_paths(args: argparse.Namespace) -> None:
    """Before reading a tensor: numeric options in range, no output inside the source (it would
    change the tree being read, and a later growth of it would read the output too), and a source
    that carries a manifest still matches it."""
    from lag_ds.checkpoint.manifest import check_source_manifest

    for flag, value in (("--target-tp", args.target_tp), ("--target-dp", args.target_dp)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.init_std is not None and not args.init_std > 0:
        raise ValueError(f"--init-std must be > 0, got {args.init_std}")
    if not args.src.exists():
        raise ValueError(f"--src {args.src}: no such file or directory")
    if args.dst is not None:
        src = args.src.resolve()
        roots = [src]
        if any((src.parent / name).exists() for name in ("latest", "latest_universal")):
            roots.append(src.parent)  # --src is a tag directory: protect its checkpoint directory
        dst = args.dst.resolve()
        for root in roots:
            if dst == root or root in dst.parents:
                raise ValueError(f"--dst {args.dst}: inside the source {root}; write elsewhere")
    check_source_manifest(args.src)


if __name__ == "__main__":
    sys.exit(main())
