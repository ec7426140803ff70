"""Rank script for tests/test_launch_shm_segments.py: after ``init_distributed`` this rank's
DeepSpeed shm segment must be mapped (DeepSpeed made it) but its name already gone from /dev/shm."""

import json
import os
import sys
from pathlib import Path

from lag_ds.launch.shm_segments import SHM_DIR, segment_name
from lag_ds.train.distributed import init_distributed, shutdown_distributed

init_distributed(tensor_parallel=1)
path = str(SHM_DIR / segment_name(os.environ))
maps = Path("/proc/self/maps").read_text()
out = Path(sys.argv[-1]) / f"rank{os.environ['RANK']}.json"
out.write_text(json.dumps({"path": path, "mapped_deleted": f"{path} (deleted)" in maps,
                           "mapped": path in maps, "exists": Path(path).exists()}))
shutdown_distributed()
