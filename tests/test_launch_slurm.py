"""Inside a real two-node SLURM cluster (``tests/slurm_cluster.py``): allocations as SLURM sets
them, candidates as job steps (``launcher="srun"``, no ssh), and ``scancel`` handled like a crash.

The orchestrator runs where it runs in production: inside ``sbatch -N2`` (``launch_driver.py``),
with the fake trainer as the job.  Skipped, with the reason, where the box cannot host the
cluster (not root, no network namespaces, slurm-wlm not installable).
"""

import json
import os
import re
import sys
import time
from pathlib import Path

import fake_trainer as ft
import pytest
import slurm_cluster

from lag_ds.launch import Journal

DRIVER = Path(__file__).resolve().with_name("launch_driver.py")
PY = sys.executable
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    try:
        with slurm_cluster.slurm_cluster() as c:
            yield c
    except slurm_cluster.Unavailable as exc:
        pytest.skip(f"cannot run a SLURM cluster here: {exc}")


def _env() -> dict[str, str]:
    repo = str(Path(__file__).resolve().parents[1])
    return {"PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1"}


def submit_driver(cluster, root: Path, options, *, jobs: dict, **run_jobs) -> int:
    root.mkdir(parents=True, exist_ok=True)
    spec = root / "spec.json"
    run_jobs = {"launcher": "srun", "slots_per_slice": 1, "poll_interval_s": 0.1,
                "hang_timeout_s": 60, "kill_grace_s": 2, **run_jobs}
    spec.write_text(json.dumps({"root": str(root), "jobs": jobs, "run_jobs": run_jobs}))
    return cluster.sbatch(options, f"cd {root}\nexec {PY} {DRIVER} {spec}\n",
                          output=root / "sbatch.out", env=_env())


def results(root: Path) -> dict:
    path = root / "results.json"
    assert path.exists(), (root / "sbatch.out").read_text()
    return json.loads(path.read_text())


def wait_for(predicate, *, timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:g}s for {what}")
        time.sleep(0.1)


def ckpt_step(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "ckpt.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError):
        return -1


def test_allocation_as_slurm_sets_it(cluster, tmp_path):
    script = (f'{PY} -c "import json; from lag_ds.launch import Allocation; '
              f'print(json.dumps([[h.name, h.slots] for h in Allocation.from_slurm().hosts]))"\n'
              'echo "TPN=$SLURM_TASKS_PER_NODE NTPN=$SLURM_NTASKS_PER_NODE"\n')
    cases = {"n4": (["-N2", "-n4"], [["slurmn1", 2], ["slurmn2", 2]]),  # no --ntasks-per-node
             "n3": (["-N2", "-n3"], [["slurmn1", 2], ["slurmn2", 1]]),  # uneven: 2,1
             "per_node": (["-N2", "--ntasks-per-node=1"], [["slurmn1", 1], ["slurmn2", 1]])}
    ids = {name: cluster.sbatch(opts, script, output=tmp_path / f"{name}.out", env=_env())
           for name, (opts, _) in cases.items()}
    for name, (_, expected) in cases.items():
        assert cluster.wait(ids[name]) == "COMPLETED"
        out = (tmp_path / f"{name}.out").read_text()
        assert json.loads(out.splitlines()[0]) == expected, out


def test_two_steps_on_two_nodes_at_once_then_one_step_spanning_both(cluster, tmp_path):
    pair, span = tmp_path / "pair", tmp_path / "span"
    job = submit_driver(cluster, pair, ["-N2", "--ntasks-per-node=1"],
                        jobs={n: {"steps": 20, "sleep_per_step": 0.1} for n in ("a", "b")})
    assert cluster.wait(job) == "COMPLETED", (pair / "sbatch.out").read_text()
    assert results(pair) == {"a": ["finished", "", 1, 0], "b": ["finished", "", 1, 0]}
    (a,), (b,) = ft.launches(pair / "a"), ft.launches(pair / "b")
    assert {a["host"], b["host"]} == {"slurmn1", "slurmn2"}  # one per node ...
    done = {n: json.loads((pair / n / "done").read_text())["time"] for n in "ab"}
    assert a["time"] < done["b"] and b["time"] < done["a"]  # ... at the same time
    assert (a["world_size"], a["local_rank"], a["master_addr"]) == (1, "0", a["host"])
    assert "ssh" not in (pair / "a" / "launcher.log").read_text().split("\n")[0]

    job = submit_driver(cluster, span, ["-N2", "--ntasks-per-node=1"],
                        jobs={"wide": {"steps": 5}}, slots_per_slice=2)
    assert cluster.wait(job) == "COMPLETED", (span / "sbatch.out").read_text()
    assert results(span) == {"wide": ["finished", "", 1, 0]}
    ranks = sorted(ft.launches(span / "wide", 0) + ft.launches(span / "wide", 1),
                   key=lambda r: r["rank"])
    assert [(r["rank"], r["host"], r["world_size"], r["local_rank"], r["master_addr"],
             r["local_size"]) for r in ranks] == [(0, "slurmn1", 2, "0", "slurmn1", "1"),
                                                  (1, "slurmn2", 2, "0", "slurmn1", "1")]
    assert ranks[0]["master_port"] == ranks[1]["master_port"]


def test_scancel_of_a_step_is_a_crash_and_the_retry_resumes(cluster, tmp_path):
    root = tmp_path / "run"
    job = submit_driver(cluster, root, ["-N2", "--ntasks-per-node=1"], max_retries=1,
                        jobs={"victim": {"steps": 60, "sleep_per_step": 0.05},
                              "sibling": {"steps": 60, "sleep_per_step": 0.05}})
    wait_for(lambda: ckpt_step(root / "victim") >= 10, what="victim's checkpoint at step 10")
    step = cluster.steps()["victim"]
    cluster.run("scancel", step)
    assert cluster.wait(job) == "COMPLETED", (root / "sbatch.out").read_text()
    got = results(root)
    assert got["victim"][:3] == ["finished", "", 2] and got["sibling"] == ["finished", "", 1, 0]
    recs = [(r.state, r.attempt, r.reason) for r in Journal(root / "journal.jsonl").records()
            if r.candidate == "victim"]
    # journaled like a crash: srun reports the cancelled step's tasks as killed
    retry = [r for r in recs if r[:2] == ("pending", 2) and r[2] != "launching"]
    assert retry and retry[0][2].startswith("retry after: exit code 137 (SIGKILL)"), recs
    # the retry resumed from the checkpoint: one LAG@0 record, no step retrained from scratch
    assert len(ft.launches(root / "victim")) == 2
    records = [json.loads(line) for line in (root / "victim" / "metrics.jsonl").open()]
    assert [r["step"] for r in records if "val/loss" in r].count(0) == 1
    assert json.loads((root / "victim" / "done").read_text())["step"] == 60


def test_scancel_of_the_allocation_then_the_same_command_resumes(cluster, tmp_path):
    root = tmp_path / "run"
    jobs = {"quick": {"steps": 3},
            "slow": {"steps": 80, "sleep_per_step": 0.05},
            "queued": {"steps": 10, "sleep_per_step": 0.05}}
    job = submit_driver(cluster, root, ["-N2", "--ntasks-per-node=1"], jobs=jobs)
    wait_for(lambda: (root / "quick" / "done").exists() and ckpt_step(root / "slow") >= 10,
             what="quick done and slow at step 10")
    cluster.run("scancel", str(job))
    assert cluster.wait(job) == "CANCELLED"
    assert not (root / "results.json").exists()
    latest = Journal(root / "journal.jsonl").replay()
    assert latest["quick"].state == "finished" and latest["slow"].state == "running"

    job = submit_driver(cluster, root, ["-N2", "--ntasks-per-node=1"], jobs=jobs)
    assert cluster.wait(job) == "COMPLETED", (root / "sbatch.out").read_text()
    assert {n: r[0] for n, r in results(root).items()} == {n: "finished" for n in jobs}
    assert len(ft.launches(root / "quick")) == 1  # a finished candidate is never relaunched
    assert len(ft.launches(root / "slow")) == 2  # restarted once, from its checkpoint
    records = [json.loads(line) for line in (root / "slow" / "metrics.jsonl").open()]
    assert [r["step"] for r in records if "val/loss" in r].count(0) == 1
    slow = [(r.state, r.reason) for r in Journal(root / "journal.jsonl").records()
            if r.candidate == "slow"]
    restarts = [reason for _, reason in slow if reason.startswith("restart: ")]
    assert len(restarts) == 1, slow
    assert restarts[0] == "restart: process gone without a recorded end" or re.fullmatch(
        r"restart: ended by a signal \(exit code \d+\) while the orchestrator was down",
        restarts[0]), slow


def test_real_trainer_dp2_spanning_both_nodes(cluster, tmp_path):
    """The real trainer, DP=2 ZeRO-2, one rank per node, gloo over the nodes' eth0: a job step
    started by ``launcher="srun"`` trains across nodes with no ssh."""
    from test_launch_faults_real import JOB_ENV, write_tiny_config

    config = write_tiny_config(tmp_path)
    root = tmp_path / "run"
    run_dir = root / "wide"
    jobspec = {"script": "lag_ds.train", "module": True,
               "args": ["--config", str(config), "--set", f"run_dir={run_dir}",
                        "--set", "train_steps=8"],
               "env": {**JOB_ENV, "GLOO_SOCKET_IFNAME": slurm_cluster.IFNAME}}
    job = submit_driver(cluster, root, ["-N2", "--ntasks-per-node=1"], slots_per_slice=2,
                        hang_timeout_s=240, jobs={"wide": {"jobspec": jobspec}})
    assert cluster.wait(job, timeout=600) == "COMPLETED", (root / "sbatch.out").read_text()
    log = (run_dir / "launcher.log").read_text()
    assert results(root) == {"wide": ["finished", "", 1, 0]}, log[-3000:]
    assert "DP=2 TP=1 ZeRO=2" in log
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert max(r["step"] for r in records) == 8
    # one ZeRO-2 optimizer partition per rank, written by ranks on two different nodes
    assert len(list((run_dir / "checkpoints" / "global_step8").glob("*optim_states.pt"))) == 2


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_whole_lag_run_inside_sbatch(cluster, tmp_path):
    """The user's command inside ``sbatch -N2``: ``launch_scripts/ul2_grow.sh`` reads the SLURM
    allocation and runs base pretraining, the race and the promotion as job steps (``srun``, no
    ssh): the two candidates at the same time, one per node; base and winner spanning both."""
    from test_launch_faults_real import JOB_ENV, write_tiny_config

    config = write_tiny_config(tmp_path)
    out = tmp_path / "out"
    knobs = {"PYTHON": PY, "OUT_DIR": str(out), "TRAIN_CONFIG": str(config), "BASE_STEPS": "4",
             "GROW_LAYERS": "1", "SPACE": "starts0=0;blocks=1;inits=duplicate,random",
             "LAG_STEPS": "4", "EVAL_INTERVAL": "2", "TOTAL_STEPS": "10", "SLOTS_PER_SLICE": "1",
             "HANG_TIMEOUT": "240", "GLOO_SOCKET_IFNAME": slurm_cluster.IFNAME,
             "TORCH_EXTENSIONS_DIR": JOB_ENV["TORCH_EXTENSIONS_DIR"]}
    exports = "".join(f"export {k}='{v}'\n" for k, v in knobs.items())
    repo = Path(__file__).resolve().parents[1]
    job = cluster.sbatch(["-N2", "--ntasks-per-node=1"],
                         f"{exports}cd {repo}\nexec bash launch_scripts/ul2_grow.sh\n",
                         output=tmp_path / "sbatch.out", env=_env())
    state = cluster.wait(job, timeout=900)
    assert state == "COMPLETED", (tmp_path / "sbatch.out").read_text()[-5000:]

    both = "slurmn1:0@slurmn2:0"
    for phase in ("base", "promoted"):  # one job step spanning both nodes, DP=2 across them
        launches = [r for r in _records(out / f"journal-{phase}.jsonl") if r["state"] == "running"]
        assert [r["include"] for r in launches] == [both], launches
    for log in (out / "base/launcher.log", out / "promoted/run/launcher.log"):
        text = log.read_text()
        assert "srun --overlap" in text and "DP=2 TP=1" in text, text[-2000:]

    race = _records(out / "journal-candidates.jsonl")
    started = {r["candidate"]: r for r in race if r["state"] == "running"}
    finished = {r["candidate"]: r for r in race if r["state"] == "finished"}
    assert sorted(r["include"] for r in started.values()) == ["slurmn1:0", "slurmn2:0"]
    (a, b) = sorted(started)
    assert started[a]["time"] < finished[b]["time"] and started[b]["time"] < finished[a]["time"]
    for name in started:  # no candidate was started through the deepspeed runner (pdsh/ssh)
        first = (out / "candidates" / name / "run/launcher.log").read_text().splitlines()[0]
        assert "srun --overlap" in first and "pdsh" not in first and "ssh" not in first

    selection = json.loads((out / "selection.json").read_text())
    at_k = {name: next(r["val/loss"] for r in
                       _records(out / "candidates" / name / "run/metrics.jsonl")
                       if r["step"] == selection["decision_step"] and "val/loss" in r)
            for name in started}
    assert selection["winner"] == min(at_k, key=at_k.get)
    promoted = _records(out / "promoted/run/metrics.jsonl")
    assert max(r["step"] for r in promoted) == 10
    # continued from the winner's step-k checkpoint: the first trained step is k + 1
    trained = [r["step"] for r in promoted if "train/loss" in r]
    assert min(trained) == selection["decision_step"] + 1
