"""Run candidate jobs in waves over the slices of an allocation, supervise them, survive restarts.

LAG trains n grown candidates for k steps each; usually n exceeds the number of slices, so jobs
queue and the next starts as soon as a slice frees.  Each job runs in its own process group with
its own master port, run directory and ``launcher.log``.

Supervision (RELIABILITY item 7) -- a failure is recorded with its reason and the siblings go on:

* exit code 0 -> finished; 3 -> failed "non-finite loss" (the trainer's own NaN exit);
  anything else -> failed "exit code N";
* no new metrics record for ``hang_timeout_s`` -> first the ranks' stacks (SIGUSR1 to the
  processes that catch it, up to ``stack_dump_s`` to answer, see ``diagnose.py``), then SIGTERM to
  the group, SIGKILL after ``kill_grace_s`` -> failed "hung: no progress for Ns; <what the ranks
  waited on>; stacks in RUN_DIR/stack-rank*.txt" (the timeout must cover checkpoint I/O; until
  a launch's first record ``startup_timeout_s`` applies instead, default the same: it must cover
  start-up, e.g. imports on a loaded box and DeepSpeed's first JIT build);
* a NaN/inf train or val loss in ``metrics.jsonl`` -> stopped the same way -> failed
  "non-finite loss at step S";
* stale JIT-build locks (``jit_build.py``) under the jobs' torch extension roots are removed
  before each launch, after each job ends, every ``LOCK_SWEEP_S`` and when a job is found hung,
  so that a process killed while holding one (a job, or anything else) never stalls the others;
* crashes and hangs are retried up to ``max_retries`` times (transient: a node, a port, a
  filesystem hiccup); non-finite losses are not -- the same data and seed diverge again.

Resume (RELIABILITY item 8): every state change goes to the :class:`Journal` first.  Re-running
with the same journal skips finished/failed candidates; for one recorded as launching/running it
looks for the live job (pid file + command line, see ``process.py``) and *adopts* it -- keeps
polling it, starts no duplicate; if the job is gone, its exit file says how it ended, and with no
exit file, or one saying a signal killed it (as ``scancel`` of the allocation does to everything
at once), it is started again (the trainer resumes from its own checkpoint).  A lock file keeps
two orchestrators off one journal.

Example::

    >>> results = run_jobs(jobs, Allocation.local(2), slots_per_slice=1,
    ...                    journal_path=Path("runs/lag/journal.jsonl"), hang_timeout_s=600,
    ...                    max_retries=1, poll_interval_s=1.0, launcher="deepspeed",
    ...                    progress=ProgressReporter())              # doctest: +SKIP
    >>> {n: r.state for n, r in results.items()}                     # doctest: +SKIP
    {'dup_last': 'finished', 'random_init': 'failed'}
"""

from __future__ import annotations

import collections
import dataclasses
import fcntl
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lag_ds.launch import diagnose
from lag_ds.launch.allocation import Allocation, Slice
from lag_ds.launch.jit_build import (
    clear_stale_locks,
    extension_root,
    find_build_locks,
    inspect_lock,
)
from lag_ds.launch.jobs import (
    DEFAULT_BASE_PORT,
    JobSpec,
    Launcher,
    build_command,
    build_env,
    pick_port,
    remote_env_text,
)
from lag_ds.launch.journal import Journal, JournalRecord
from lag_ds.launch.process import (
    ProcessHandle,
    find_live_job,
    group_members,
    is_alive,
    kill_leftovers,
    read_exit_code,
    signal_group,
    spawn,
)
from lag_ds.launch.progress import ProgressReporter, ProgressRow
from lag_ds.launch.shm_segments import clear_stale_segments
from lag_ds.launch.watch import MetricsWatcher, last_status_line

NON_FINITE_EXIT_CODE = 3
LOCK_SWEEP_S = 10.0
"""How often running jobs' extension roots are checked for stale JIT-build locks (cheap: a glob,
and a /proc scan only when a lock file exists)."""


def _signal_death(code: int) -> bool:
    """Exit status of a process killed by a signal (negative from Popen, 128+N from a shell)."""
    return code < 0 or 128 < code <= 128 + 64


@dataclass(frozen=True, kw_only=True)
class JobResult:
    """How a candidate ended."""

    name: str
    state: str
    """``finished`` or ``failed``."""
    reason: str
    attempt: int
    exit_code: int | None
    run_dir: Path


@dataclass(kw_only=True)
class _Active:
    job: JobSpec
    slice_: Slice
    port: int | None
    handle: ProcessHandle
    attempt: int
    watcher: MetricsWatcher
    last_progress: float
    stop_reason: str | None = None
    stop_retryable: bool = False
    kill_at: float | None = None
    stacks: diagnose.StackRequest | None = None
    """Set while the ranks of a hung job are dumping their stacks."""
    started: float = dataclasses.field(default_factory=time.monotonic)

    def eta_s(self) -> float | None:
        """Seconds to the job's ``total_steps`` at its measured speed."""
        w, total = self.watcher, self.job.total_steps
        if total is None or w.last_step is None or w.steps_per_s is None:
            return None
        return max(0.0, (total - w.last_step) / w.steps_per_s)


@contextmanager
def _journal_lock(journal_path: Path) -> Iterator[None]:
    journal_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(f"{journal_path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"run_jobs: {journal_path} is in use by another orchestrator") \
                from None
        yield
    finally:
        os.close(fd)


class _Supervisor:
    def __init__(self, jobs: Sequence[JobSpec], slices: list[Slice], *, journal: Journal,
                 hostfile: Path | None, hang_timeout_s: float, max_retries: int,
                 poll_interval_s: float, launcher: Launcher, progress: ProgressReporter | None,
                 base_port: int, kill_grace_s: float, ssh_check: bool,
                 stack_dump_s: float, startup_timeout_s: float) -> None:
        self.jobs = {j.name: j for j in jobs}
        self.slices = slices
        self.journal = journal
        self.hostfile = hostfile
        self.hang_timeout_s = hang_timeout_s
        self.max_retries = max_retries
        self.poll_interval_s = poll_interval_s
        self.launcher = launcher
        self.progress = progress
        self.base_port = base_port
        self.kill_grace_s = kill_grace_s
        self.ssh_check = ssh_check
        self.stack_dump_s = stack_dump_s
        self.startup_timeout_s = startup_timeout_s
        self.lock_roots = sorted({extension_root({**os.environ, **j.env}) for j in jobs})
        self.queue: collections.deque[str] = collections.deque()
        self.attempts: dict[str, int] = {}
        self.waiting_reason: dict[str, str] = {}
        self.active: list[_Active] = []
        self.free: list[Slice] = list(slices)
        self.results: dict[str, JobResult] = {}
        self.durations: list[float] = []  # wall seconds of jobs that finished under our watch

    # ---- resume -------------------------------------------------------------------------------

    def resume(self) -> None:
        latest = self.journal.replay()
        for name, job in self.jobs.items():
            rec = latest.get(name)
            live = find_live_job(exit_path=job.exit_path, pid_path=job.pid_path)
            if rec is None:
                if live is not None:
                    raise RuntimeError(f"run_jobs: {name} is running (pid {live.pid}) but "
                                       f"{self.journal.path} does not know it; stop it or "
                                       "restore the journal")
                self._record(name, "pending", attempt=1)
                self._enqueue(name, attempt=1, reason="")
            elif rec.is_final:
                self.results[name] = JobResult(name=name, state=rec.state, reason=rec.reason,
                                               attempt=rec.attempt, exit_code=rec.exit_code,
                                               run_dir=job.run_dir)
            elif live is not None:
                self._adopt(job, rec, live)
            elif rec.state == "running" or rec.reason == "launching":
                if rec.pgid is not None and rec.start_ticks is not None:
                    kill_leftovers(rec.pgid, started_since=rec.start_ticks)
                code = read_exit_code(job.exit_path)
                if code is not None and not _signal_death(code):  # ended while nobody watched
                    watcher = MetricsWatcher(job.metrics_path)
                    bad = self._read_metrics(watcher)
                    verdict = (("failed", bad, False) if bad
                               else self._judge_exit(code, watcher, job.log_path))
                    self._conclude(job, rec.attempt, *verdict, code)
                else:
                    # Killed by a signal while the orchestrator was gone too: most likely by
                    # what ended the orchestrator (scancel of the allocation, a lost node, a
                    # Ctrl-C to the group), not the candidate's own failure -- restart it; the
                    # trainer resumes from its checkpoint.
                    reason = ("restart: process gone without a recorded end" if code is None else
                              f"restart: ended by a signal (exit code {code}) while the "
                              "orchestrator was down")
                    self._record(name, "pending", attempt=rec.attempt, reason=reason,
                                 exit_code=code)
                    self._enqueue(name, attempt=rec.attempt, reason=reason)
            else:
                self._enqueue(name, attempt=rec.attempt, reason=rec.reason)

    def _adopt(self, job: JobSpec, rec: JournalRecord, handle: ProcessHandle) -> None:
        slice_ = next((s for s in self.free if s.include == rec.include), None)
        if slice_ is None:
            raise RuntimeError(f"run_jobs: {job.name} runs (pid {handle.pid}) on slice "
                               f"{rec.include!r}, which is not a free slice of this allocation")
        self.free.remove(slice_)
        if rec.state != "running":  # the orchestrator died between spawn and journaling it
            self._record(job.name, "running", attempt=rec.attempt, pid=handle.pid,
                         pgid=handle.pgid, start_ticks=handle.start_ticks, port=rec.port,
                         include=slice_.include, reason="adopted")
        self.attempts[job.name] = rec.attempt
        self.active.append(_Active(job=job, slice_=slice_, port=rec.port, handle=handle,
                                   attempt=rec.attempt, watcher=MetricsWatcher(job.metrics_path),
                                   last_progress=time.monotonic()))

    # ---- launching ----------------------------------------------------------------------------

    def _enqueue(self, name: str, *, attempt: int, reason: str) -> None:
        self.attempts[name] = attempt
        self.waiting_reason[name] = reason
        self.queue.append(name)

    def _record(self, name: str, state: str, *, attempt: int, **fields) -> None:
        self.journal.append(JournalRecord(candidate=name, state=state, attempt=attempt, **fields))

    def _launch(self, name: str, slice_: Slice) -> None:
        job, attempt = self.jobs[name], self.attempts[name]
        port = pick_port(base_port=self.base_port, offset=slice_.index, stride=len(self.slices),
                         in_use={a.port for a in self.active if a.port is not None})
        argv = build_command(job, slice_, master_port=port, hostfile_path=self.hostfile,
                             launcher=self.launcher, ssh_check=self.ssh_check)
        env = build_env(job, slice_, master_port=port, launcher=self.launcher)
        job.run_dir.mkdir(parents=True, exist_ok=True)
        if not slice_.is_local:
            job.remote_env_path.write_text(remote_env_text(job))
        # Stale status files go *before* the launch is journaled: whatever is found there after
        # a crash then belongs to this launch.
        job.exit_path.unlink(missing_ok=True)
        job.pid_path.unlink(missing_ok=True)
        self._record(name, "pending", attempt=attempt, port=port, include=slice_.include,
                     reason="launching")
        handle = spawn(argv, env=env, log_path=job.log_path, exit_path=job.exit_path,
                       pid_path=job.pid_path)
        self._record(name, "running", attempt=attempt, pid=handle.pid, pgid=handle.pgid,
                     start_ticks=handle.start_ticks, port=port, include=slice_.include)
        self.active.append(_Active(job=job, slice_=slice_, port=port, handle=handle,
                                   attempt=attempt, watcher=MetricsWatcher(job.metrics_path),
                                   last_progress=time.monotonic()))

    # ---- supervision --------------------------------------------------------------------------

    @staticmethod
    def _read_metrics(watcher: MetricsWatcher) -> str | None:
        """Poll the watcher; returns a failure reason for an unreadable metrics file."""
        try:
            watcher.poll()
        except ValueError as err:
            return f"unreadable metrics: {err}"
        return None

    @staticmethod
    def _judge_exit(code: int | None, watcher: MetricsWatcher,
                    log_path: Path | None = None) -> tuple[str, str, bool]:
        """(state, reason, retryable) for a job that ended on its own.

        A crash's reason names a signal (the wrapper's shell reports 128 + N) and ends with the
        last error line of this attempt's ``launcher.log`` (e.g. the exception of a failed
        checkpoint save), so that a failure can be told apart without opening the log.
        """
        if code == 0 and watcher.non_finite is None:
            return "finished", "", False
        if code == NON_FINITE_EXIT_CODE:
            return "failed", "non-finite loss", False
        if watcher.non_finite is not None:
            return "failed", f"non-finite loss at step {watcher.non_finite[0]}", False
        if code is None:
            return "failed", "ended without an exit status", True
        if code < 0:
            return "failed", f"killed by signal {-code}", True
        reason = f"exit code {code}"
        if 128 < code <= 128 + 64:
            try:
                reason += f" ({signal.Signals(code - 128).name})"
            except ValueError:
                pass
        error = diagnose.last_error_line(log_path) if log_path is not None else None
        return "failed", reason + (f": {error}" if error else ""), True

    def _stop(self, a: _Active, reason: str, *, retryable: bool) -> None:
        a.stop_reason, a.stop_retryable = reason, retryable
        a.kill_at = time.monotonic() + self.kill_grace_s
        signal_group(a.handle.pgid, signal.SIGTERM)

    def _check(self, a: _Active) -> None:
        alive = is_alive(a.handle)
        if not alive and a.stop_reason is not None:
            # Being stopped: the ranks get their grace period even when the wrapper (or the
            # DeepSpeed runner) died of the SIGTERM at once.
            alive = bool(group_members(a.handle.pgid, started_since=a.handle.start_ticks))
        before = a.watcher.records_seen
        bad = self._read_metrics(a.watcher)
        now = time.monotonic()
        if a.watcher.records_seen > before:
            a.last_progress = now
        if not alive:
            self._ended(a)
        elif a.stop_reason is not None:
            if a.kill_at is not None and now >= a.kill_at:
                signal_group(a.handle.pgid, signal.SIGKILL)
                a.kill_at = None
        elif bad is not None:
            self._stop(a, bad, retryable=False)
        elif a.watcher.non_finite is not None:
            self._stop(a, f"non-finite loss at step {a.watcher.non_finite[0]}", retryable=False)
        elif a.stacks is not None:
            if a.stacks.done():
                self._stop(a, self._hang_reason(a), retryable=True)
        elif now - a.last_progress > self._timeout(a):
            members = group_members(a.handle.pgid, started_since=a.handle.start_ticks)
            a.stacks = diagnose.StackRequest.send(members, run_dir=a.job.run_dir,
                                                  wait_s=self.stack_dump_s)

    def _timeout(self, a: _Active) -> float:
        """No-progress limit: start-up until the launch's first record, then the hang timeout."""
        return self.hang_timeout_s if a.watcher.records_seen else self.startup_timeout_s

    def _sweep_locks(self) -> list[str]:
        """Remove stale JIT-build locks under the jobs' extension roots; say so on stderr."""
        messages = []
        for root in self.lock_roots:
            messages += clear_stale_locks(root)
        for message in messages:
            print(f"lag_ds.launch: {message}", file=sys.stderr, flush=True)
        return messages

    @staticmethod
    def _sweep_shm() -> None:
        """Remove DeepSpeed shm segments on this host that no live process maps (shm_segments.py)."""
        for message in clear_stale_segments():
            print(f"lag_ds.launch: {message}", file=sys.stderr, flush=True)

    def _hang_reason(self, a: _Active) -> str:
        """What the hung job waited on (its stacks, the build locks), logged to launcher.log."""
        dumps = a.stacks.collect()
        notes = []
        if any(diagnose.summarize_stack(t) == diagnose.LOCK_WAIT for t in dumps.values()):
            for path in find_build_locks(extension_root({**os.environ, **a.job.env})):
                info = inspect_lock(path)
                if info is not None and (info.holders or info.builders):  # stale: swept below
                    notes.append(f"lock {info.path}: {info.describe()}")
        notes += [f"{m} while diagnosing" for m in self._sweep_locks()]
        hint = diagnose.hang_hint(dumps, stopped=a.stacks.stopped, signalled=a.stacks.signalled,
                                  run_dir=a.job.run_dir, lock_notes=notes)
        reason = f"hung: no progress for {self._timeout(a):g}s; {hint}"
        diagnose.log_dumps(a.job.log_path, reason, dumps)
        a.stacks = None
        return reason

    def _ended(self, a: _Active) -> None:
        kill_leftovers(a.handle.pgid, started_since=a.handle.start_ticks)
        self._sweep_locks()  # it may have died holding a build lock others now wait on
        self._sweep_shm()  # killed during start-up, its ranks may not have unlinked their segments
        self.active.remove(a)
        if a.stop_reason is None:
            self.durations.append(time.monotonic() - a.started)
        self.free.append(a.slice_)
        self.free.sort(key=lambda s: s.index)
        code = read_exit_code(a.job.exit_path)
        if code is None and a.handle.popen is not None:
            code = a.handle.popen.returncode
        if a.stop_reason is not None:
            self._conclude(a.job, a.attempt, "failed", a.stop_reason, a.stop_retryable, code)
        else:
            self._conclude(a.job, a.attempt, *self._judge_exit(code, a.watcher, a.job.log_path),
                           code)

    def _conclude(self, job: JobSpec, attempt: int, state: str, reason: str, retryable: bool,
                  code: int | None) -> None:
        if state == "failed" and retryable and attempt <= self.max_retries:
            why = f"retry after: {reason}"
            self._record(job.name, "pending", attempt=attempt + 1, reason=why, exit_code=code)
            self._enqueue(job.name, attempt=attempt + 1, reason=why)
            return
        self._record(job.name, state, attempt=attempt, reason=reason, exit_code=code)
        self.results[job.name] = JobResult(name=job.name, state=state, reason=reason,
                                           attempt=attempt, exit_code=code, run_dir=job.run_dir)

    # ---- main loop ----------------------------------------------------------------------------

    def _rows(self) -> list[ProgressRow]:
        active = {a.job.name: a for a in self.active}
        rows = []
        for name in self.jobs:
            attempt = self.attempts.get(name, 1)
            if name in self.results:
                r = self.results[name]
                rows.append(ProgressRow(name=name, state=r.state, attempt=r.attempt,
                                        reason=r.reason))
            elif name in active:
                a = active[name]
                w = a.watcher
                done = None if w.first_step is None else w.last_step - w.first_step
                status = ""
                if w.last_step is None and a.job.status_prefix:
                    status = last_status_line(a.job.log_path, a.job.status_prefix) or ""
                rows.append(ProgressRow(
                    name=name, state="stopping" if a.stop_reason else "running", attempt=attempt,
                    steps_done=done, last_step=w.last_step, last_val_loss=w.last_val_loss,
                    reason=a.stop_reason or "", total_step=a.job.total_steps,
                    train_loss=w.last_train_loss, tokens_per_s=w.last_tokens_per_s,
                    eta_s=a.eta_s(), status=status))
            else:
                rows.append(ProgressRow(name=name, state="waiting", attempt=attempt,
                                        reason=self.waiting_reason.get(name, "")))
        return rows

    def phase_eta_s(self) -> float | None:
        """Seconds until every job has ended, if the jobs keep their measured pace: the running
        jobs' remaining time, then the queue in waves of ``len(slices)`` jobs, each lasting as
        long as the finished ones did (start-up included); None while nothing is measured."""
        now = time.monotonic()
        remaining = [a.eta_s() for a in self.active]
        durations = list(self.durations) or [now - a.started + r for a, r in
                                             zip(self.active, remaining) if r is not None]
        if not durations:
            return None
        per_job = sum(durations) / len(durations)
        running = [r if r is not None else max(0.0, per_job - (now - a.started))
                   for a, r in zip(self.active, remaining)]
        waves = -(-len(self.queue) // len(self.slices))
        return max(running, default=0.0) + waves * per_job

    def run(self) -> dict[str, JobResult]:
        shown: tuple = ()
        last_sweep = time.monotonic()
        self._sweep_shm()
        while self.queue or self.active:
            if (self.queue and self.free) or time.monotonic() - last_sweep >= LOCK_SWEEP_S:
                self._sweep_locks()
                last_sweep = time.monotonic()
            while self.queue and self.free:
                self._launch(self.queue.popleft(), self.free.pop(0))
            time.sleep(self.poll_interval_s)
            for a in list(self.active):
                self._check(a)
            if self.progress is not None:
                rows = self._rows()
                key = tuple((r.state, r.attempt) for r in rows)
                self.progress.update(rows, force=key != shown, phase_eta_s=self.phase_eta_s())
                shown = key
        return {name: self.results[name] for name in self.jobs}


def run_jobs(jobs: Sequence[JobSpec], allocation: Allocation, *, slots_per_slice: int,
             journal_path: str | Path, hang_timeout_s: float = 600.0, max_retries: int = 0,
             poll_interval_s: float = 1.0, launcher: Launcher = "deepspeed",
             progress: ProgressReporter | None = None, base_port: int = DEFAULT_BASE_PORT,
             kill_grace_s: float = 10.0, ssh_check: bool = True,
             stack_dump_s: float = 5.0,
             startup_timeout_s: float | None = None) -> dict[str, JobResult]:
    """Run every job to an end (finished or failed) and return the results by name.

    Re-running with the same ``journal_path`` resumes: see the module docstring.
    ``startup_timeout_s`` (default ``hang_timeout_s``) is the no-progress limit until a launch's
    first metrics record; ``stack_dump_s`` how long a hung job's ranks get to dump their stacks.
    """
    startup_timeout_s = hang_timeout_s if startup_timeout_s is None else startup_timeout_s
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"run_jobs: duplicate job names in {names}")
    run_dirs = [j.run_dir.resolve() for j in jobs]
    if len(set(run_dirs)) != len(run_dirs):
        raise ValueError("run_jobs: two jobs share a run_dir")
    for arg, value in (("hang_timeout_s", hang_timeout_s), ("poll_interval_s", poll_interval_s),
                       ("kill_grace_s", kill_grace_s), ("stack_dump_s", stack_dump_s),
                       ("startup_timeout_s", startup_timeout_s)):
        if not value > 0:
            raise ValueError(f"run_jobs: {arg} must be > 0, got {value}")
    if max_retries < 0:
        raise ValueError(f"run_jobs: max_retries must be >= 0, got {max_retries}")
    slices = allocation.split(slots_per_slice)
    journal_path = Path(journal_path)
    with _journal_lock(journal_path):
        hostfile = None
        if not all(s.is_local for s in slices):
            hostfile = journal_path.with_suffix(".hostfile")  # never the user's own hostfile
            tmp = hostfile.with_suffix(".hostfile.tmp")
            tmp.write_text(allocation.hostfile_text())
            os.replace(tmp, hostfile)
        sup = _Supervisor(jobs, slices, journal=Journal(journal_path), hostfile=hostfile,
                          hang_timeout_s=hang_timeout_s, max_retries=max_retries,
                          poll_interval_s=poll_interval_s, launcher=launcher, progress=progress,
                          base_port=base_port, kill_grace_s=kill_grace_s, ssh_check=ssh_check,
                          stack_dump_s=stack_dump_s, startup_timeout_s=startup_timeout_s)
        sup.resume()
        return sup.run()
