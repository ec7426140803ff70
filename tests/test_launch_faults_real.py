"""Faults that really happen, with the real trainer (tiny preset) under the real supervisor.

Each faulty candidate must be marked with the right reason well within the configured timeout,
and its siblings must finish:

* single-rank candidates (``launcher="direct"``): NaN injected at step 3
  (``LAG_DS_INJECT_NAN_AT_STEP``), a checkpoint save that fails (the tag directory it must create
  is taken by a file), the rank SIGKILLed mid-run;
* DP=2 candidates through the real DeepSpeed launcher: rank 1 SIGKILLed mid-run, rank 1
  SIGSTOPped mid-run (rank 0 then waits in a collective: a hang, diagnosed from the stacks).

The jobs use the tests' own torch extension cache, prepared first as the orchestrator does
(``prepare_deepspeed_ops``), so a rank killed here can never leave a lock in the shared cache.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from test_launch_jit_build import TEST_CACHE

from lag_ds.launch import Allocation, JobSpec, Journal, prepare_deepspeed_ops, run_jobs
from lag_ds.launch.diagnose import rank_of
from lag_ds.launch.process import group_members

pytestmark = pytest.mark.slow
TINY = REPO / "launch_scripts/configs/tiny_base.yaml"
JOB_ENV = {"OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(TEST_CACHE),
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def write_tiny_config(root: Path) -> Path:
    """tiny_base.yaml evaluating and saving every 4 steps, its data built here (not raced for
    by the jobs), DeepSpeed's ops prepared in the tests' extension cache."""
    cfg = yaml.safe_load(TINY.read_text())
    cfg.update(cache_dir=str(root / "cache"), ds_config=str(REPO / "ds_configs/cpu_zero2.json"),
               train_steps=40, save_interval=4, eval_interval=4, log_interval=1)
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    from lag_ds.config import load_yaml
    from lag_ds.data import prepare_data
    from lag_ds.train.config import TrainConfig

    loaded = load_yaml(TrainConfig, path)
    prepare_data(loaded.data, Path(loaded.cache_dir))
    prepare_deepspeed_ops(env={**os.environ, **JOB_ENV}, timeout_s=900, log=lambda m: None)
    return path


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    return write_tiny_config(tmp_path_factory.mktemp("faults"))


def trainer(name: str, config: Path, root: Path, *sets: str,
            env: dict[str, str] | None = None) -> JobSpec:
    run_dir = root / name
    args = ["--config", str(config), "--set", f"run_dir={run_dir}"]
    for s in sets:
        args += ["--set", s]
    return JobSpec(name=name, script="lag_ds.train", module=True, run_dir=run_dir, args=args,
                   env={**JOB_ENV, **(env or {})})


def last_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return -1
    return max((json.loads(line)["step"] for line in lines if line.endswith("}")), default=-1)


def signal_rank_at(journal: Path, name: str, run_dir: Path, *, rank: str, step: int,
                   sig: int) -> dict[str, float]:
    """In the background: once ``run_dir`` logged ``step``, send ``sig`` to that job's rank;
    the returned dict gets the wall time of the signal under ``"time"``."""
    sent: dict[str, float] = {}

    def go() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if last_step(run_dir) >= step:
                recs = [r for r in Journal(journal).records() if r.candidate == name
                        and r.state == "running"] if journal.exists() else []
                for pid in group_members(recs[-1].pgid, started_since=recs[-1].start_ticks):
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                    if b"lag_ds.train" in cmd and rank_of(pid) == rank and b"launcher" not in cmd:
                        os.kill(pid, sig)
                        sent["time"] = time.time()
                        return
            time.sleep(0.1)

    threading.Thread(target=go, daemon=True).start()
    return sent


def ended_at(journal: Path) -> dict[str, float]:
    """Wall time of each candidate's final record."""
    return {r.candidate: r.time for r in Journal(journal).records() if r.is_final}


@pytest.fixture
def kill_strays():
    journals: list[Path] = []
    yield journals
    for journal in journals:
        for rec in Journal(journal).records() if journal.exists() else []:
            if rec.pgid is not None:
                try:
                    os.killpg(rec.pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def test_single_rank_faults(tiny_config, tmp_path, kill_strays):
    journal = tmp_path / "journal.jsonl"
    kill_strays.append(journal)
    (tmp_path / "save_fails" / "checkpoints").mkdir(parents=True)
    (tmp_path / "save_fails" / "checkpoints" / "global_step4").write_text("in the way\n")
    jobs = [trainer("sibling", tiny_config, tmp_path),
            trainer("nan", tiny_config, tmp_path, env={"LAG_DS_INJECT_NAN_AT_STEP": "3"}),
            trainer("save_fails", tiny_config, tmp_path),
            trainer("killed", tiny_config, tmp_path, "train_steps=5000")]
    killed = signal_rank_at(journal, "killed", tmp_path / "killed", rank="0", step=6,
                            sig=signal.SIGKILL)
    hang_timeout = 30.0
    results = run_jobs(jobs, Allocation.local(2), slots_per_slice=1, journal_path=journal,
                       hang_timeout_s=hang_timeout, startup_timeout_s=300, poll_interval_s=0.2,
                       launcher="direct", kill_grace_s=5)
    got = {n: (r.state, r.reason) for n, r in results.items()}
    assert got["sibling"] == ("finished", "")
    # the trainer logs the NaN and exits 3; whichever the supervisor sees first names it
    assert got["nan"] in {("failed", "non-finite loss"), ("failed", "non-finite loss at step 3")}
    assert got["killed"] == ("failed", "exit code 137 (SIGKILL)")
    assert got["save_fails"][0] == "failed", got
    assert got["save_fails"][1].startswith("exit code 1: "), got
    assert "global_step4" in got["save_fails"][1], got
    # the NaN stopped the run before its optimizer step: nothing saved past step 0..2
    assert not (tmp_path / "nan" / "checkpoints" / "latest").exists()
    # each failure was recognised well within the configured timeout (from its fault's moment)
    end = ended_at(journal)
    assert end["killed"] - killed["time"] < hang_timeout, (end, killed)
    for name in ("nan", "save_fails"):
        assert (tmp_path / name / "metrics.jsonl").stat().st_mtime > end[name] - hang_timeout
    assert Journal(journal).replay()["save_fails"].reason == got["save_fails"][1]


def test_dp2_rank_killed_and_rank_stopped(tiny_config, tmp_path, kill_strays):
    journal = tmp_path / "journal.jsonl"
    kill_strays.append(journal)
    jobs = [trainer("rank_killed", tiny_config, tmp_path, "train_steps=5000"),
            trainer("rank_stopped", tiny_config, tmp_path, "train_steps=5000"),
            trainer("sibling", tiny_config, tmp_path, "train_steps=12")]
    killed = signal_rank_at(journal, "rank_killed", tmp_path / "rank_killed", rank="1", step=6,
                            sig=signal.SIGKILL)
    stopped = signal_rank_at(journal, "rank_stopped", tmp_path / "rank_stopped", rank="1",
                             step=6, sig=signal.SIGSTOP)
    # DP=2 start-up on a loaded 2-core box can take minutes; a step takes well under a second
    hang_timeout = 20.0
    results = run_jobs(jobs, Allocation.local(4), slots_per_slice=2, journal_path=journal,
                       hang_timeout_s=hang_timeout, startup_timeout_s=300, poll_interval_s=0.2,
                       launcher="deepspeed", kill_grace_s=5, stack_dump_s=5)
    got = {n: (r.state, r.reason) for n, r in results.items()}
    assert got["sibling"] == ("finished", ""), got
    assert got["rank_killed"][0] == "failed" and got["rank_killed"][1].startswith("exit code"), got
    # rank 0 of the stopped job waits for rank 1 in a collective; both show in the reason
    reason = got["rank_stopped"][1]
    assert reason.startswith(f"hung: no progress for {hang_timeout:g}s; rank 1 is stopped "
                             "(SIGSTOP?); rank 0 in a collective ("), reason
    end = ended_at(journal)
    assert end["rank_killed"] - killed["time"] < hang_timeout, (end, killed)
    # the hang timeout, then up to 5 s of stack dumps and 5 s of kill grace
    assert end["rank_stopped"] - stopped["time"] < hang_timeout + 15, (end, stopped)
