#!/usr/bin/env python
"""Export a lag_ds checkpoint (or a LAG run's promoted winner) as a Hugging Face model directory.

Thin entry point over :func:`lag_ds.export.hf.export_hf`; see ``--help``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout as is

EPILOG = """\
CKPT may be: a LAG output directory (summary.json: the promoted winner's run is exported), an
  adaptive stage log directory (stages.json, e.g. runs/adaptive/adaptive: the last stage's
  winner), a run directory (RUN/checkpoints, latest step), a checkpoint directory with 'latest'
  or 'latest_universal', or one tag directory. Native DeepSpeed ZeRO 0/1/2 at any TP x DP and
  the universal checkpoints of tools/grow_checkpoint.py / the LAG driver are read parameter by
  parameter (TP shards merged, ZeRO fragments gathered); nothing is consolidated first.

The tokenizer and the head count come from the run's train_config.yaml when CKPT is a run (the
  LAG driver writes one per job) or from --config; else give --tokenizer (and --num-heads for
  models not built from a lag_ds preset).

examples:
  # the promoted winner of a LAG run, in one command
  python tools/export_hf.py runs/lag hf/lag-winner
  # a plain training run (latest checkpoint), weights in bfloat16
  python tools/export_hf.py runs/base hf/base --dtype bfloat16
  # a grown/universal checkpoint with an explicit tokenizer and trainer config
  python tools/export_hf.py grown/k4-i4-b2 hf/grown --config RUN.yaml
  python tools/export_hf.py runs/base/checkpoints/global_step300 hf/s300 \\
      --tokenizer .cache/lag_ds/tokenizers/spm-XXXX.model

then, in Python:
  model = AutoModelForCausalLM.from_pretrained("hf/lag-winner", trust_remote_code=True)
  tokenizer = AutoTokenizer.from_pretrained("hf/lag-winner")

output: model.safetensors (or shards + index), config.json with auto_map to the shipped
  configuration_lagds.py / modeling_lagds.py (Llama's layers + learned absolute positions),
  tokenizer.json / tokenizer_config.json / tokenizer.model, generation_config.json and a lag_ds
  manifest.json, written to a temporary sibling and renamed: OUT is absent or complete.
  Exit codes: 0 ok, 2 bad input (one line on stderr).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python tools/export_hf.py",
        description="Write a lag_ds model as a Hugging Face transformers model directory "
        "(safetensors, config.json + remote code, SentencePiece tokenizer).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", type=Path, metavar="CKPT",
                   help="checkpoint, run or LAG output directory (see below)")
    p.add_argument("out", type=Path, metavar="OUT", help="output directory; must not exist")
    p.add_argument("--config", type=Path, default=None, metavar="RUN.yaml",
                   help="the run's trainer config (default: RUN/train_config.yaml when found)")
    p.add_argument("--tokenizer", type=Path, default=None, metavar="FILE.model",
                   help="SentencePiece model (default: the one the trainer config names/trained)")
    p.add_argument("--num-sentinels", type=int, default=None,
                   help="UL2 sentinels above the pieces (default: the config's, else 100)")
    p.add_argument("--no-tokenizer", action="store_true", help="export the model only")
    p.add_argument("--num-heads", type=int, default=None,
                   help="attention heads (default: from the checkpoint's / config's preset)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype of the written weights (default float32: the fp32 master copy)")
    p.add_argument("--max-shard-gb", type=float, default=2.0,
                   help="largest safetensors file (default 2 GB)")
    p.add_argument("--unsafe-load", action="store_true",
                   help="allow arbitrary pickles in source files (only for checkpoints you trust)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.max_shard_gb <= 0:
            raise ValueError(f"--max-shard-gb must be positive, got {args.max_shard_gb}")
        if args.no_tokenizer and args.tokenizer is not None:
            raise ValueError("--no-tokenizer and --tokenizer exclude each other")
        from lag_ds.export.hf import export_hf

        export_hf(args.ckpt, args.out, num_heads=args.num_heads, tokenizer=args.tokenizer,
                  num_sentinels=args.num_sentinels, train_config=args.config,
                  no_tokenizer=args.no_tokenizer, dtype=args.dtype,
                  max_shard_bytes=int(args.max_shard_gb * 1e9),
                  show_progress=not args.no_progress, unsafe_load=args.unsafe_load)
    except ValueError as exc:
        print(f"error: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
