"""Shard-by-shard surgery of real DeepSpeed checkpoints written by our trainer.

Ground truth is always *stock DeepSpeed*: the source checkpoint is loaded natively at its own
topology and every fp32 value and Adam moment dumped; the grown output is loaded (universal layout
or native ZeRO-0) in a fresh process at another DP / TP degree and dumped the same way; the test
applies the plan to the first dump and compares it with the second, parameter by parameter and
moment by moment. Functional checks (zero-init and TP resharding leave the validation loss
unchanged) go through the trainer itself.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import BIN, REPO, deepspeed_env

from lag_ds.checkpoint.deepspeed_source import DeepSpeedCheckpoint
from lag_ds.checkpoint.formats import CheckpointReader, open_checkpoint, read_checkpoint_info
from lag_ds.checkpoint.megatron_layout import merge_tp, split_layer_name, tp_rule
from lag_ds.growth import parse_operator, plan_growth
from lag_ds.train.distributed import free_port

TOOL = REPO / "tools/grow_checkpoint.py"
STEPS = 3


def _run(cmd: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=env or deepspeed_env(), capture_output=True, text=True, timeout=timeout)
    return proc


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _train(root: Path, name: str, *sets: str, ranks: int = 1) -> Path:
    run_dir = root / name
    args = ["--config", str(root / "tiny.yaml"), "--set", f"run_dir={run_dir}", *[a for s in sets for a in ("--set", s)]]
    if ranks == 1:
        cmd = [sys.executable, "-m", "lag_ds.train", *args]
    else:
        cmd = [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()),
               "--module", "lag_ds.train", *args]
    _ok(_run(cmd))
    return run_dir


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Tiny (2-layer, GLU) checkpoints after 3 steps: ZeRO-2 DP=2, ZeRO-2 TP=2, ZeRO-0."""
    root = tmp_path_factory.mktemp("ds_sources")
    cfg = yaml.safe_load((REPO / "launch_scripts/configs/tiny_base.yaml").read_text())
    cfg.update(cache_dir=str(root / "cache"), train_steps=STEPS, save_interval=STEPS, eval_interval=STEPS,
               ds_config=str(REPO / "ds_configs/cpu_zero2.json"))
    (root / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    return {
        "root": root,
        "z2dp2": _train(root, "z2dp2", ranks=2),
        "z2tp2": _train(root, "z2tp2", "tensor_parallel=2", ranks=2),
        "z0": _train(root, "z0", f"ds_config={REPO / 'ds_configs/cpu_zero0.json'}"),
    }


def dump(src: Path, out: Path, *, stage: int, tp: int, dp: int, layers: int, universal: bool,
         train_steps: int = 2) -> dict:
    """Stock-DeepSpeed view of a checkpoint: {name: {fp32, exp_avg, exp_avg_sq}} TP-merged."""
    env = deepspeed_env()
    env.update(TP=str(tp), STAGE=str(stage), LAYERS=str(layers), VOCAB="640", SRC=str(src),
               UNIVERSAL="1" if universal else "0", OUT=str(out), TRAIN_STEPS=str(train_steps))
    cmd = [str(BIN / "deepspeed"), "--num_gpus", str(tp * dp), "--master_port", str(free_port()),
           str(REPO / "tests/dist/dump_loaded.py")]
    _ok(_run(cmd, env))
    shards = [torch.load(f"{out}.tp{r}") for r in range(tp)]
    merged = {"__global_steps__": shards[0]["__global_steps__"]}
    names = [k for k in shards[0] if not k.startswith("__")]
    for name in names:
        rule = tp_rule(name, glu=True)
        merged[name] = {key: merge_tp([s[name][key].reshape(s[name]["fp32"].shape) for s in shards], rule)
                        for key in ("fp32", "exp_avg", "exp_avg_sq")}
    return merged


def grow(src: Path, dst: Path, *args: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, str(TOOL), "--src", str(src), "--dst", str(dst), "--no-progress", *args])


def expected_source(name: str, plan) -> tuple[str | None, object]:
    split = split_layer_name(name)
    if split is None:
        return name, None
    layer, suffix = split
    src = plan.layers[layer]
    return (None if src.copy_from is None else f"decoder.layers.{src.copy_from}.{suffix}"), src


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def z2dp2_grown(sources, tmp_path_factory) -> dict:
    """The ZeRO-2 DP=2 source as stock DeepSpeed sees it, and its duplicate-grown copy."""
    root = tmp_path_factory.mktemp("z2dp2_grown")
    src = sources["z2dp2"] / "checkpoints"
    before = tree_digest(src)
    ref = dump(src, root / "ref", stage=2, tp=1, dp=2, layers=2, universal=False, train_steps=0)
    dst = root / "grown"
    _ok(grow(src, dst, "--op", "k=2,i0=0,b=1,init=duplicate", "--verify"))  # [0, 0*, 1, 1*]
    assert tree_digest(src) == before  # the source is only read
    return {"ref": ref, "dst": dst}


@pytest.mark.parametrize("load_dp", [2, 1])
def test_zero2_dp2_grow_duplicate_loads_at_dp2_and_dp1(z2dp2_grown, tmp_path, load_dp):
    ref, dst = z2dp2_grown["ref"], z2dp2_grown["dst"]
    got = dump(dst, tmp_path / "got", stage=2, tp=1, dp=load_dp, layers=4, universal=True)
    plan = plan_growth(parse_operator("k=2,i0=0,b=1,init=duplicate"), 2)
    assert got["__global_steps__"] == ref["__global_steps__"] == STEPS
    assert sum(1 for k in got if k.startswith("decoder.layers.3.")) > 0
    for name, values in got.items():
        if name.startswith("__"):
            continue
        source, _ = expected_source(name, plan)
        for key in ("fp32", "exp_avg", "exp_avg_sq"):  # bit for bit, moments copied
            assert torch.equal(values[key], ref[source][key]), (name, key, source)
    assert ref["decoder.layers.0.mlp.linear_fc1.weight"]["exp_avg"].abs().sum() > 0  # moments are real


def test_universal_files_hold_only_their_parameter(z2dp2_grown):
    """A saved view would drag its whole memory-mapped ZeRO partition into every file."""
    files = list(z2dp2_grown["dst"].glob("global_step*/zero/*/fp32.pt"))
    assert len(files) > 10
    for path in files:
        numel = torch.load(path)["param"].numel()
        assert path.stat().st_size < numel * 4 + 4096, path


def test_trainer_refuses_a_grown_checkpoint_of_another_depth(sources, z2dp2_grown):
    root = sources["root"]
    args = ["--config", str(root / "tiny.yaml"), "--set", f"run_dir={root / 'wrong_depth'}",
            "--set", f"init_from={z2dp2_grown['dst']}", "--set", "num_layers=3"]
    proc = _run([sys.executable, "-m", "lag_ds.train", *args])
    assert proc.returncode == 2
    assert "has 4 layers but the run builds 3" in proc.stderr.strip().splitlines()[-1]


def test_sigkill_mid_write_leaves_no_destination_and_rerun_succeeds(sources, tmp_path):
    import signal
    import time

    src, dst = sources["z2dp2"] / "checkpoints", tmp_path / "out"
    before = tree_digest(src)
    cmd = [sys.executable, str(TOOL), "--src", str(src), "--dst", str(dst), "--op", "k=2,i0=0,b=1,init=duplicate",
           "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=deepspeed_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(tmp_path.glob(".out.partial-*/*/zero/*")):
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob(".out.partial-*")), "the writer was not caught mid-write"
    assert not dst.exists()  # absent, never half-written
    assert tree_digest(src) == before
    _ok(grow(src, dst, "--op", "k=2,i0=0,b=1,init=duplicate", "--verify"))
    assert not list(tmp_path.glob(".out.partial-*"))  # the killed run's leftovers are gone


def test_cli_lists_the_paper_space_and_prints_plans():
    proc = _ok(_run([sys.executable, str(TOOL), "--list-space", "--num-layers", "12", "--num-new-layers", "4",
                     "--space", "paper", "--json"]))
    names = json.loads(proc.stdout)
    assert len(names) == 30 and "k4-i8-b4-duplicate" in names and "k4-i0-b1-random" in names
    one = _ok(_run([sys.executable, str(TOOL), "--num-layers", "6", "--op", "k=3,i1=2,b=1,init=duplicate",
                    "--dry-run", "--json"]))
    zero = _ok(_run([sys.executable, str(TOOL), "--num-layers", "6", "--op", "k=3,i0=1,b=1,init=duplicate",
                     "--dry-run", "--json"]))
    assert json.loads(one.stdout) == json.loads(zero.stdout)  # i1=2 is i0=1
    layers = json.loads(one.stdout)["layers"]
    assert [layer["old_index"] + 1 for layer in layers] == [1, 2, 2, 3, 3, 4, 4, 5, 6]  # paper, section 2.1
    bare = _run([sys.executable, str(TOOL), "--num-layers", "6", "--op", "k=3,i=2,b=1,init=duplicate", "--dry-run"])
    assert bare.returncode == 2 and "--index-base" in bare.stderr


def test_zero2_tp2_grow_random_with_zero_moments_loads_at_tp2_and_tp1(sources, tmp_path):
    src = sources["z2tp2"] / "checkpoints"
    ref = dump(src, tmp_path / "ref", stage=2, tp=2, dp=1, layers=2, universal=False, train_steps=0)
    dst = tmp_path / "grown"
    _ok(grow(src, dst, "--op", "k=2,i0=0,b=2,init=random", "--optimizer-state", "zero", "--seed", "5"))
    plan = plan_growth(parse_operator("k=2,i0=0,b=2,init=random"), 2, seed=5)  # [0, 1, new, new]
    tp2 = dump(dst, tmp_path / "tp2", stage=2, tp=2, dp=1, layers=4, universal=True)
    tp1 = dump(dst, tmp_path / "tp1", stage=2, tp=1, dp=1, layers=4, universal=True)
    for name in (k for k in tp1 if not k.startswith("__")):
        for key in ("fp32", "exp_avg", "exp_avg_sq"):  # TP=2 and TP=1 views of one checkpoint agree
            assert torch.equal(tp2[name][key], tp1[name][key]), (name, key)
        source, layer = expected_source(name, plan)
        if source is not None:
            for key in ("fp32", "exp_avg", "exp_avg_sq"):
                assert torch.equal(tp1[name][key], ref[source][key]), (name, key)
        else:  # a random layer: fresh values, zero moments
            value = tp1[name]["fp32"]
            assert not torch.any(value.isnan())
            assert tp1[name]["exp_avg"].abs().sum() == 0 and tp1[name]["exp_avg_sq"].abs().sum() == 0
            if "norm" in name:
                assert torch.equal(value, torch.ones_like(value))
            else:
                old = f"decoder.layers.{layer.new_index - 2}." + name.split(".", 3)[3]
                assert not torch.equal(value, ref[old]["fp32"])
                assert 0.002 < value.std().item() < 0.03


def test_zero0_grow_and_reshard_to_tp2(sources, tmp_path):
    src = sources["z0"] / "checkpoints"
    ref = dump(src, tmp_path / "ref", stage=0, tp=1, dp=1, layers=2, universal=False, train_steps=0)
    dst = tmp_path / "grown"
    _ok(grow(src, dst, "--op", "k=1,i0=1,b=1,init=zero", "--target-tp", "2"))
    assert (dst / "latest").read_text() == f"global_step{STEPS}"
    got = dump(dst, tmp_path / "got", stage=0, tp=2, dp=1, layers=3, universal=False)
    plan = plan_growth(parse_operator("k=1,i0=1,b=1,init=zero"), 2)
    for name in (k for k in got if not k.startswith("__")):
        source, layer = expected_source(name, plan)
        zeroed = layer is not None and layer.is_new and name.endswith(("linear_proj.weight", "linear_fc2.weight"))
        if zeroed:
            assert got[name]["fp32"].abs().sum() == 0 and got[name]["exp_avg"].abs().sum() == 0
        else:
            for key in ("fp32", "exp_avg", "exp_avg_sq"):
                assert torch.equal(got[name][key], ref[source][key]), (name, key)


def _val_at(run_dir: Path, step: int) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r["val/loss"] for r in rows if r["step"] == step and "val/loss" in r)


def test_zero_init_growth_leaves_validation_loss_unchanged(sources, tmp_path):
    src = sources["z2dp2"] / "checkpoints"
    dst = tmp_path / "zero"
    _ok(grow(src, dst, "--op", "k=2,i0=0,b=2,init=zero"))
    run = _train(sources["root"], f"zero_{tmp_path.name}", f"init_from={dst}", "num_layers=4",
                 f"train_steps={STEPS + 1}")
    base, grown = _val_at(sources["z2dp2"], STEPS), _val_at(run, STEPS)
    assert grown == pytest.approx(base, rel=1e-5, abs=1e-5)
    dup = tmp_path / "dup"  # control: a non-preserving operator does change it
    _ok(grow(src, dup, "--op", "k=2,i0=0,b=2,init=duplicate"))
    run2 = _train(sources["root"], f"dup_{tmp_path.name}", f"init_from={dup}", "num_layers=4",
                  f"train_steps={STEPS + 1}")
    assert abs(_val_at(run2, STEPS) - base) > 1e-3


def test_reshard_tp2_to_tp1_is_function_preserving(sources, tmp_path):
    dst = tmp_path / "tp1"
    _ok(grow(sources["z2tp2"] / "checkpoints", dst, "--target-tp", "1"))
    run = _train(sources["root"], f"tp1_{tmp_path.name}", f"init_from={dst}", f"train_steps={STEPS + 1}")
    assert _val_at(run, STEPS) == pytest.approx(_val_at(sources["z2tp2"], STEPS), rel=1e-5)


# ----------------------------------------------------------------------------- bad inputs
def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _assert_clean_failure(proc, dst: Path, *needles: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    for needle in needles:
        assert needle in last, last
    assert not dst.exists()
    assert not list(dst.parent.glob(f".{dst.name}.partial-*"))


def test_missing_rank_file(sources, tmp_path):
    ck = _copy(sources["z2dp2"] / "checkpoints", tmp_path / "ck")
    victim = ck / f"global_step{STEPS}" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    victim.unlink()
    _assert_clean_failure(grow(ck, tmp_path / "out", "--op", "k=1,i0=0,b=1,init=duplicate"), tmp_path / "out",
                          "missing (dp,tp) [(1, 0)]")


def test_truncated_file(sources, tmp_path):
    ck = _copy(sources["z2tp2"] / "checkpoints", tmp_path / "ck")
    victim = ck / f"global_step{STEPS}" / "zero_pp_rank_0_mp_rank_01_optim_states.pt"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    _assert_clean_failure(grow(ck, tmp_path / "out", "--op", "k=1,i0=0,b=1,init=duplicate"), tmp_path / "out",
                          "zero_pp_rank_0_mp_rank_01_optim_states.pt", "truncated or corrupt")


def test_tp_degree_mismatch(sources, tmp_path):
    ck = _copy(sources["z2tp2"] / "checkpoints", tmp_path / "ck")
    (ck / f"global_step{STEPS}" / "mp_rank_01_model_states.pt").unlink()
    _assert_clean_failure(grow(ck, tmp_path / "out", "--op", "k=1,i0=0,b=1,init=duplicate"), tmp_path / "out",
                          "mp_world_size=2")
    _assert_clean_failure(grow(sources["z2tp2"] / "checkpoints", tmp_path / "out2", "--target-tp", "3"),
                          tmp_path / "out2", "--target-tp 3")


@pytest.mark.parametrize("op,needle", [
    ("k=1,i0=2,b=1,init=duplicate", "i=2 out of range"),
    ("k=2,i0=0,b=3,init=duplicate", "b=3"),
    ("k=3,i0=0,b=1,init=duplicate", "k=3"),
])
def test_operator_out_of_range(sources, tmp_path, op, needle):
    _assert_clean_failure(grow(sources["z2dp2"] / "checkpoints", tmp_path / "out", "--op", op), tmp_path / "out", needle)


def test_existing_destination_and_verify_flags_a_flipped_byte(sources, tmp_path):
    dst = tmp_path / "out"
    _ok(grow(sources["z2dp2"] / "checkpoints", dst, "--op", "k=1,i0=1,b=1,init=duplicate"))
    proc = grow(sources["z2dp2"] / "checkpoints", dst, "--op", "k=1,i0=1,b=1,init=duplicate")
    assert proc.returncode == 2 and "already exists" in proc.stderr
    victim = next((dst / f"global_step{STEPS}" / "zero").glob("decoder.layers.2.mlp.linear_fc1.weight/fp32.pt"))
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0xFF
    victim.write_bytes(bytes(data))
    proc = _run([sys.executable, str(TOOL), "--verify", str(dst)])
    assert proc.returncode == 1
    assert "decoder.layers.2.mlp.linear_fc1.weight/fp32.pt: sha256 mismatch" in proc.stderr


def test_layer_structure_is_read_from_names_and_shapes(sources):
    ck = DeepSpeedCheckpoint(sources["z2tp2"] / "checkpoints")
    assert (ck.num_layers, ck.tp, ck.dp, ck.zero_stage, ck.glu) == (2, 2, 1, 2, True)
    assert ck.full_shapes["decoder.layers.0.mlp.linear_fc1.weight"] == (128, 32)
    assert ck.full_shapes["decoder.layers.0.self_attention.linear_proj.weight"] == (32, 32)
    assert ck.full_shapes["embedding.word_embeddings.weight"] == (640, 32)
    reader = open_checkpoint(sources["z2tp2"] / "checkpoints")  # the seam's view of the same files
    assert isinstance(reader, CheckpointReader) and reader.num_layers == 2
    assert reader.full_shape("decoder.layers.0.mlp.linear_fc1.weight") == (128, 32)
    assert reader.tp_rule("decoder.layers.0.self_attention.linear_proj.weight").cat_dim == 1
    info = read_checkpoint_info(sources["z2tp2"] / "checkpoints")
    assert (info.format, info.num_layers, info.step, info.zero_stage) == ("deepspeed", 2, STEPS, 2)
