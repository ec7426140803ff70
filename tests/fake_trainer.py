"""A stand-in for the trainer: writes metrics.jsonl exactly as the contract says, in milliseconds.

No torch, no deepspeed: it starts in ~30 ms, so supervision tests (waves, crashes, hangs, NaN,
resume after SIGKILL) run fast.  The curve is ``loss0 - loss_slope * steps_done`` so the LAG
winner is predictable.  Only rank 0 writes metrics (as the real trainer does); every rank appends
one line to ``launches.jsonl`` so tests can count launches and check the rank environment.

It "checkpoints" its step to ``ckpt.json`` at every eval and resumes from there, like the trainer
resuming from its own checkpoint after a restart.

Modes: ``ok``; ``crash`` (exit 1 at --fail-at); ``hang`` (stop writing and sleep at --fail-at);
``nan`` (losses become NaN at --fail-at and it keeps going -- the supervisor must stop it);
``nan-exit`` (exits 3 at --fail-at, as the trainer does on a non-finite loss);
``jit-lock`` (at --fail-at, takes torch's JIT-build lock ``$TORCH_EXTENSIONS_DIR/fake_op/lock``
with torch's own ``FileBaton`` -- or waits on it, as every DeepSpeed rank does when it loads an op
-- holds it ``--lock-hold`` s, then goes on); ``die-holding-lock`` (takes that lock at --fail-at
and SIGKILLs itself, leaving a stale lock).  ``--lock-delay`` sleeps before taking the lock.

Like the trainer, it dumps its stacks on SIGUSR1 to ``$LAG_DS_STACK_DUMP_DIR/stack-rank<R>.txt``.

Usable from tests via :func:`job` (builds a ``JobSpec`` that runs this file).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
MODES = ["ok", "crash", "hang", "nan", "nan-exit", "jit-lock", "die-holding-lock"]


def file_baton_class():
    """torch's ``FileBaton``, loaded from its file without importing torch (which takes ~2 s)."""
    import importlib.util

    torch_dir = Path(importlib.util.find_spec("torch").origin).parent
    spec = importlib.util.spec_from_file_location("torch_file_baton",
                                                  torch_dir / "utils" / "file_baton.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FileBaton


def _diagnose_module():
    """``lag_ds/launch/diagnose.py`` loaded by itself (stdlib only): importing the ``lag_ds``
    package would slow every start-up of this stand-in."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "lag_ds_launch_diagnose", HERE.parents[1] / "lag_ds" / "launch" / "diagnose.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def build_lock_path() -> Path:
    return Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "fake_op" / "lock"


def take_build_lock(*, hold_s: float, die: bool) -> None:
    """What ``torch.utils.cpp_extension._jit_compile`` does around a build."""
    lock = build_lock_path()
    lock.parent.mkdir(parents=True, exist_ok=True)
    baton = file_baton_class()(str(lock))
    if baton.try_acquire():
        if die:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(hold_s)
        baton.release()
    else:
        baton.wait()


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--start-step", type=int, default=0)
    p.add_argument("--eval-interval", type=int, default=5)
    p.add_argument("--sleep-per-step", type=float, default=0.0)
    p.add_argument("--loss0", type=float, default=3.0)
    p.add_argument("--loss-slope", type=float, default=0.01)
    p.add_argument("--mode", choices=MODES, default="ok")
    p.add_argument("--fail-at", type=int, default=None, help="steps done when the mode kicks in")
    p.add_argument("--ignore-sigterm", action="store_true")
    p.add_argument("--lock-hold", type=float, default=0.0)
    p.add_argument("--lock-delay", type=float, default=0.0)
    p.add_argument("--only-first-launch", action="store_true",
                   help="apply --mode only on the first launch (a transient failure)")
    p.add_argument("--local_rank", type=int, default=None)  # passed by the DeepSpeed launcher
    args = p.parse_args(argv)
    _diagnose_module().register_stack_dump()
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    rank = int(os.environ.get("RANK", "0"))
    run_dir: Path = args.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    _append(run_dir / "launches.jsonl", {
        "pid": os.getpid(), "rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "local_rank": os.environ.get("LOCAL_RANK"), "local_rank_arg": args.local_rank,
        "master_port": os.environ.get("MASTER_PORT"), "time": time.time(),
        "env_probe": os.environ.get("FAKE_PROBE"), "host": socket.gethostname(),
        "master_addr": os.environ.get("MASTER_ADDR"), "local_size": os.environ.get("LOCAL_SIZE"),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")})
    fail_at = args.steps // 2 if args.fail_at is None else args.fail_at
    if args.only_first_launch and len(launches(run_dir, rank)) > 1:
        args.mode = "ok"
    metrics = run_dir / "metrics.jsonl"
    ckpt = run_dir / "ckpt.json"
    start = args.start_step

    def loss(done: int) -> float:
        if args.mode == "nan" and done >= fail_at:
            return float("nan")
        return args.loss0 - args.loss_slope * done

    def write(record: dict) -> None:
        if rank == 0:
            _append(metrics, {"wall_time": time.time(), **record})

    done = json.loads(ckpt.read_text())["step"] - start if ckpt.exists() else 0
    if done == 0:
        write({"step": start, "val/loss": loss(0), "val/loss/causal": loss(0)})  # LAG@0
    while done < args.steps:
        if done == fail_at:
            if args.mode == "crash":
                print(f"fake_trainer: crashing at step {start + done}", file=sys.stderr)
                return 1
            if args.mode == "hang":
                time.sleep(3600)
            if args.mode in ("jit-lock", "die-holding-lock"):
                time.sleep(args.lock_delay)
                take_build_lock(hold_s=args.lock_hold, die=args.mode == "die-holding-lock")
            if args.mode == "nan-exit":  # the trainer's own check fired before logging
                print(f"fake_trainer: non-finite loss at step {start + done}", file=sys.stderr)
                return 3
        time.sleep(args.sleep_per_step)
        done += 1
        write({"step": start + done, "train/loss": loss(done) + 0.05, "train/lr": 1e-4})
        if done % args.eval_interval == 0 or done == args.steps:
            write({"step": start + done, "val/loss": loss(done)})
            if rank == 0:
                tmp = ckpt.with_suffix(".tmp")
                tmp.write_text(json.dumps({"step": start + done}))
                os.replace(tmp, ckpt)
    if rank == 0:
        (run_dir / "done").write_text(json.dumps({"step": start + done, "time": time.time()}))
    return 0


def job(root: Path, name: str, *, launcher_env: dict | None = None, **options):
    """A ``JobSpec`` running this file in ``root/name`` with ``--option value`` flags."""
    from lag_ds.launch import JobSpec

    run_dir = root / name
    args = ["--run-dir", str(run_dir)]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not False:
            args += [flag, str(value)]
    return JobSpec(name=name, script=str(HERE), args=args, run_dir=run_dir,
                   env=launcher_env or {})


def launches(run_dir: Path, rank: int = 0) -> list[dict]:
    """Launch records of ``rank`` (one per process start)."""
    path = Path(run_dir) / "launches.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in records if r["rank"] == rank]


if __name__ == "__main__":
    sys.exit(main())
