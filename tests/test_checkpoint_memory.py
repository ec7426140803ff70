"""Peak memory of a ZeRO-2 growth stays near one tensor (the performance issue's bound).

The synthetic source is written in DeepSpeed's exact on-disk format (the benchmark's writer) with
one dominant tensor, the vocab-parallel embedding: 64 MiB in fp32, split over TP=2 and DP=2.
The grow tool runs in a child process whose anonymous resident memory (``RssAnon``: what it
allocated, not the memory-mapped source pages) is sampled every millisecond. The bound is computed
from the shapes: the anonymous memory of a child that only imports what the tool imports, plus
1.25x the largest tensor's fp32 size, plus 24 MiB for everything else the tool holds (the plan,
pickled metadata, buffers of the background hasher). Gathering shard by shard and concatenating
(the code before gather.py) peaks at about twice the embedding above the baseline and fails it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

VOCAB, HIDDEN = 16384, 1024
LARGEST = VOCAB * HIDDEN * 4  # the embedding, fp32, TP-merged
MIB = 1 << 20


def _peak_anon(cmd: list[str]) -> int:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    status, peak = Path(f"/proc/{proc.pid}/status"), 0
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except (FileNotFoundError, ProcessLookupError):
            pass
        time.sleep(0.001)
    out, err = proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    return peak


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    from grow_checkpoint_benchmark import write_synthetic

    root = tmp_path_factory.mktemp("mem") / "src"
    return write_synthetic(root, layers=2, h=HIDDEN, f=256, vocab=VOCAB, seq=64, tp=2, dp=2,
                           step=3)


def test_growth_peak_memory_is_about_one_tensor(source, tmp_path):
    baseline = _peak_anon([sys.executable, "-c",
                           "import sys; sys.path.insert(0, '.'); import deepspeed, torch; "
                           "import lag_ds.checkpoint.grow, lag_ds.checkpoint.safe_load"])
    peak = _peak_anon([sys.executable, "tools/grow_checkpoint.py", "--src", str(source),
                       "--dst", str(tmp_path / "grown"), "--op", "k=2,i0=0,b=1,init=duplicate",
                       "--no-progress"])
    bound = baseline + 1.25 * LARGEST + 24 * MIB
    print(f"baseline {baseline / MIB:.0f} MiB, peak {peak / MIB:.0f} MiB, "
          f"above baseline {(peak - baseline) / LARGEST:.2f}x the largest tensor")
    assert (tmp_path / "grown" / "manifest.json").is_file()
    assert peak <= bound, (f"peak anonymous memory {peak / MIB:.0f} MiB > bound {bound / MIB:.0f} "
                           f"MiB (baseline {baseline / MIB:.0f} + 1.25 x {LARGEST / MIB:.0f} + 24)")
