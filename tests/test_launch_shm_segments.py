"""DeepSpeed's CPU shm all-reduce segments do not pile up in /dev/shm (lag_ds/launch/shm_segments.py).

The real test runs two ranks through the stock ``deepspeed`` launcher: each rank must have mapped
its segment (so DeepSpeed did create one) and, after ``init_distributed``, its name must be gone,
so nothing is left after the job. The unit tests pin the sweep's rule: only this user's segments
that no live process maps and that are older than the grace period are removed.
"""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import time
from pathlib import Path

import pytest

from lag_ds.launch import shm_segments
from lag_ds.launch.jobs import pick_port
from tests.conftest import BIN, REPO, deepspeed_env


def _touch(path: Path, age_s: float) -> Path:
    path.write_bytes(b"\0" * 64)
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_segment_name_matches_deepspeed_format():
    env = {"RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29512"}
    assert shm_segments.segment_name(env, uid=0) == "deepspeed_allreduce_buffer_0_127.0.0.1_29512_1"
    assert shm_segments.segment_name({"MASTER_PORT": "1"}) is None


def test_only_old_unmapped_segments_of_this_user_are_stale(tmp_path):
    uid = os.getuid()
    old = _touch(tmp_path / f"deepspeed_allreduce_buffer_{uid}_h_1_0", 120)
    young = _touch(tmp_path / f"deepspeed_allreduce_buffer_{uid}_h_2_0", 1)
    in_use = _touch(tmp_path / f"deepspeed_allreduce_buffer_{uid}_h_3_0", 120)
    other_user = _touch(tmp_path / f"deepspeed_allreduce_buffer_{uid + 1}_h_4_0", 120)
    unrelated = _touch(tmp_path / "something_else", 120)
    stale = shm_segments.stale_segments(tmp_path, grace_s=60, mapped={str(in_use)})
    assert stale == [old]
    assert young.exists() and other_user.exists() and unrelated.exists()


def test_mapped_paths_sees_a_live_mapping_and_the_sweep_spares_it(tmp_path):
    seg = _touch(tmp_path / f"deepspeed_allreduce_buffer_{os.getuid()}_h_5_0", 120)
    with open(seg, "r+b") as f, mmap.mmap(f.fileno(), 64) as _m:
        assert str(seg) in shm_segments.mapped_paths()
        assert shm_segments.clear_stale_segments(tmp_path, grace_s=60) == []
        assert seg.exists()
    messages = shm_segments.clear_stale_segments(tmp_path, grace_s=60)
    assert len(messages) == 1 and str(seg) in messages[0] and not seg.exists()


@pytest.mark.skipif(not shm_segments.SHM_DIR.is_dir(), reason="no /dev/shm on this box")
def test_real_two_rank_job_leaves_no_segment_behind(tmp_path):
    port = pick_port(base_port=29700, offset=0, stride=1, in_use=set())
    cmd = [str(BIN / "deepspeed"), "--include", "localhost:0,1", "--master_port", str(port),
           "--no_local_rank", str(REPO / "tests/dist/shm_unlink.py"), str(tmp_path)]
    env = {**deepspeed_env(), "LOCAL_SIZE": "2"}  # the CPU accelerator sizes localhost from it
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        # DeepSpeed created and mapped the segment; our unlink removed only its name.
        assert rank["mapped_deleted"], rank
        assert not rank["exists"], rank
    left = sorted(shm_segments.SHM_DIR.glob(f"{shm_segments.PREFIX}_{os.getuid()}_*_{port}_*"))
    assert left == []
