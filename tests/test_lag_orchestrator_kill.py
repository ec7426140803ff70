"""SIGKILL the real LAG orchestrator at seven points of one run, re-run the same command each time.

RELIABILITY.md #8: killed anywhere and re-run, the same winner, no duplicate launch, no candidate
retrained past its last checkpoint.  One run on the tiny preset through ``ul2_grow.sh`` (base 6
steps, 3 candidates raced 2 at a time to LAG@4, promotion to step 14; every job saves every 2
steps), killed seven times in a chain so that the suite pays for one run, not seven:

1. mid-base, *orchestrator only* (``kill -9``): the base job, held after step 3, runs on as an
   orphan and must be adopted by the next run, not relaunched;
2. mid-candidate creation (``LAG_DS_ORCH_KILL_AT=candidate:<2nd>``): two of three grown;
3. mid-race, orchestrator only: the first wave, held after step 8, runs on and is adopted;
4. mid-race, *node failure* (the orchestrator and its jobs die): the first wave finished, the
   last candidate held after step 9 with its checkpoint at step 8;
5. between race and promotion (``decided``: selection.json written);
6. mid-promotion, before its job (``promoted_init``: the winner resharded);
7. mid-promotion, node failure: the promoted job held after step 13, its checkpoint at 12;

then the same command without a hook finishes.  Jobs that run at a kill point are held there by
the trainer's ``LAG_DS_HOLD_AT`` hook (a tiny step takes ~0.05 s: nothing outside could hit one
otherwise).  Checked from the outputs: the winner against the journaled curves *and* against an
uninterrupted reference run of the same config from the same base (CPU training is bit-for-bit
deterministic, so every candidate's and the promoted run's curve must be identical), launches
per job in the journals and in ``launcher.log``, the step each relaunch resumed from against the
checkpoint it had at the kill, and the metrics files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, deepspeed_env

from lag_ds.launch import Journal
from lag_ds.select import load_curve, select_lag

BASE, K, TOTAL = 6, 4, 14
SPACE = "starts0=0;blocks=1;inits=duplicate,random,zero"
NAMES = ["k1-i0-b1-duplicate", "k1-i0-b1-random", "k1-i0-b1-zero"]
LAUNCH_HEADER = "=== lag_ds.launch "
PORTS = range(29840, 29880)
"""Master ports of this test's jobs (the reference from 29840, the chain from 29860)."""


def command_env(out: Path, train_config: Path, **extra: str) -> dict[str, str]:
    env = deepspeed_env()
    for var in ("LAG_DS_ORCH_KILL_AT", "LAG_DS_HOLD_AT"):
        env.pop(var, None)
    env.update(PYTHON=sys.executable, OUT_DIR=str(out), TRAIN_CONFIG=str(train_config),
               BASE_STEPS=str(BASE), GROW_LAYERS="1", SPACE=SPACE, LAG_STEPS=str(K),
               EVAL_INTERVAL="2", TOTAL_STEPS=str(TOTAL), SLOTS_PER_SLICE="1",
               HANG_TIMEOUT="240", NUM_SLOTS="2", **extra)
    return env


class Orchestrator:
    """The same command each time (``ul2_grow.sh``, which execs the orchestrator), in its own
    session so that a SIGKILL to it reaches nothing else -- its jobs run in their own."""

    def __init__(self, out: Path, train_config: Path, logs: Path, port: int) -> None:
        self.out, self.train_config, self.logs, self.port = out, train_config, logs, port
        self.runs = 0
        self.timeline: list[tuple[str, float]] = []
        self.proc: subprocess.Popen | None = None

    def start(self, **hooks: str) -> None:
        self.runs += 1
        self.timeline.append((f"run {self.runs} {hooks}", time.monotonic()))
        self.err = self.logs / f"run{self.runs}.err"
        with open(self.logs / f"run{self.runs}.out", "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                ["launch_scripts/ul2_grow.sh", "--base-port", str(self.port)], cwd=REPO,
                env=command_env(self.out, self.train_config, **hooks), stdout=out, stderr=err,
                start_new_session=True)

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def wait_for(self, predicate, what: str, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert self.proc.poll() is None, (f"run {self.runs} ended (rc {self.proc.returncode})"
                                              f" before {what}:\n{self.stderr()[-4000:]}")
            assert time.monotonic() < deadline, f"run {self.runs}: no {what} in {timeout:g} s"
            time.sleep(0.05)

    def wait(self, timeout: float = 600.0) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """``kill -9`` of the orchestrator alone: its jobs run on."""
        os.kill(self.proc.pid, signal.SIGKILL)
        assert self.proc.wait() == -signal.SIGKILL

    def node_failure(self) -> None:
        """The machine dies: the orchestrator first (it must not see its jobs die and record
        failures), then every process of the run."""
        self.kill()
        kill_run_processes(self.out)


def run_processes(out: Path) -> list[int]:
    """Live processes whose command line names ``out``: the orchestrator, job wrappers, the
    DeepSpeed runner and launcher, the ranks (all get a path under ``out``)."""
    pids = []
    needle = str(out).encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = Path(entry.path, "cmdline").read_bytes()
            state = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in cmdline and state not in ("Z", "X"):
            pids.append(int(entry.name))
    return pids


def kill_run_processes(out: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while pids := run_processes(out):
        assert time.monotonic() < deadline, f"processes of {out} survive SIGKILL: {pids}"
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def log_of(out: Path, job: str) -> Path:
    run = {"base": out / "base", "promoted": out / "promoted/run"}.get(job)
    return (run or out / "candidates" / job / "run") / "launcher.log"


def held(out: Path, job: str, hold_file: Path) -> bool:
    log = log_of(out, job)
    return log.exists() and f"while {hold_file} exists" in log.read_text(errors="replace")


def latest_step(out: Path, job: str) -> int:
    tag = (log_of(out, job).parent / "checkpoints/latest").read_text().strip()
    assert tag.startswith("global_step"), tag
    return int(tag[len("global_step"):])


def hold(root: Path, name: str, step: int) -> tuple[Path, str]:
    """A hold file (created) and the ``LAG_DS_HOLD_AT`` value that holds jobs after ``step``."""
    path = root / f"hold-{name}"
    path.touch()
    return path, f"{step}:{path}"


def journal_records(out: Path):
    return {p.name: Journal(p).records() for p in sorted(out.glob("journal-*.jsonl"))}


def launches(records, job: str) -> list:
    return [r for r in records if r.candidate == job and r.reason == "launching"]


def metrics(out: Path, job: str) -> list[dict]:
    path = log_of(out, job).parent / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_train_config(root: Path) -> Path:
    cfg = yaml.safe_load((REPO / "launch_scripts/configs/tiny_base.yaml").read_text())
    cfg.update(cache_dir=str(root / "cache"), ds_config=str(REPO / "ds_configs/cpu_zero2.json"),
               eval_interval=2, save_interval=2)
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("orch_kill")
    train_config = write_train_config(root)
    logs = root / "logs"
    (logs / "ref").mkdir(parents=True)
    ref_out, out = root / "reference", root / "out"
    try:
        o = Orchestrator(out, train_config, logs, port=29860)
        at_kill: dict[str, int] = {}
        released: dict[str, float] = {}

        def adopt_and_release(hold_file: Path, phase: str, jobs: list[str]) -> None:
            """Once the re-run is in ``phase`` (it adopts in milliseconds), let the orphaned
            ``jobs``, still held, go on: they end under the new orchestrator's watch."""
            o.wait_for(lambda: f"[lag] {phase}: " in o.stderr(), f"the {phase} phase")
            time.sleep(2.0)
            assert all(run_processes(log_of(out, job).parent) for job in jobs), jobs
            released.update({job: time.time() for job in jobs})
            hold_file.unlink()

        # 1. mid-base, orchestrator only (kill -9): the base job, held after step 3, runs on
        path, spec = hold(root, "base", 3)
        o.start(LAG_DS_HOLD_AT=spec)
        o.wait_for(lambda: held(out, "base", path), "base held after step 3")
        o.kill()

        # 2. mid-candidate creation: the re-run adopts the base; killed once the second of
        # three candidates is grown
        o.start(LAG_DS_ORCH_KILL_AT=f"candidate:{NAMES[1]}")
        adopt_and_release(path, "base", ["base"])
        assert o.wait() == -signal.SIGKILL, o.stderr()[-4000:]
        assert f"SIGKILL at candidate:{NAMES[1]}" in o.stderr()
        grown = [n for n in NAMES if (out / "candidates" / n / "init/manifest.json").is_file()]
        assert grown == NAMES[:2]

        # 3. mid-race, orchestrator only: the first wave held after step 8, left running
        path, spec = hold(root, "race1", 8)
        o.start(LAG_DS_HOLD_AT=spec)
        o.wait_for(lambda: all(held(out, n, path) for n in NAMES[:2]), "first wave held")
        o.kill()

        # 4. mid-race, node failure: the re-run adopts the first wave, then the last
        # candidate is held after step 9 (its checkpoint at 8) and everything dies
        path2, spec = hold(root, "race2", 9)
        o.start(LAG_DS_HOLD_AT=spec)
        adopt_and_release(path, "race", NAMES[:2])
        o.wait_for(lambda: held(out, NAMES[2], path2), "last candidate held after step 9")
        o.node_failure()
        at_kill[NAMES[2]] = latest_step(out, NAMES[2])

        # 5. between race and promotion: selection.json written, nothing promoted
        o.start(LAG_DS_ORCH_KILL_AT="decided")
        assert o.wait() == -signal.SIGKILL, o.stderr()[-4000:]
        winner_at_kill = json.loads((out / "selection.json").read_text())["winner"]
        assert not (out / "promoted").exists()

        # 6. mid-promotion, before its job: the winner resharded, no job started
        o.start(LAG_DS_ORCH_KILL_AT="promoted_init")
        assert o.wait() == -signal.SIGKILL, o.stderr()[-4000:]
        assert (out / "promoted/init/manifest.json").is_file()
        assert not (out / "journal-promoted.jsonl").exists()

        # 7. mid-promotion, node failure: held after step 13 (checkpoint at 12)
        path, spec = hold(root, "promoted", 13)
        o.start(LAG_DS_HOLD_AT=spec)
        o.wait_for(lambda: held(out, "promoted", path), "promoted held after step 13")
        o.node_failure()
        at_kill["promoted"] = latest_step(out, "promoted")

        # 8. the same command, no hook: it finishes
        o.start()
        assert o.wait() == 0, o.stderr()[-5000:]
        t_chain = time.monotonic() - o.timeline[0][1]

        # The reference: the same config uninterrupted from the same base (the base itself
        # was never interrupted above, only its orchestrator; this saves the suite a base run).
        ref = Orchestrator(ref_out, train_config, logs / "ref", port=29840)
        ref.start(BASE_CKPT=str(out / "base/checkpoints"))
        assert ref.wait() == 0, ref.stderr()[-5000:]
        t_ref = time.monotonic() - ref.timeline[0][1]
        print(f"\nkilled chain {t_chain:.0f} s, reference run {t_ref:.0f} s")
        print("\n".join(f"  +{t - o.timeline[0][1]:5.0f} s {what}" for what, t in o.timeline))
        yield {"out": out, "ref": ref_out, "at_kill": at_kill, "released": released,
               "winner_at_kill": winner_at_kill}
    finally:
        kill_run_processes(root)  # nothing of the run may outlive the test
        remove_shm_segments(PORTS)


def remove_shm_segments(ports: range) -> None:
    """DeepSpeed's CPU all-reduce leaves a 69 MB /dev/shm segment per rank and master port,
    killed or not (README: they pile up until a build is OOM-killed); remove this test's own,
    named by its ports, once none of its processes is left."""
    for seg in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"):
        parts = seg.name.split("_")
        if len(parts) >= 6 and parts[-2].isdigit() and int(parts[-2]) in ports:
            seg.unlink(missing_ok=True)


def test_same_winner_as_the_curves_and_as_an_uninterrupted_run(chain):
    out, ref = chain["out"], chain["ref"]
    sel = json.loads((out / "selection.json").read_text())
    curves = {n: load_curve(out / "candidates" / n / "run/metrics.jsonl", name=n) for n in NAMES}
    recomputed = select_lag(curves, k=K, base_step=BASE, smoothing_window=1)
    assert sel["winner"] == recomputed.winner == chain["winner_at_kill"]
    assert json.loads((out / "summary.json").read_text())["winner"] == sel["winner"]
    ref_sel = json.loads((ref / "selection.json").read_text())
    assert ref_sel["winner"] == sel["winner"]
    assert [r["name"] for r in ref_sel["ranking"]] == [r["name"] for r in sel["ranking"]]
    # CPU training is deterministic and every resume is exact, so the killed run's curves are
    # the reference's, bit for bit (train and validation losses of every job).
    for job in [*NAMES, "promoted"]:
        def losses(root):
            return [(r["step"], r.get("train/loss"), r.get("val/loss"))
                    for r in metrics(root, job)]
        assert losses(out) == losses(ref), job


def test_each_job_launched_once_plus_once_per_node_failure_it_was_in(chain):
    out = chain["out"]
    journals = journal_records(out)
    assert set(journals) == {"journal-base.jsonl", "journal-candidates.jsonl",
                             "journal-promoted.jsonl"}
    expected = {"base": 1, NAMES[0]: 1, NAMES[1]: 1, NAMES[2]: 2, "promoted": 2}
    for records in journals.values():
        for job in {r.candidate for r in records}:
            mine = [r for r in records if r.candidate == job]
            assert len(launches(records, job)) == expected[job], (job, mine)
            # a relaunch only after its process was found gone without an end ...
            for i, r in enumerate(mine):
                if r.reason == "launching" and i > 1:
                    assert mine[i - 1].reason == "restart: process gone without a recorded end"
            # ... never after an end: the last record is the only final one
            assert [r.state for r in mine if r.is_final] == ["finished"]
            assert mine[-1].state == "finished"
            # and every launch was journaled (the wrapper logs each start in launcher.log)
            text = log_of(out, job).read_text(errors="replace")
            assert text.count(LAUNCH_HEADER) == expected[job], job


def test_orphaned_jobs_were_adopted_not_relaunched(chain):
    out = chain["out"]
    assert set(chain["released"]) == {"base", *NAMES[:2]}
    for journal in ("journal-base.jsonl", "journal-candidates.jsonl"):
        records = journal_records(out)[journal]
        for job in set(chain["released"]) & {r.candidate for r in records}:
            (running,) = [r for r in records if r.candidate == job and r.state == "running"]
            (finished,) = [r for r in records if r.candidate == job and r.state == "finished"]
            # it ended after the re-run had taken it over (it was held until then)
            assert finished.time >= chain["released"][job]
            assert finished.exit_code == 0 and running.attempt == finished.attempt == 1


def test_relaunches_resume_from_the_checkpoint_they_had_at_the_kill(chain):
    out = chain["out"]
    assert chain["at_kill"] == {NAMES[2]: 8, "promoted": 12}
    for job, step in {"base": None, **chain["at_kill"]}.items():
        starts = [line.split("start step ", 1)[1].split(",")[0]
                  for line in log_of(out, job).read_text(errors="replace").splitlines()
                  if "[lag_ds]" in line and "start step " in line]
        first = "0 (scratch)" if job == "base" else f"{BASE if job != 'promoted' else BASE + K}"\
            " (init_from)"
        assert starts == [first] + ([f"{step} (resumed)"] if step is not None else []), job


def test_metrics_show_every_step_once(chain):
    out = chain["out"]
    spans = {"base": (1, BASE), **{n: (BASE + 1, BASE + K) for n in NAMES},
             "promoted": (BASE + K + 1, TOTAL)}
    for job, (first, last) in spans.items():
        rows = metrics(out, job)
        train = [r["step"] for r in rows if "train/loss" in r]
        assert train == list(range(first, last + 1)), job  # none twice, none missing
        val = [r["step"] for r in rows if "val/loss" in r]
        assert val == sorted(set(val)), job
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_step"] == TOTAL


def test_no_process_of_the_run_is_left(chain):
    assert run_processes(chain["out"]) == [] and run_processes(chain["ref"]) == []
