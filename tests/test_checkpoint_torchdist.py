"""megatron-core torch_dist checkpoints: grown offline, then loaded by megatron itself.

Sources are written by ``dist_checkpointing.save`` of the tiny GPTModel (+ megatron's FP32Optimizer
state) at TP=1 and TP=2 (tests/dist/torchdist_ckpt.py, subprocesses); grown copies are loaded with
``dist_checkpointing.load(model3.sharded_state_dict())`` at TP=1 and TP=2 and compared tensor by
tensor with the plan.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lag_ds.checkpoint.formats import detect_format, read_checkpoint_info
from lag_ds.checkpoint.grow import grow_checkpoint
from lag_ds.checkpoint.manifest import verify_manifest
from lag_ds.checkpoint.megatron_dist import TorchDistCheckpoint
from lag_ds.checkpoint.megatron_layout import random_layer_param
from lag_ds.growth import parse_operator, plan_growth

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "dist" / "torchdist_ckpt.py"
# module parameter suffix -> the name megatron's sharded_state_dict stores it under
CKPT_SUFFIX = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
               "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
OUTPUT_PROJ = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")


def _run(*args: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _tree_hash(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """{tp: (checkpoint dir, dump of the saved 2-layer model, sha256 of every file)}."""
    root = tmp_path_factory.mktemp("torchdist")
    out = {}
    for tp in (1, 2):
        ckpt, dump = root / f"src_tp{tp}", root / f"src_tp{tp}.pt"
        _run("save", str(ckpt), "--layers", "2", "--tp", str(tp), "--optimizer", "--dump", str(dump))
        out[tp] = (ckpt, torch.load(dump), _tree_hash(ckpt))
    return out


def _grow(src: Path, dst: Path, init: str, **options):
    plan = plan_growth(parse_operator(f"k=1,i0=1,b=1,init={init}"), 2, seed=7)
    manifest = grow_checkpoint(src, dst, plan, show_progress=False, **options)
    assert verify_manifest(dst) == []
    return plan, manifest


def _load(ckpt: Path, tp: int, tmp_path: Path) -> dict:
    dump = tmp_path / f"loaded_{ckpt.name}_tp{tp}.pt"
    _run("load", str(ckpt), "--layers", "3", "--tp", str(tp), "--optimizer", "--dump", str(dump))
    return torch.load(dump)


def _check_layers(loaded: dict, source: dict, plan, expect_new) -> None:
    """Old layers bit-identical (values and moments); the new layer per ``expect_new``."""
    for name, value in loaded["params"].items():
        parts = name.split(".")
        if parts[:2] != ["decoder", "layers"]:
            for key in ("params", "exp_avg", "exp_avg_sq"):
                assert torch.equal(loaded[key][name], source[key][name]), (key, name)
            continue
        layer, suffix = int(parts[2]), ".".join(parts[3:])
        src = plan.layers[layer]
        if not src.is_new:
            old = f"decoder.layers.{src.old_index}.{suffix}"
            for key in ("params", "exp_avg", "exp_avg_sq"):
                assert torch.equal(loaded[key][name], source[key][old]), (key, name)
        else:
            expect_new(src, suffix, loaded, name, source)


def test_grow_zero_is_function_preserving_and_loads_with_optimizer_state(sources, tmp_path):
    src, source, _ = sources[1]
    plan, manifest = _grow(src, tmp_path / "zero", "zero")
    assert manifest["kind"] == "megatron-torch-dist"
    grown = TorchDistCheckpoint(tmp_path / "zero")
    assert grown.num_layers == 3
    assert tuple(grown.tensors["decoder.layers.mlp.linear_fc1.weight"].size) == (3, 128, 32)
    assert "decoder.layers.mlp.linear_fc2._extra_state/shard_2_3" in grown.objects
    assert not any(k.endswith("_2") for k in grown.objects)  # every object re-keyed for 3 layers

    def new_layer(src_layer, suffix, loaded, name, source):
        old = f"decoder.layers.{src_layer.old_index}.{suffix}"
        for key in ("params", "exp_avg", "exp_avg_sq"):
            if suffix in OUTPUT_PROJ:  # zeroed: value and moments
                assert not loaded[key][name].any(), (key, name)
            else:
                assert torch.equal(loaded[key][name], source[key][old]), (key, name)

    loaded = _load(tmp_path / "zero", 1, tmp_path)
    _check_layers(loaded, source, plan, new_layer)
    assert torch.equal(loaded["logits"], source["logits"])  # identity block: bit-identical


def test_grow_random_loads_at_tp2(sources, tmp_path):
    src, source, _ = sources[1]
    plan, _ = _grow(src, tmp_path / "random", "random", init_std=0.02)

    def new_layer(src_layer, suffix, loaded, name, source):
        ckpt_suffix = CKPT_SUFFIX.get(suffix, suffix)
        want = random_layer_param(ckpt_suffix, tuple(loaded["params"][name].shape), std=0.02,
                                  num_layers=3, seed=src_layer.seed)
        assert torch.equal(loaded["params"][name], want), name
        assert not loaded["exp_avg"][name].any() and not loaded["exp_avg_sq"][name].any()

    loaded = _load(tmp_path / "random", 2, tmp_path)
    _check_layers(loaded, source, plan, new_layer)


def test_grow_duplicate_of_a_tp2_checkpoint_loads_at_tp1(sources, tmp_path):
    src, source, _ = sources[2]
    plan, _ = _grow(src, tmp_path / "dup", "duplicate", optimizer_state="copy")

    def new_layer(src_layer, suffix, loaded, name, source):
        old = f"decoder.layers.{src_layer.copy_from}.{suffix}"
        for key in ("params", "exp_avg", "exp_avg_sq"):
            assert torch.equal(loaded[key][name], source[key][old]), (key, name)

    loaded = _load(tmp_path / "dup", 1, tmp_path)
    _check_layers(loaded, source, plan, new_layer)
    # same model saved at TP=2, read back at TP=1: the forward agrees with the TP=2 source's to
    # float rounding on the old part; not compared, the grown model has an extra (duplicate) layer


def test_megatron_lm_run_directory_and_common_args(sources, tmp_path):
    """A tracker + iter_NNNNNNN directory, and common.pt holding Megatron-LM's args namespace."""
    src, _, _ = sources[1]
    run = tmp_path / "run"
    shutil.copytree(src, run / "iter_0000007")
    (run / "latest_checkpointed_iteration.txt").write_text("7")
    torch.save({"args": argparse.Namespace(num_layers=2, hidden_size=32), "iteration": 7},
               run / "iter_0000007" / "common.pt")
    info = read_checkpoint_info(run)
    assert (info.format, info.num_layers, info.step) == ("megatron-torch-dist", 2, 7)
    _grow(run, tmp_path / "grown", "duplicate")
    assert (tmp_path / "grown" / "latest_checkpointed_iteration.txt").read_text() == "7"
    with torch.serialization.safe_globals([argparse.Namespace]):
        common = torch.load(tmp_path / "grown" / "iter_0000007" / "common.pt")
    assert common["args"].num_layers == 3 and common["iteration"] == 7
    assert detect_format(tmp_path / "grown").name == "megatron-torch-dist"


def _cli(*argv: str) -> tuple[int, str, str]:
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "grow_checkpoint.py"), *argv],
                          env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                          text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def test_cli_names_the_format_and_refuses_bad_input_in_one_line(sources, tmp_path):
    src, _, _ = sources[1]
    code, out, _ = _cli("--src", str(src), "--op", "k=1,i0=1,b=1,init=zero", "--dry-run")
    assert code == 0 and out.startswith("source: megatron-torch-dist, 2 layers"), out
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    (broken / ".metadata").write_bytes((broken / ".metadata").read_bytes()[:100])
    cases = [
        (["--src", str(src), "--dst", str(tmp_path / "a"), "--op", "k1-i1-b1-zero",
          "--target-tp", "2"], "--target-tp does not apply to megatron-torch-dist"),
        (["--src", str(broken), "--dst", str(tmp_path / "b"), "--op", "k1-i1-b1-zero"],
         ".metadata: cannot be read"),
        (["--src", str(src), "--dst", str(src.parent), "--op", "k1-i1-b1-zero"],
         "already exists"),
    ]
    for argv, message in cases:
        code, out, err = _cli(*argv)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, (argv, err)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_sources_untouched(sources):
    """Last: every growth above read the sources; none of their bytes changed."""
    for ckpt, _, hashes in sources.values():
        assert _tree_hash(ckpt) == hashes
        assert json.loads((ckpt / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
