#!/usr/bin/env python
"""Growing a universal base into one LAG candidate by hard links, against `cp -r` of the base.

Why: a race grows the same base into every operator of a design space. From a universal base
(what the LAG driver converts the base into, and what `tools/grow_checkpoint.py` writes), a
candidate's unchanged tensors are hard links (`lag_ds.checkpoint.universal_links`); only new
random or zeroed tensors and the metadata are written. The performance issue asks that this cost
much less than 0.1x of copying the base. Prints JSON: the wall time (including the manifest's
hashing of written files and the fsyncs) and the bytes on disk of each candidate, next to
`cp -r BASE && sync`.

    python tools/grow_checkpoint.py --src SRC --dst /tmp/base_u --op k=0 ...   # or any grown dir
    python benchmarks/candidate_links.py /tmp/base_u --ops k2-i0-b1-duplicate,k2-i0-b1-random
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from json_stdout import keep_stdout_for_json

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", type=Path, help="a universal checkpoint with manifest.json")
    p.add_argument("--ops", default="k2-i0-b1-duplicate,k2-i0-b1-random",
                   help="comma-separated operators (0-indexed names)")
    p.add_argument("--workdir", type=Path, help="default: a temp dir next to the base")
    args = p.parse_args(argv)
    emit = keep_stdout_for_json()
    from lag_ds.checkpoint.manifest import read_manifest
    from lag_ds.checkpoint.universal_links import (
        disk_usage,
        materialise_candidate,
        universal_tag_dir,
    )
    from lag_ds.growth import parse_operator, plan_growth

    try:
        read_manifest(args.base)
        names = [d.name for d in (universal_tag_dir(args.base) / "zero").iterdir() if d.is_dir()]
    except (ValueError, OSError) as exc:
        print(f"error: {args.base}: not a universal checkpoint with a manifest ({exc})",
              file=sys.stderr)
        return 2
    from lag_ds.checkpoint.layer_tables import megatron_core_table

    split = megatron_core_table(names).split_layer_name
    num_layers = len({s[0] for n in names if (s := split(n))})
    work = Path(tempfile.mkdtemp(prefix="cand_", dir=args.workdir or args.base.parent))
    try:
        t0 = time.perf_counter()
        subprocess.run(["cp", "-r", str(args.base), str(work / "copy")], check=True)
        subprocess.run(["sync"], check=True)
        cp_s = time.perf_counter() - t0
        base_bytes = disk_usage([work / "copy"])["bytes_on_disk"]
        shutil.rmtree(work / "copy")
        rows = []
        for name in args.ops.split(","):
            plan = plan_growth(parse_operator(name, num_layers=num_layers), num_layers, seed=0)
            t0 = time.perf_counter()
            materialise_candidate(args.base, work / name, plan)
            wall = time.perf_counter() - t0
            usage = disk_usage([args.base, work / name])
            own = usage["bytes_on_disk"] - disk_usage([args.base])["bytes_on_disk"]
            rows.append({"op": name, "wall_s": round(wall, 3), "bytes_written": own,
                         "wall_over_cp": round(wall / cp_s, 4),
                         "bytes_over_base": round(own / base_bytes, 4)})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    emit({"benchmark": "candidate_links", "base": str(args.base), "base_layers": num_layers,
          "base_bytes": base_bytes, "cp_r_s_incl_sync": round(cp_s, 3), "candidates": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
