"""Real multi-node runs: two ssh hosts made of network namespaces, the stock DeepSpeed runner.

``netns_hosts`` builds hosts 10.77.0.1 and 10.77.0.2 (namespaces ``lagn1``/``lagn2`` on a bridge,
one sshd each) and tears them down afterwards.  The orchestrator -- ``run_jobs`` in this very
process -- stays in the root namespace, which reaches both hosts through the bridge; the DeepSpeed
runner it starts ssh-es (``ssh`` check, then ``pdsh -R ssh``) into the hosts, and the ranks run
there, talking gloo over each namespace's ``eth0``.  pdsh prefixes every line a host prints with
that host's address, which is how the logs show where each rank ran.

What is asserted:

* two candidates, one slot each, run at the same time, one per host, both to the last step;
* one DP=2 ZeRO-2 job spans both hosts, writes one optimizer partition per rank, and its losses
  equal those of the same run with two local ranks (same samples in the same order).

Skipped only where the hosts cannot be built at all: not root, pdsh/sshd missing (``.ci/run``
installs them), or no permission to create a network namespace.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import netns_hosts as nh
import pytest
import yaml
from conftest import BIN, REPO, deepspeed_env

from lag_ds.launch import Allocation, JobSpec, Journal, run_jobs

pytestmark = pytest.mark.slow

TINY = REPO / "launch_scripts/configs/tiny_base.yaml"
STEPS = 4
# pdsh's remote environment is a fresh ssh login: the job's variables travel via --venv_script.
JOB_ENV = {"GLOO_SOCKET_IFNAME": nh.IFNAME, "OMP_NUM_THREADS": "1"}
RUN_KW = dict(hang_timeout_s=150, max_retries=0, poll_interval_s=0.2, launcher="deepspeed")


@pytest.fixture(scope="module")
def hosts():
    ctx = nh.two_hosts()
    try:
        up = ctx.__enter__()
    except nh.Unavailable as exc:
        pytest.skip(f"cannot build the two namespace hosts here: {exc}")
    try:
        yield up
    finally:
        ctx.__exit__(None, None, None)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("multinode")


@pytest.fixture(scope="module")
def hostfile(hosts, workdir) -> Path:
    path = workdir / "hostfile"
    path.write_text(hosts.hostfile_text(slots=1))
    return path


@pytest.fixture(scope="module")
def tiny_config(workdir) -> Path:
    """tiny_base.yaml, 4 steps, its data cache built once here (not raced for by the jobs)."""
    cfg = yaml.safe_load(TINY.read_text())
    cfg.update(cache_dir=str(workdir / "cache"), ds_config=str(REPO / "ds_configs/cpu_zero2.json"),
               train_steps=STEPS, save_interval=STEPS, eval_interval=2)
    path = workdir / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    from lag_ds.config import load_yaml
    from lag_ds.data import prepare_data
    from lag_ds.train.config import TrainConfig

    loaded = load_yaml(TrainConfig, path)
    prepare_data(loaded.data, Path(loaded.cache_dir))
    return path


def trainer_job(name: str, config: Path, run_dir: Path) -> JobSpec:
    return JobSpec(name=name, script="lag_ds.train", module=True, run_dir=run_dir, env=JOB_ENV,
                   args=["--config", str(config), "--set", f"run_dir={run_dir}"])


def train_losses(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in recs if "train/loss" in r}


def host_prefixes(log: Path) -> set[str]:
    """Addresses pdsh put in front of output lines ("10.77.0.2: ...")."""
    return {line.split(":", 1)[0] for line in log.read_text().splitlines()
            if line.startswith("10.77.0.")}


def spans(journal: Path) -> dict[str, tuple[float, float, str]]:
    """candidate -> (time of its running record, time of its final record, slice)."""
    out: dict[str, tuple[float, float, str]] = {}
    recs = Journal(journal).records()
    for rec in recs:
        if rec.state == "running":
            end = next(r.time for r in recs if r.candidate == rec.candidate and r.is_final)
            out[rec.candidate] = (rec.time, end, rec.include)
    return out


def describe(results, run_dirs) -> str:
    return "\n".join(f"--- {name}: {r.state} {r.reason}\n"
                     + (run_dirs[name] / "launcher.log").read_text()[-3000:]
                     for name, r in results.items())


def test_two_candidates_run_at_once_one_per_host(hosts, hostfile, tiny_config, workdir):
    root = workdir / "candidates"
    jobs = [trainer_job(f"cand{i}", tiny_config, root / f"cand{i}") for i in range(2)]
    results = run_jobs(jobs, Allocation.from_hostfile(hostfile), slots_per_slice=1,
                       journal_path=root / "journal.jsonl", **RUN_KW)
    run_dirs = {j.name: j.run_dir for j in jobs}
    assert {n: (r.state, r.exit_code) for n, r in results.items()} == {
        "cand0": ("finished", 0), "cand1": ("finished", 0)}, describe(results, run_dirs)

    timing = spans(root / "journal.jsonl")
    (start0, end0, include0), (start1, end1, include1) = timing["cand0"], timing["cand1"]
    assert start0 < end1 and start1 < end0, f"the candidates did not overlap: {timing}"
    assert (include0, include1) == (f"{hosts.addresses[0]}:0", f"{hosts.addresses[1]}:0")
    for job, address in zip(jobs, hosts.addresses):
        # Everything the job's rank printed came back through pdsh from its own host only.
        assert host_prefixes(job.log_path) == {address}, job.log_path.read_text()[-3000:]
        assert sorted(train_losses(job.run_dir)) == list(range(1, STEPS + 1))
        assert (job.run_dir / "checkpoints/latest").read_text() == f"global_step{STEPS}"


def test_one_job_spans_both_hosts(hosts, hostfile, tiny_config, workdir):
    root = workdir / "spanning"
    job = trainer_job("dp2", tiny_config, root / "dp2")
    results = run_jobs([job], Allocation.from_hostfile(hostfile), slots_per_slice=2,
                       journal_path=root / "journal.jsonl", **RUN_KW)
    assert (results["dp2"].state, results["dp2"].exit_code) == ("finished", 0), \
        describe(results, {"dp2": job.run_dir})
    ((_, _, include),) = spans(root / "journal.jsonl").values()
    assert include == f"{hosts.addresses[0]}:0@{hosts.addresses[1]}:0"
    log = job.log_path.read_text()
    assert host_prefixes(job.log_path) == set(hosts.addresses), log[-3000:]
    assert f"{hosts.addresses[0]}: [lag_ds]" in log and "DP=2" in log, log[-3000:]

    ckpt = job.run_dir / f"checkpoints/global_step{STEPS}"
    parts = sorted(p.name for p in ckpt.glob("zero_pp_rank_*_optim_states.pt"))
    assert parts == ["zero_pp_rank_0_mp_rank_00_optim_states.pt",
                     "zero_pp_rank_1_mp_rank_00_optim_states.pt"], sorted(ckpt.iterdir())

    # The same run with two local ranks (root namespace, no hostfile): same data order at DP=2.
    from lag_ds.train.distributed import free_port

    local = root / "local_dp2"
    proc = subprocess.run(
        [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
         "--module", "lag_ds.train", "--config", str(tiny_config), "--set", f"run_dir={local}"],
        cwd=REPO, env=deepspeed_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    across, here = train_losses(job.run_dir), train_losses(local)
    assert sorted(across) == sorted(here) == list(range(1, STEPS + 1))
    for step in here:
        assert across[step] == pytest.approx(here[step], rel=1e-4), step


def test_ul2_grow_sh_under_the_deepspeed_runner_with_a_hostfile(hosts, hostfile, tiny_config,
                                                                 workdir):
    """The user's command on a two-node allocation: `deepspeed --hostfile HF ul2_grow.sh`.

    The runner starts the script on both hosts through pdsh; rank 0 (on the first host)
    orchestrates with the allocation the runner resolved, the other rank exits.  Knobs travel
    the DeepSpeed way, in a `--venv_script` sourced on every host (pdsh forwards no other
    variables).  Base and promotion span both hosts; the two candidates run one per host.
    """
    import sys

    root = workdir / "ul2_grow"
    root.mkdir()
    out = root / "out"
    knobs = {"OUT_DIR": out, "TRAIN_CONFIG": tiny_config, "BASE_STEPS": STEPS, "GROW_LAYERS": 1,
             "SPACE": "starts0=1;blocks=1;inits=duplicate,random", "LAG_STEPS": 2,
             "EVAL_INTERVAL": 2, "TOTAL_STEPS": STEPS + 4, "SLOTS_PER_SLICE": 1,
             "HANG_TIMEOUT": 200, "GLOO_SOCKET_IFNAME": nh.IFNAME, "OMP_NUM_THREADS": 1}
    venv_script = root / "knobs.sh"
    venv_script.write_text("".join(f"export {k}='{v}'\n" for k, v in knobs.items()))
    cmd = [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--master_addr",
           hosts.addresses[0], "--venv_script", str(venv_script),
           str(REPO / "launch_scripts/ul2_grow.sh"), "--base-port", "29800"]
    env = deepspeed_env()
    env["PYTHON"] = sys.executable
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    a1, a2 = hosts.addresses
    assert f"allocation include:{a1}:0@{a2}:0" in proc.stdout + proc.stderr
    sel = json.loads((out / "selection.json").read_text())
    assert sel["extra"]["config"]["allocation"] == f"include:{a1}:0@{a2}:0"
    timing = spans(out / "journal-candidates.jsonl")
    (s0, e0, inc0), (s1, e1, inc1) = timing.values()
    assert s0 < e1 and s1 < e0, f"the candidates did not overlap: {timing}"
    assert {inc0, inc1} == {f"{a1}:0", f"{a2}:0"}
    for phase in ("base", "promoted"):
        ((_, _, include),) = spans(out / f"journal-{phase}.jsonl").values()
        assert include == f"{a1}:0@{a2}:0", phase
    promoted = [json.loads(line) for line in
                (out / "promoted/run/metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in promoted) == STEPS + 4
