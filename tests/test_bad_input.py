"""Bad input, one table: every entry point answers with ONE line naming the file or argument,
exit code 2, nothing written, the source untouched (RELIABILITY.md #3, #4, #6, #12).

Each case is (id, tool, argv builder, expected substring of the one line). The builder gets a
fresh directory holding copies of what it needs (a real 2-layer ZeRO-2 checkpoint written by the
trainer, one of another run with 3 layers, a grown checkpoint with its manifest, a LAG run
directory) and breaks them; the test hashes that whole directory before and after the call, so
"nothing written" and "source untouched" are one assertion. Tools run in-process through their
``main(argv)``; the job-starting parts are replaced by tripwires so a case that slips through
validation fails loudly instead of training. ``test_real_exit_codes`` runs one case per tool as
a real subprocess.

Honest limits: a flipped byte inside the tensor data of a checkpoint without a manifest (what
DeepSpeed writes) unpickles fine and cannot be detected; the table flips the zip header instead
and checks the manifest path on lag_ds's own outputs. Permission bits do not stop root, so the
chmod-000 case is skipped when run as root; a shard replaced by a directory stands in for it.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from conftest import REPO, deepspeed_env

sys.path.insert(0, str(REPO / "tools"))
import analyze_lag  # noqa: E402
import grow_checkpoint  # noqa: E402

TAG1, TAG2 = "global_step1", "global_step2"
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
MODEL = "mp_rank_00_model_states.pt"
SPACE = "starts0=0;blocks=1,2;inits=duplicate"


# ----------------------------------------------------------------------------- shared sources
def _train(cfg: Path, run_dir: Path, *sets: str) -> Path:
    cmd = [sys.executable, "-m", "lag_ds.train", "--config", str(cfg), "--set",
           f"run_dir={run_dir}", *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.run(cmd, cwd=REPO, env=deepspeed_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="session")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Real checkpoints, written once: 'two' (2 layers, tags at steps 1 and 2), 'three' (another
    run: 3 layers, step 1), 'grown' (two grown to 4 layers, universal layout with manifest), a
    LAG run directory for the analyser and a stacking schedule."""
    root = tmp_path_factory.mktemp("bad_input_sources")
    cfg = {
        "preset": "tiny", "global_batch_size": 8, "micro_batch_size": 4, "train_steps": 2,
        "eval_interval": 2, "eval_samples": 8, "save_interval": 1, "keep_checkpoints": 2,
        "ds_config": str(REPO / "ds_configs/cpu_zero2.json"), "cache_dir": str(root / "cache"),
        "optim": {"name": "adamw", "lr": 3.0e-3},
        "schedule": {"kind": "constant", "warmup_steps": 1},
        "data": {"source": "demo", "demo_max_bytes": 120000, "vocab_size": 512,
                 "tokenizer_sample_lines": 3000, "valid_fraction": 0.1},
    }
    (root / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    two = _train(root / "tiny.yaml", root / "two")
    three = _train(root / "tiny.yaml", root / "three", "num_layers=3", "train_steps=1")
    assert grow_checkpoint.main(["--src", str(two / "checkpoints"), "--dst", str(root / "grown"),
                                 "--op", "k=2,i0=0,b=1,init=duplicate", "--no-progress"]) == 0
    from test_analyze_lag import _make_run

    _make_run(root / "lagrun")
    (root / "schedule.yaml").write_text(yaml.safe_dump({
        "train_config": str(root / "tiny.yaml"), "initial_layers": 2, "eval_interval": 1,
        "stages": [{"steps": 4}, {"steps": 4, "num_new_layers": 2, "k": 2, "space": SPACE}]}))
    return {"root": root, "cfg": root / "tiny.yaml", "two": two, "three": three,
            "grown": root / "grown", "lagrun": root / "lagrun",
            "schedule": root / "schedule.yaml"}


# ----------------------------------------------------------------------------- case helpers
@dataclass
class Env:
    """One case's directory and the ways of breaking copies of the sources inside it."""

    root: Path
    src: dict[str, Path]

    @property
    def marker(self) -> Path:
        return self.root / "PWNED"

    def copy(self, name: str, to: str | None = None) -> Path:
        dst = self.root / (to or name)
        shutil.copytree(self.src[name], dst, symlinks=True)
        return dst

    def ck(self) -> Path:
        """A copy of the 2-layer run's checkpoint directory (latest -> global_step2)."""
        return self.copy("two", "run") / "checkpoints"

    def run(self) -> Path:
        return self.copy("two", "run")

    def yaml(self, name: str, data: object) -> Path:
        path = self.root / name
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
        return path

    def evil(self, path: Path) -> None:
        """Replace ``path`` with a torch file whose unpickling would create ``marker``."""
        torch.save({"module": _Evil(str(self.marker))}, path)

    def train_cfg(self, **changes: object) -> Path:
        data = yaml.safe_load(self.src["cfg"].read_text())
        data.update(changes)
        return self.yaml("train.yaml", data)

    def schedule(self, **changes: object) -> Path:
        data = yaml.safe_load(self.src["schedule"].read_text())
        data.update(changes)
        return self.yaml("schedule.yaml", data)


class _Evil:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # unpickling calls open(path, "w"): creates the marker file
        return (open, (self.path, "w"))


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _grow(e: Env, src: Path, *args: str) -> list[str]:
    return ["--src", str(src), "--dst", str(e.root / "out"), "--no-progress", *args]


OP = ("--op", "k=1,i0=0,b=1,init=duplicate")


def g_flip_header(e: Env) -> list[str]:
    ck = e.ck()
    flip(ck / TAG2 / OPTIM, 0)  # 'P' of the zip magic: the file is no torch zip any more
    return _grow(e, ck, *OP)


def g_flip_manifest(e: Env) -> list[str]:
    grown = e.copy("grown")
    victim = next(grown.glob("global_step*/zero/decoder.layers.1.mlp.linear_fc1.weight/fp32.pt"))
    flip(victim, victim.stat().st_size - 100)  # inside tensor data: only the sha256 can tell
    return _grow(e, grown, *OP)


def g_truncated(e: Env) -> list[str]:
    ck = e.ck()
    truncate(ck / TAG2 / OPTIM)
    return _grow(e, ck, *OP)


def g_deleted_optim(e: Env) -> list[str]:
    ck = e.ck()
    (ck / TAG2 / OPTIM).unlink()
    return _grow(e, ck, *OP)


def g_deleted_model(e: Env) -> list[str]:
    ck = e.ck()
    (ck / TAG2 / MODEL).unlink()
    return _grow(e, ck, *OP)


def g_other_step(e: Env) -> list[str]:
    ck = e.ck()
    shutil.copy2(ck / TAG1 / OPTIM, ck / TAG2 / OPTIM)
    return _grow(e, ck, *OP)


def g_other_run(e: Env) -> list[str]:
    ck = e.ck()
    shutil.copy2(e.src["three"] / "checkpoints" / TAG1 / OPTIM, ck / TAG2 / OPTIM)
    return _grow(e, ck, *OP)


def g_latest_garbage(e: Env) -> list[str]:
    ck = e.ck()
    (ck / "latest").write_bytes(b"\xff\xfe garbage \x00")
    return _grow(e, ck, *OP)


def g_latest_dangling(e: Env) -> list[str]:
    ck = e.ck()
    (ck / "latest").write_text("global_step99")
    return _grow(e, ck, *OP)


def g_extra_tp(e: Env) -> list[str]:
    ck = e.ck()
    shutil.copy2(ck / TAG2 / MODEL, ck / TAG2 / "mp_rank_01_model_states.pt")
    return _grow(e, ck, *OP)


def g_extra_dp(e: Env) -> list[str]:
    ck = e.ck()
    shutil.copy2(ck / TAG2 / OPTIM, ck / TAG2 / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    return _grow(e, ck, *OP)


def g_evil_model(e: Env) -> list[str]:
    ck = e.ck()
    e.evil(ck / TAG2 / MODEL)
    return _grow(e, ck, *OP)


def g_evil_optim(e: Env) -> list[str]:
    ck = e.ck()
    e.evil(ck / TAG2 / OPTIM)
    return _grow(e, ck, *OP)


def g_shard_is_dir(e: Env) -> list[str]:
    ck = e.ck()
    (ck / TAG2 / OPTIM).unlink()
    (ck / TAG2 / OPTIM).mkdir()  # unreadable as a file (root ignores permission bits)
    return _grow(e, ck, *OP)


def g_not_checkpoint(e: Env) -> list[str]:
    junk = e.root / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not a checkpoint")
    return _grow(e, junk, *OP)


def g_corrupt_manifest_verify(e: Env) -> list[str]:
    grown = e.copy("grown")
    (grown / "manifest.json").write_text("{ not json")
    return ["--verify", str(grown)]


def g_corrupt_manifest_src(e: Env) -> list[str]:
    grown = e.copy("grown")
    (grown / "manifest.json").write_text('{"format": "something else"}')
    return _grow(e, grown, *OP)


def g_dst_inside_src(e: Env) -> list[str]:
    ck = e.ck()
    return ["--src", str(ck), "--dst", str(ck / "grown"), "--no-progress", *OP]


def g_dst_inside_tag_parent(e: Env) -> list[str]:
    ck = e.ck()
    return ["--src", str(ck / TAG2), "--dst", str(ck / "grown"), "--no-progress", *OP]


def g_dst_exists(e: Env) -> list[str]:
    (e.root / "out").mkdir()
    return _grow(e, e.ck(), *OP)


def g_plain(*args: str) -> Callable[[Env], list[str]]:
    return lambda e: _grow(e, e.ck(), *args)


# trainer ---------------------------------------------------------------------------------------
def t_args(e: Env, run: Path | None = None, *sets: str, cfg: Path | None = None) -> list[str]:
    run = run if run is not None else e.root / "newrun"
    return ["--config", str(cfg or e.src["cfg"]), "--set", f"run_dir={run}",
            *[a for s in sets for a in ("--set", s)]]


def t_resume(mutate: Callable[[Env, Path], None], *sets: str) -> Callable[[Env], list[str]]:
    def build(e: Env) -> list[str]:
        run = e.run()
        mutate(e, run / "checkpoints")
        return t_args(e, run, *sets)
    return build


def t_init(mutate: Callable[[Env, Path], Path], *sets: str) -> Callable[[Env], list[str]]:
    def build(e: Env) -> list[str]:
        init = mutate(e, e.ck())
        return t_args(e, None, f"init_from={init}", *sets)
    return build


def _write(rel: str, text: str) -> Callable[[Env, Path], None]:
    return lambda e, ck: (ck / rel).write_text(text)


def _lost_pointer(e: Env, ck: Path) -> None:
    (ck / "latest").unlink()


def _latest_dir(e: Env, ck: Path) -> None:
    (ck / "latest").unlink()
    (ck / "latest").mkdir()


def _junk_dir(e: Env, ck: Path) -> Path:
    junk = e.root / "junk"
    junk.mkdir()
    (junk / "README").write_text("nothing here")
    return junk


def _evil_optim(e: Env, ck: Path) -> Path:
    e.evil(ck / TAG2 / OPTIM)
    return ck


# stacking --------------------------------------------------------------------------------------
def s_args(e: Env, *args: str, cfg: Path | None = None) -> list[str]:
    return ["--out-dir", str(e.root / "lag"), "--train-config", str(cfg or e.src["cfg"]),
            "--allocation", "local:1", *args]


def s_base(mutate: Callable[[Env, Path], None] | None = None,
           *args: str) -> Callable[[Env], list[str]]:
    def build(e: Env) -> list[str]:
        ck = e.ck()
        if mutate:
            mutate(e, ck)
        return s_args(e, "--base-checkpoint", str(ck), "--grow-layers", "2", "--space", SPACE,
                      "--lag-steps", "2", "--total-steps", "10", *args)
    return build


def _s_out_inside(e: Env) -> list[str]:
    ck = e.ck()
    return ["--out-dir", str(ck / "lag"), "--train-config", str(e.src["cfg"]), "--allocation",
            "local:1", "--base-checkpoint", str(ck), "--grow-layers", "2", "--space", SPACE,
            "--lag-steps", "2", "--total-steps", "10"]


def _s_evil(e: Env, ck: Path) -> None:
    e.evil(ck / TAG2 / OPTIM)


# adaptive --------------------------------------------------------------------------------------
def a_args(e: Env, schedule: Path, *args: str) -> list[str]:
    return ["--schedule", str(schedule), "--out-dir", str(e.root / "adaptive"),
            "--allocation", "local:1", *args]


def a_stage(**changes: object) -> Callable[[Env], list[str]]:
    def build(e: Env) -> list[str]:
        data = yaml.safe_load(e.src["schedule"].read_text())
        data["stages"][1].update(changes)
        return a_args(e, e.yaml("schedule.yaml", data))
    return build


# analyser --------------------------------------------------------------------------------------
def z_run(mutate: Callable[[Path], None] | None = None,
          *args: str) -> Callable[[Env], list[str]]:
    def build(e: Env) -> list[str]:
        run = e.copy("lagrun")
        if mutate:
            mutate(run)
        return [str(run), "--no-tensorboard", *args]
    return build


def _z_corrupt_selection(run: Path) -> None:
    (run / "selection.json").write_text("{ truncated")


def _z_no_selection(run: Path) -> None:
    (run / "selection.json").unlink()


def _z_corrupt_metrics(run: Path) -> None:
    metrics = next(run.glob("candidates/*/run/metrics.jsonl"))
    metrics.write_text(metrics.read_text() + "{not json\n")


@dataclass(frozen=True)
class Case:
    id: str
    tool: str
    build: Callable[[Env], list[str]]
    expect: str
    what: str
    """The bad input, for the README table."""


CASES = [
    # ---------------------------------------------------------------- tools/grow_checkpoint.py
    Case("grow-flip-zip-header", "grow", g_flip_header, "cannot be read",
         "flipped byte in a shard's zip header"),
    Case("grow-flip-tensor-with-manifest", "grow", g_flip_manifest, "sha256 mismatch",
         "flipped byte in tensor data of a source with manifest.json"),
    Case("grow-truncated-shard", "grow", g_truncated, "truncated or corrupt",
         "shard cut to half its size"),
    Case("grow-deleted-optim-shard", "grow", g_deleted_optim, "missing (dp,tp) [(0, 0)]",
         "ZeRO partition file deleted"),
    Case("grow-deleted-model-shard", "grow", g_deleted_model, MODEL,
         "model-states file deleted"),
    Case("grow-shard-other-step", "grow", g_other_step, "shard from another step",
         "optimizer partition copied from the step-1 tag into the step-2 tag"),
    Case("grow-shard-other-run", "grow", g_other_run, "optimizer holds decoder.layers.2",
         "optimizer partition copied from a 3-layer run"),
    Case("grow-latest-garbage", "grow", g_latest_garbage, "latest: names",
         "`latest` holds binary garbage"),
    Case("grow-latest-dangling", "grow", g_latest_dangling, "global_step99",
         "`latest` names a tag that does not exist"),
    Case("grow-extra-tp-shard", "grow", g_extra_tp, "mp_world_size=1",
         "TP count mismatch: an extra mp_rank_01 file"),
    Case("grow-extra-dp-shard", "grow", g_extra_dp, "extra [(1, 0)]",
         "DP count mismatch: an extra zero_pp_rank_1 file"),
    Case("grow-target-tp-not-dividing", "grow", g_plain("--target-tp", "3"), "--target-tp 3",
         "--target-tp that does not divide the heads"),
    Case("grow-target-tp-zero", "grow", g_plain("--target-tp", "0"), "--target-tp must be >= 1",
         "--target-tp 0"),
    Case("grow-target-dp-negative", "grow", g_plain("--target-dp", "-2"),
         "--target-dp must be >= 1", "negative --target-dp"),
    Case("grow-op-out-of-range", "grow", g_plain("--op", "k=1,i0=5,b=1,init=duplicate"),
         "i=5 out of range", "operator start beyond the layer count"),
    Case("grow-op-block-too-big", "grow", g_plain("--op", "k=2,i0=0,b=3,init=duplicate"),
         "b=3", "block size not dividing k"),
    Case("grow-op-malformed", "grow", g_plain("--op", "grow-it-please"), "not key=value",
         "malformed operator string"),
    Case("grow-op-unknown-init", "grow", g_plain("--op", "k=1,i0=0,b=1,init=magic"),
         "unknown init='magic'", "unknown init in the operator"),
    Case("grow-unknown-flag", "grow", g_plain("--frobnicate"),
         "unrecognized arguments: --frobnicate", "unknown command-line flag"),
    Case("grow-bad-type", "grow", g_plain("--target-tp", "two"),
         "argument --target-tp: invalid int value: 'two'", "non-integer --target-tp"),
    Case("grow-src-missing", "grow", lambda e: _grow(e, e.root / "nope", *OP),
         "no such file or directory", "nonexistent --src"),
    Case("grow-src-not-checkpoint", "grow", g_not_checkpoint,
         "not a checkpoint in any known layout", "a directory that is not a checkpoint"),
    Case("grow-verify-corrupt-manifest", "grow", g_corrupt_manifest_verify, "corrupt manifest",
         "--verify on a directory whose manifest.json is not JSON"),
    Case("grow-src-foreign-manifest", "grow", g_corrupt_manifest_src,
         "not a lag_ds.checkpoint v1 manifest", "--src whose manifest.json is someone else's"),
    Case("grow-evil-model-states", "grow", g_evil_model, "refused by weights-only loading",
         "malicious pickle (`__reduce__` -> open(marker)) as model states"),
    Case("grow-evil-optim", "grow", g_evil_optim, "refused by weights-only loading",
         "malicious pickle as a ZeRO partition"),
    Case("grow-shard-is-directory", "grow", g_shard_is_dir, "not a regular file",
         "unreadable shard (a directory in its place; stands in for chmod 000 under root)"),
    Case("grow-dst-inside-src", "grow", g_dst_inside_src, "inside the source",
         "--dst inside --src"),
    Case("grow-dst-inside-tag-parent", "grow", g_dst_inside_tag_parent, "inside the source",
         "--src is a tag dir, --dst inside its checkpoint dir"),
    Case("grow-dst-exists", "grow", g_dst_exists, "already exists", "--dst exists"),
    Case("grow-dst-missing", "grow", lambda e: ["--src", str(e.ck()), *OP], "--dst is required",
         "no --dst"),
    # ---------------------------------------------------------------- python -m lag_ds.train
    Case("train-config-missing", "train", lambda e: ["--config", str(e.root / "nope.yaml")],
         "config file not found", "nonexistent --config"),
    Case("train-config-unknown-key", "train",
         lambda e: t_args(e, cfg=e.train_cfg(trian_steps=5)), "unknown key(s) ['trian_steps']",
         "unknown key in the YAML"),
    Case("train-config-yaml-syntax", "train",
         lambda e: t_args(e, cfg=e.yaml("bad.yaml", "train_steps: [1,\n")),
         "cannot be read as YAML", "YAML syntax error"),
    Case("train-config-not-mapping", "train",
         lambda e: t_args(e, cfg=e.yaml("list.yaml", "- 1\n- 2\n")),
         "top level must be a mapping", "YAML whose top level is a list"),
    Case("train-set-unknown-key", "train", lambda e: t_args(e, None, "bogus=1"),
         "unknown key 'bogus'", "--set of an unknown key"),
    Case("train-set-no-equals", "train", lambda e: t_args(e, None, "train_steps"),
         "expected key=value", "--set without '='"),
    Case("train-set-bad-type", "train", lambda e: t_args(e, None, "train_steps=ten"),
         "train_steps='ten' is not an integer", "non-integer train_steps"),
    Case("train-set-bad-section", "train", lambda e: t_args(e, None, "optim=fast"),
         "optim='fast' is not a mapping", "a scalar where a section belongs"),
    Case("train-negative-steps", "train", lambda e: t_args(e, None, "train_steps=-5"),
         "train_steps must be positive", "negative train_steps"),
    Case("train-unknown-flag", "train", lambda e: t_args(e) + ["--frobnicate"],
         "unrecognized arguments: --frobnicate", "unknown command-line flag"),
    Case("train-ds-config-missing", "train",
         lambda e: t_args(e, None, f"ds_config={e.root / 'nope.json'}"), "ds_config not found",
         "nonexistent ds_config"),
    Case("train-resume-latest-garbage", "train", t_resume(_write("latest", "oops\n")),
         "garbage checkpoint pointer", "resume: `latest` is garbage"),
    Case("train-resume-latest-binary", "train",
         t_resume(lambda e, ck: (ck / "latest").write_bytes(b"\xff\xfe\x00")),
         "garbage checkpoint pointer", "resume: `latest` is binary garbage"),
    Case("train-resume-latest-dangling", "train", t_resume(_write("latest", "global_step99")),
         "dangling pointer", "resume: `latest` names a missing tag"),
    Case("train-resume-latest-is-dir", "train", t_resume(_latest_dir), "latest: not a file",
         "resume: `latest` is a directory"),
    Case("train-resume-pointer-lost", "train", t_resume(_lost_pointer),
         "missing, but 2 checkpoint tags exist", "resume: `latest` deleted, two tags left"),
    Case("train-resume-truncated-shard", "train",
         t_resume(lambda e, ck: truncate(ck / TAG2 / OPTIM)), "truncated or corrupt",
         "resume: a shard cut in half"),
    Case("train-resume-flip-zip-header", "train",
         t_resume(lambda e, ck: flip(ck / TAG2 / MODEL, 0)), "cannot be read",
         "resume: flipped byte in a shard's zip header"),
    Case("train-resume-deleted-shard", "train",
         t_resume(lambda e, ck: (ck / TAG2 / OPTIM).unlink()), f"{OPTIM}: missing",
         "resume: ZeRO partition deleted"),
    Case("train-resume-extra-dp-shard", "train",
         t_resume(lambda e, ck: shutil.copy2(
             ck / TAG2 / OPTIM, ck / TAG2 / "zero_pp_rank_1_mp_rank_00_optim_states.pt")),
         "zero_pp_rank_1_mp_rank_00_optim_states.pt: unexpected", "resume: extra DP partition"),
    Case("train-resume-evil-pickle", "train",
         t_resume(lambda e, ck: e.evil(ck / TAG2 / OPTIM)), "refused, its pickle calls",
         "resume: malicious pickle (DeepSpeed itself would unpickle it unsafely)"),
    Case("train-resume-wrong-layers", "train", t_resume(lambda e, ck: None, "num_layers=3"),
         "checkpoint has 2 layers but the run builds 3", "resume with num_layers=3"),
    Case("train-resume-wrong-tp", "train", t_resume(lambda e, ck: None, "tensor_parallel=2"),
         "tensor parallel degree 1", "resume with tensor_parallel=2"),
    Case("train-init-from-missing", "train",
         lambda e: t_args(e, None, f"init_from={e.root / 'nope'}"), "no such directory",
         "nonexistent init_from"),
    Case("train-init-from-not-checkpoint", "train", t_init(_junk_dir),
         "no 'latest' or 'latest_universal' pointer", "init_from is not a checkpoint"),
    Case("train-init-from-wrong-layers", "train", t_init(lambda e, ck: ck, "num_layers=3"),
         "checkpoint has 2 layers but the run builds 3", "init_from of another depth"),
    Case("train-init-from-evil-pickle", "train", t_init(_evil_optim),
         "refused, its pickle calls", "init_from with a malicious pickle"),
    # ---------------------------------------------------------------- python -m lag_ds.stacking
    Case("stack-unknown-flag", "stack", lambda e: s_args(e, "--frobnicate"),
         "unrecognized arguments: --frobnicate", "unknown command-line flag"),
    Case("stack-bad-type", "stack", lambda e: s_args(e, "--lag-steps", "ten"),
         "argument --lag-steps: invalid int value: 'ten'", "non-integer --lag-steps"),
    Case("stack-negative-steps", "stack", lambda e: s_args(e, "--lag-steps", "-5"),
         "lag_steps must be positive", "negative --lag-steps"),
    Case("stack-train-config-missing", "stack",
         lambda e: s_args(e, cfg=e.root / "nope.yaml"), "config file not found",
         "nonexistent --train-config"),
    Case("stack-train-config-unknown-key", "stack",
         lambda e: s_args(e, cfg=e.train_cfg(lr=1)), "unknown key(s) ['lr']",
         "unknown key in the train config"),
    Case("stack-override-unknown-key", "stack",
         lambda e: s_args(e, "--train-overrides", "bogus=1"), "unknown key 'bogus'",
         "--train-overrides of an unknown key"),
    Case("stack-bad-policy", "stack", lambda e: s_args(e, "--policy", "best"), "best",
         "unknown race policy"),
    Case("stack-bad-allocation", "stack", lambda e: s_args(e, "--allocation", "local:x"),
         "expected local:<number of slots>", "malformed --allocation"),
    Case("stack-base-missing", "stack",
         lambda e: s_args(e, "--base-checkpoint", str(e.root / "nope")), "no such directory",
         "nonexistent --base-checkpoint"),
    Case("stack-base-not-checkpoint", "stack",
         lambda e: s_args(e, "--base-checkpoint", str(_junk_dir(e, e.root))),
         "not a checkpoint in any known layout", "--base-checkpoint is not a checkpoint"),
    Case("stack-base-latest-dangling", "stack", s_base(_write("latest", "global_step99")),
         "global_step99", "--base-checkpoint with a dangling `latest`"),
    Case("stack-base-shard-other-run", "stack",
         s_base(lambda e, ck: shutil.copy2(e.src["three"] / "checkpoints" / TAG1 / OPTIM,
                                           ck / TAG2 / OPTIM)),
         "optimizer holds decoder.layers.2", "--base-checkpoint with a shard of another run"),
    Case("stack-base-evil-pickle", "stack", s_base(_s_evil), "refused",
         "--base-checkpoint with a malicious pickle"),
    Case("stack-space-out-of-range", "stack", s_base(None, "--space", "starts0=7;blocks=1"),
         "--space 'starts0=7;blocks=1' for 2 layers", "design space beyond the base's layers"),
    Case("stack-space-malformed", "stack", s_base(None, "--space", "everything"),
         "--space 'everything'", "malformed --space"),
    Case("stack-total-steps-too-small", "stack", s_base(None, "--total-steps", "3"),
         "--total-steps 3 must exceed", "--total-steps not past base step + k"),
    Case("stack-out-inside-base", "stack", _s_out_inside, "inside --base-checkpoint",
         "--out-dir inside --base-checkpoint"),
    # ---------------------------------------------------------------- python -m ...adaptive
    Case("adaptive-no-schedule", "adaptive", lambda e: ["--out-dir", str(e.root / "a")],
         "the following arguments are required: --schedule", "no --schedule"),
    Case("adaptive-schedule-missing", "adaptive", lambda e: a_args(e, e.root / "nope.yaml"),
         "config file not found", "nonexistent --schedule"),
    Case("adaptive-unknown-key", "adaptive", lambda e: a_args(e, e.schedule(stagez=[])),
         "unknown key(s) ['stagez']", "unknown key in the schedule"),
    Case("adaptive-missing-key", "adaptive",
         lambda e: a_args(e, e.yaml("s.yaml", {"initial_layers": 2})),
         "missing key(s) ['train_config', 'stages']", "schedule without required keys"),
    Case("adaptive-stages-not-list", "adaptive", lambda e: a_args(e, e.schedule(stages=5)),
         "stages=5 is not a list", "stages: 5"),
    Case("adaptive-stage-unknown-key", "adaptive", a_stage(spcae=SPACE),
         "unknown key(s) ['spcae']", "unknown key in a stage"),
    Case("adaptive-negative-steps", "adaptive", a_stage(steps=-4), "steps must be >= 1",
         "negative stage steps"),
    Case("adaptive-bad-type", "adaptive", a_stage(steps="four"),
         "steps='four' is not an integer", "non-integer stage steps"),
    Case("adaptive-k-out-of-range", "adaptive", a_stage(k=9), "k must be in 1..steps-1",
         "race k beyond the stage"),
    Case("adaptive-space-malformed", "adaptive", a_stage(space="everything"), "everything",
         "malformed design space in a stage"),
    Case("adaptive-train-config-missing", "adaptive",
         lambda e: a_args(e, e.schedule(train_config=str(e.root / "nope.yaml"))),
         "config file not found", "schedule naming a nonexistent train config"),
    Case("adaptive-bad-allocation", "adaptive",
         lambda e: a_args(e, e.schedule(), "--allocation", "cluster"), "cluster",
         "malformed --allocation"),
    # ---------------------------------------------------------------- tools/analyze_lag.py
    Case("analyze-run-missing", "analyze", lambda e: [str(e.root / "nope")], "not a directory",
         "nonexistent RUN_DIR"),
    Case("analyze-no-selection", "analyze", z_run(_z_no_selection), "selection.json",
         "RUN_DIR without selection.json"),
    Case("analyze-corrupt-selection", "analyze", z_run(_z_corrupt_selection), "selection.json",
         "selection.json that is not JSON"),
    Case("analyze-corrupt-metrics", "analyze", z_run(_z_corrupt_metrics), "metrics.jsonl:",
         "a metrics.jsonl line that is not JSON"),
    Case("analyze-even-smoothing", "analyze", z_run(None, "--smoothing", "4"),
         "--smoothing must be an odd", "even --smoothing"),
    Case("analyze-bad-type", "analyze", z_run(None, "--smoothing", "wide"),
         "invalid int value: 'wide'", "non-integer --smoothing"),
    Case("analyze-bad-replay", "analyze", z_run(None, "--replay", "bogus:k=1"), "kind",
         "malformed --replay"),
    Case("analyze-out-inside-candidates", "analyze",
         lambda e: z_run(None)(e) + ["--out", str(e.root / "lagrun" / "candidates" / "x")],
         "inside the candidates directory", "--out inside the run's candidates"),
    Case("analyze-unknown-flag", "analyze", z_run(None, "--frobnicate"),
         "unrecognized arguments: --frobnicate", "unknown command-line flag"),
]


# ----------------------------------------------------------------------------- running a case
class Tripwire(AssertionError):
    pass


def _trip(*_a, **_k):
    raise Tripwire("validation let a bad input through to the job-starting code")


@pytest.fixture
def tripwires(monkeypatch):
    """No case may get past validation: training, base runs and JIT builds are replaced."""
    loop = types.ModuleType("lag_ds.train.loop")
    loop.train, loop.EXIT_NON_FINITE = _trip, 3
    loop.NonFiniteLoss = type("NonFiniteLoss", (RuntimeError,), {})
    dist = types.ModuleType("lag_ds.train.distributed")
    dist.shutdown_distributed = lambda: None
    monkeypatch.setitem(sys.modules, "lag_ds.train.loop", loop)
    monkeypatch.setitem(sys.modules, "lag_ds.train.distributed", dist)
    import lag_ds.launch.diagnose as diagnose

    monkeypatch.setattr(diagnose, "register_stack_dump", lambda: None)  # no fd under capsys
    import lag_ds.stacking.adaptive as adaptive
    import lag_ds.stacking.lag_run as lag_run

    monkeypatch.setattr(lag_run, "run_lag", _trip)
    monkeypatch.setattr(adaptive, "prepare_deepspeed_ops", _trip)
    monkeypatch.setattr(adaptive, "run_schedule", _trip)
    return loop


MAINS = {
    "grow": lambda: grow_checkpoint.main,
    "train": lambda: importlib.import_module("lag_ds.train.main").main,
    "stack": lambda: importlib.import_module("lag_ds.stacking.__main__").main,
    "adaptive": lambda: importlib.import_module("lag_ds.stacking.adaptive").main,
    "analyze": lambda: analyze_lag.main,
}


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with its sha256 (directories and links marked as such)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "link:" + os.readlink(path)
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def run_case(case: Case, sources: dict[str, Path], root: Path, capsys) -> str:
    env = Env(root, sources)
    root.mkdir(exist_ok=True)
    argv = case.build(env)
    before = snapshot(root)
    capsys.readouterr()
    rc = MAINS[case.tool]()(argv)
    out = capsys.readouterr()
    lines = [line for line in out.err.splitlines() if line.strip()]
    assert rc == 2, f"{case.id}: exit {rc}, stderr:\n{out.err[-2000:]}"
    assert len(lines) == 1, f"{case.id}: stderr is not one line:\n{out.err[-2000:]}"
    assert lines[0].startswith("error: ") and case.expect in lines[0], (case.id, lines[0])
    assert not env.marker.exists(), f"{case.id}: the malicious pickle ran"
    assert snapshot(root) == before, f"{case.id}: something was written or changed"
    if table := os.environ.get("LAG_DS_BAD_INPUT_TABLE"):  # collects the README table's rows
        with open(table, "a") as f:
            f.write(f"{case.id}\t{case.tool}\t{case.what}\t{lines[0]}\t{root}\n")
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, sources, tmp_path, capsys, tripwires):
    run_case(case, sources, tmp_path / "case", capsys)


# ----------------------------------------------------------------------------- around the table
def test_the_evil_pickle_is_real(tmp_path):
    """Control: unpickled unsafely, the payload the table feeds the tools does create its marker."""
    env = Env(tmp_path, {})
    env.evil(tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert env.marker.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads chmod-000 files; see "
                    "grow-shard-is-directory for the unreadable-shard case")
def test_unreadable_shard(sources, tmp_path, capsys):
    env = Env(tmp_path, sources)
    ck = env.ck()
    (ck / TAG2 / OPTIM).chmod(0)
    rc = grow_checkpoint.main(_grow(env, ck, *OP))
    err = capsys.readouterr().err
    assert rc == 2 and OPTIM in err and len(err.strip().splitlines()) == 1


def test_verify_names_a_flipped_byte_with_exit_1(sources, tmp_path, capsys):
    """The manifest path: ``--verify`` names the altered file and exits 1 (not bad input)."""
    grown = Env(tmp_path, sources).copy("grown")
    victim = next(grown.glob("global_step*/zero/decoder.layers.1.mlp.linear_fc1.weight/fp32.pt"))
    flip(victim, victim.stat().st_size - 100)
    assert grow_checkpoint.main(["--verify", str(grown)]) == 1
    assert f"{victim}: sha256 mismatch" in capsys.readouterr().err


@pytest.mark.parametrize("what", ["new-run-dir", "empty-checkpoints-dir", "uncommitted-tag",
                                  "resume", "init-from", "init-from-universal"])
def test_valid_trainer_starts_are_not_refused(what, sources, tmp_path, capsys, tripwires):
    """Controls: a truly new run starts fresh, so does a save killed before its pointer (one tag,
    no `latest`, a warning); a good checkpoint resumes. These reach train() (the tripwire)."""
    env = Env(tmp_path, sources)
    sets = []
    if what == "new-run-dir":
        run = tmp_path / "new"
    elif what == "empty-checkpoints-dir":
        run = tmp_path / "new"
        (run / "checkpoints").mkdir(parents=True)
    elif what == "uncommitted-tag":
        run = env.run()
        (run / "checkpoints" / "latest").unlink()
        shutil.rmtree(run / "checkpoints" / TAG1)
    elif what == "resume":
        run = env.run()
    elif what == "init-from":
        run, sets = tmp_path / "new", [f"init_from={env.ck()}"]
    else:  # a grown candidate: universal layout, 4 layers
        run, sets = tmp_path / "new", [f"init_from={env.copy('grown')}", "num_layers=4"]
    from lag_ds.train.main import main

    with pytest.raises(Tripwire):
        main(t_args(env, run, *sets))
    err = capsys.readouterr().err
    assert ("warning:" in err) == (what == "uncommitted-tag"), err


def test_valid_stacking_and_grow_inputs_pass(sources, tmp_path, capsys, tripwires):
    """Controls for the argv builders: the same arguments, unbroken, get past validation."""
    env = Env(tmp_path, sources)
    with pytest.raises(Tripwire):
        importlib.import_module("lag_ds.stacking.__main__").main(s_base()(env))
    assert not (tmp_path / "lag").exists()
    assert grow_checkpoint.main(["--src", str(env.root / "run" / "checkpoints"), *OP,
                                 "--dry-run"]) == 0
    schedule = env.schedule()
    assert importlib.import_module("lag_ds.stacking.adaptive").main(
        a_args(env, schedule, "--dry-run")) == 0
    with pytest.raises(Tripwire):
        importlib.import_module("lag_ds.stacking.adaptive").main(a_args(env, schedule))


REAL = ["grow-latest-dangling", "train-resume-latest-garbage", "stack-base-missing",
        "adaptive-schedule-missing", "analyze-run-missing"]
COMMANDS = {
    "grow": [sys.executable, str(REPO / "tools/grow_checkpoint.py")],
    "train": [sys.executable, "-m", "lag_ds.train"],
    "stack": [sys.executable, "-m", "lag_ds.stacking"],
    "adaptive": [sys.executable, "-m", "lag_ds.stacking.adaptive"],
    "analyze": [sys.executable, str(REPO / "tools/analyze_lag.py")],
}


@pytest.mark.parametrize("case_id", REAL)
def test_real_exit_codes(case_id, sources, tmp_path):
    """One case per tool as a real process: exit status 2 and one stderr line, nothing written."""
    case = next(c for c in CASES if c.id == case_id)
    root = tmp_path / "case"
    root.mkdir()
    argv = case.build(Env(root, sources))
    before = snapshot(root)
    proc = subprocess.run(COMMANDS[case.tool] + argv, cwd=REPO, env=deepspeed_env(),
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and case.expect in lines[0], proc.stderr[-2000:]
    assert snapshot(root) == before
