"""Checkpoint surgery killed with SIGKILL at named points, and run onto a full disk (RELIABILITY #1, #9).

Sources are written by stock code: a ZeRO-2 megatron-core checkpoint saved by the trainer's
``checkpointing.save`` (``tests/dist/zero_save.py``), a DeepSpeed ``PipelineModule`` checkpoint
(``tests/dist/pipe_ckpt.py``, one rank) and a Hugging Face ``save_pretrained`` directory. Each case
runs ``tools/grow_checkpoint.py`` as a subprocess with ``LAG_DS_FAULT_POINT`` naming one point
(:mod:`lag_ds.faults`); the process must die by SIGKILL, the source stay byte-identical, the
destination be absent or complete (its manifest verifies); the same command re-run without the
hook completes and verifies, and leaves no ``.partial-*`` sibling.

The disk-full cases mount a small tmpfs (root only; skipped with the reason otherwise): the grow is
refused up front by the free-space check, or the disk is filled after the check
(``LAG_DS_FAULT_FILL``) so a write hits ENOSPC; either way one ``error:`` line naming the
destination, exit 2, nothing left behind. The trainer's own save gets the same two cases.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, deepspeed_env

from lag_ds.checkpoint.manifest import verify_manifest
from lag_ds.train.distributed import free_port

TOOL = REPO / "tools/grow_checkpoint.py"
ZERO_OP = "k=1,i0=0,b=1,init=zero"  # [0, 0*, 1]: copied and zeroed tensors and moments
PIPE_OP = "k=1,i0=1,b=1,init=random"  # [0, 1, 1*]: links, one written layer file
HF_OP = "k=1,i0=1,b=1,init=duplicate"


def _env(**extra: str) -> dict[str, str]:
    env = deepspeed_env()
    env.pop("LAG_DS_FAULT_POINT", None), env.pop("LAG_DS_FAULT_FILL", None)
    env.update(extra)
    return env


def _script(script: str, **extra: str) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "tests/dist" / script)], cwd=REPO,
                          env=_env(**extra), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def partials(dst: Path) -> list[str]:
    return sorted(p.name for p in dst.parent.glob(f".{dst.name}.partial-*"))


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fault_sources")
    _script("zero_save.py", MODE="save", STAGE="2", STEPS="2", DIR=str(root / "zero2"),
            OUT=str(root / "zero2.json"))
    _script("pipe_ckpt.py", MODE="save", STYLE="megatron", LAYERS="2", PP="1", STAGE="1",
            TRAIN_STEPS="2", DIR=str(root / "pipe"), OUT=str(root / "pipe_out"), RANK="0",
            WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=32)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "hf", max_shard_size="20KB")
    (root / "hf" / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    return {"zero2": root / "zero2", "pipe": root / "pipe", "hf": root / "hf"}


class ForkRunner:
    """Client of ``tests/fork_runner.py``: each run is a forked child calling the tool's
    ``main(argv)`` (see there why); the answer is shaped like ``subprocess.run``'s."""

    def __init__(self, root: Path) -> None:
        self.root, self.count = root, 0
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tests/fork_runner.py")],
                                     cwd=REPO, env=_env(), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self._answer() == "ready"

    def _answer(self) -> str:
        for line in self.proc.stdout:
            if line.startswith("FORKRUN "):
                return line.split(" ", 1)[1].strip()
        raise AssertionError(f"fork runner died (exit {self.proc.wait()})")

    def run(self, argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
        self.count += 1
        out = self.root / f"run{self.count}"
        self.proc.stdin.write(json.dumps({"argv": argv, "env": env, "out": str(out)}) + "\n")
        self.proc.stdin.flush()
        code = int(self._answer())
        return subprocess.CompletedProcess(argv, code, Path(f"{out}.out").read_text(),
                                           Path(f"{out}.err").read_text())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    forks = ForkRunner(tmp_path_factory.mktemp("fork_runs"))
    yield forks
    forks.close()


def grow(src: Path, dst: Path, op: str | None, *args: str, runner: ForkRunner | None = None,
         **env: str) -> subprocess.CompletedProcess:
    """The tool on ``src`` -> ``dst``: a fresh interpreter, or a child of ``runner``."""
    argv = ["--src", str(src), "--dst", str(dst), *(["--op", op] if op else []), "--no-progress",
            *args]
    if runner is not None:
        return runner.run(argv, env)
    return subprocess.run([sys.executable, str(TOOL), *argv], cwd=REPO, env=_env(**env),
                          capture_output=True, text=True, timeout=300)


# (source, operator, fault point), in the order a run reaches them
KILL_POINTS = [
    ("zero2", ZERO_OP, "atomic.before_partial"),  # validated, nothing written yet
    ("zero2", ZERO_OP, "atomic.partial_created"),  # empty partial directory
    ("zero2", ZERO_OP, "deepspeed.fp32_written"),  # first file, its moments not yet
    ("zero2", ZERO_OP, "deepspeed.param_written:5"),  # mid-way through the parameters
    ("zero2", ZERO_OP, "deepspeed.exp_avg_sq_written:10"),  # a new (zeroed) layer's moments
    ("zero2", ZERO_OP, "deepspeed.optimizer_state_written"),  # optimizer globals, no metadata
    ("zero2", ZERO_OP, "manifest.start"),  # every data file, no manifest
    ("zero2", ZERO_OP, "manifest.tmp_written"),  # complete manifest under its temporary name
    ("zero2", ZERO_OP, "atomic.before_fsync"),  # manifest in place, nothing fsynced
    ("zero2", ZERO_OP, "atomic.fsynced"),  # fsynced, not yet renamed
    ("zero2", ZERO_OP, "atomic.renamed"),  # renamed, parent not yet fsynced: complete
    ("pipe", PIPE_OP, "pipe.layer_linked:2"),  # during the hard-linking of layer files
    ("pipe", PIPE_OP, "pipe.layer_written"),  # the new (random) layer's file
    ("pipe", PIPE_OP, "pipe.param_written:7"),  # mid-way through the universal optimizer state
    ("pipe", PIPE_OP, "pipe.optimizer_state_written"),
    ("hf", HF_OP, "hf.file_copied"),  # tokenizer copied, no weights
    ("hf", HF_OP, "hf.shard_written"),  # the weights (one shard), no index yet
]


FRESH = {"atomic.fsynced", "pipe.layer_linked:2"}  # also from a fresh `python tools/...`


@pytest.mark.parametrize("name,op,point", KILL_POINTS, ids=[p[2] for p in KILL_POINTS])
def test_sigkill_leaves_source_intact_and_destination_absent_or_complete(sources, runner, tmp_path,
                                                                          name, op, point):
    src = sources[name]
    before = digest(src)
    dst = tmp_path / "grown"
    forks = None if point in FRESH else runner
    killed = grow(src, dst, op, runner=forks, LAG_DS_FAULT_POINT=point)
    assert killed.returncode == -9, (point, killed.returncode, killed.stderr[-2000:])
    assert digest(src) == before
    if point == "atomic.before_partial":
        assert partials(dst) == []
    if dst.exists():  # killed after the rename: it must be complete
        assert point == "atomic.renamed"
        assert verify_manifest(dst) == []
        check = subprocess.run([sys.executable, str(TOOL), "--verify", str(dst)], cwd=REPO,
                               env=_env(), capture_output=True, text=True, timeout=120)
        assert check.returncode == 0, check.stderr
        again = grow(src, dst, op, runner=forks)  # re-run: refuses to overwrite it
        assert again.returncode == 2 and "already exists" in again.stderr, again.stderr
    else:
        if point != "atomic.before_partial":
            assert len(partials(dst)) == 1  # what the kill left (removed by the next run)
        again = grow(src, dst, op, "--verify", runner=forks)
        assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
        assert f"{dst}: verified" in again.stdout
        assert verify_manifest(dst) == []
    assert partials(dst) == []
    assert digest(src) == before


@pytest.mark.parametrize("point", ["links.file_linked:3", "links.file_written"])
def test_sigkill_while_materialising_a_linked_candidate(sources, runner, tmp_path_factory,
                                                        tmp_path, point):
    """The orchestrator's candidates: hard links into a universal base, a few files written."""
    base = tmp_path_factory.getbasetemp() / "universal_base"
    if not base.exists():  # reshard only: native ZeRO-2 -> universal
        made = grow(sources["zero2"], base, None, "--target-tp", "1", runner=runner)
        assert made.returncode == 0, made.stderr[-2000:]
    before = digest(base)
    dst = tmp_path / "cand"
    argv = ["materialise", str(base), str(dst), "k=1,i0=0,b=1,init=random"]
    killed = runner.run(argv, {"LAG_DS_FAULT_POINT": point})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert digest(base) == before and not dst.exists() and len(partials(dst)) == 1
    again = runner.run(argv, {})
    assert again.returncode == 0, again.stderr[-2000:]
    assert verify_manifest(dst) == [] and partials(dst) == [] and digest(base) == before


# ------------------------------------------------------------------------------------ disk full
@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs mounted at ``tmp_path/disk``; ``resize(bytes)`` sets its size. Unmounted after."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {proc.stderr.strip()}")

    def resize(size: int) -> Path:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)
        return mnt

    try:
        yield resize
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def _used(mnt: Path) -> int:
    return shutil.disk_usage(mnt).used


def _one_line_error(proc: subprocess.CompletedProcess, dst: Path, text: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = [line for line in proc.stderr.splitlines() if "WARNING" not in line and line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert text in lines[0] and str(dst) in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.mark.parametrize("name,op,fill", [
    ("zero2", ZERO_OP, "deepspeed.param_written:3"),  # torch.save's bare RuntimeError
    ("pipe", PIPE_OP, "pipe.param_written:2"),
    ("hf", HF_OP, "hf.shard_written"),  # safetensors' SafetensorError
])
def test_grow_onto_a_full_disk_fails_cleanly(sources, runner, small_disk, name, op, fill):
    src = sources[name]
    before = digest(src)
    mnt = small_disk(96 * 1024)  # far below any estimate: the pre-check refuses
    dst = mnt / "grown"
    refused = grow(src, dst, op, runner=runner)
    line = _one_line_error(refused, dst, "not enough free space for")
    assert not dst.exists() and partials(dst) == [] and _used(mnt) == 0
    need = float(line.split("need ~")[1].split()[0]) * {"KB": 1e3, "MB": 1e6}[
        line.split("need ~")[1].split()[1]]
    mnt = small_disk(int(need * 1.05) + 256 * 1024)  # the check passes ...
    forks = None if name == "zero2" else runner  # one of them from a fresh interpreter
    full = grow(src, dst, op, runner=forks, LAG_DS_FAULT_FILL=fill)  # ... then the disk fills
    _one_line_error(full, dst, "disk full while writing")
    assert not dst.exists() and partials(dst) == [] and _used(mnt) == 0  # filler went too
    assert digest(src) == before
    ok = grow(src, dst, op, "--verify", runner=runner)  # the estimate is an upper bound: fits
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert _used(mnt) <= need * 1.05


def test_trainer_save_onto_a_full_disk_keeps_the_previous_checkpoint(small_disk, tmp_path):
    mnt = small_disk(4 << 20)
    out = tmp_path / "report.json"
    _script("zero_save.py", MODE="full", STAGE="2", DIR=str(mnt / "ckpt"), OUT=str(out))
    report = json.loads(out.read_text())
    dst = mnt / "ckpt" / "global_step2"
    assert report["precheck"]["error"].startswith(f"not enough free space for {dst}")
    assert report["fill"]["error"].startswith(f"disk full while writing {dst}")
    for case in ("precheck", "fill"):
        assert report[case]["lines"] == 1
        assert report[case]["latest"] == "global_step1"
        assert report[case]["leftovers"] == ["zero_to_fp32.py", "zero_to_torch.py"]  # DeepSpeed's
    assert report["loaded"] and report["loaded_steps"] == 1 and report["weights_equal_step1"]
    assert report["loaded_client_num_layers"] == 2 and report["trains_after_load"]
    assert report["estimate"] >= sum(p.stat().st_size for p in (mnt / "ckpt").rglob("*")
                                     if "global_step1" in str(p))
