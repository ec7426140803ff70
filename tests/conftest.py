"""Shared fixtures: an in-process world of one (gloo) and the paths of the venv's launchers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# In-process DeepSpeed loads use the same ninja as the subprocesses (lag_ds/toolchain.py).
os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"


@pytest.fixture(scope="session")
def world1():
    """torch.distributed + megatron parallel_state with one rank (TP=1, DP=1) for in-process tests."""
    from lag_ds.train.distributed import init_distributed

    init_distributed(tensor_parallel=1)
    yield
    # left initialised for the session: parallel_state is process-global


def deepspeed_env(tmp_path: Path | None = None) -> dict[str, str]:
    """Environment for subprocesses started through the venv's `deepspeed` launcher."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    env.pop("MASTER_PORT", None), env.pop("MASTER_ADDR", None)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.fixture(scope="session", autouse=True)
def _no_leaked_deepspeed_shm():
    """Tests kill ranks on purpose; give their DeepSpeed shm segments back when the suite ends."""
    yield
    from lag_ds.launch.shm_segments import clear_stale_segments

    clear_stale_segments(grace_s=10.0)
