"""megatron-core torch_dist checkpoints: grown offline, then loaded by megatron itself.

Sources are written by ``dist_checkpointing.save`` of the tiny GPTModel (+ megatron's FP32Optimizer
state) at TP=1 and TP=2 (tests/dist/torchdist_ckpt.py, subprocesses); grown copies are loaded with
``dist_checkpointing.load(model3.sharded_state_dict())`` at TP=1 and TP=2 and compared tensor by
tensor with the plan.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lag_ds.checkpoint.formats import detect_format, read_checkpoint_info
from lag_ds.checkpoint.grow import grow_checkpoint
from lag_ds.checkpoint.manifest import verify_manifest
from lag_ds.checkpoint.megatron_dist import TorchDistCheckpoint, grow_torch_dist_checkpoint
from lag_ds.checkpoint.megatron_layout import random_layer_param
from lag_ds.growth import parse_operator, plan_growth

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "dist" / "torchdist_ckpt.py"
# module parameter suffix -> the name megatron's sharded_state_dict stores it under
CKPT_SUFFIX = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
               "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
OUTPUT_PROJ = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")


def _run(*jobs: list[str]) -> None:
    """Run the script once per job, concurrently (each is mostly start-up: imports, spawn)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), *job], env=env, text=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for job in jobs]
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=300)
        finally:
            proc.kill()  # no-op once it exited; never leave one behind on a timeout
        assert proc.returncode == 0, err[-3000:]


def _tree_hash(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """{tp: (checkpoint dir, dump of the saved 2-layer model, sha256 of every file)}."""
    root = tmp_path_factory.mktemp("torchdist")
    _run(*(["save", str(root / f"src_tp{tp}"), "--layers", "2", "--tp", str(tp), "--optimizer",
            "--dump", str(root / f"src_tp{tp}.pt")] for tp in (1, 2)))
    return {tp: (root / f"src_tp{tp}", torch.load(root / f"src_tp{tp}.pt"),
                 _tree_hash(root / f"src_tp{tp}")) for tp in (1, 2)}


def _grow(src: Path, dst: Path, init: str, **options):
    plan = plan_growth(parse_operator(f"k=1,i0=1,b=1,init={init}"), 2, seed=7)
    if "reuse" in options:  # an API option, not a CLI one
        manifest = grow_torch_dist_checkpoint(src, dst, plan, show_progress=False, **options)
    else:
        manifest = grow_checkpoint(src, dst, plan, show_progress=False, **options)
    assert verify_manifest(dst) == []
    return plan, manifest


@pytest.fixture(scope="module")
def grown(sources, tmp_path_factory):
    """{init: (plan, manifest, source dump, dump of the 3-layer model megatron loaded it into)}:
    zero and duplicate (from the TP=2 source) loaded at TP=1 in one process, random at TP=2."""
    root = tmp_path_factory.mktemp("grown")
    jobs = {"zero": (1, {}, 1), "random": (1, {"init_std": 0.02}, 2),
            "duplicate": (2, {"optimizer_state": "copy"}, 1), "zero-linked": (2, {"reuse": "link"}, 1)}
    out = {}
    for name, (src_tp, options, _) in jobs.items():
        out[name] = _grow(sources[src_tp][0], root / name, name.split("-")[0], **options)
    loads = []
    for tp in (1, 2):
        inits = [i for i, job in jobs.items() if job[2] == tp]
        loads.append(["load", *(str(root / i) for i in inits), "--layers", "3", "--tp", str(tp),
                      "--optimizer", "--dump", *(str(root / f"{i}.pt") for i in inits)])
    _run(*loads)
    return {init: (*out[init], sources[jobs[init][0]][1], torch.load(root / f"{init}.pt"))
            for init in jobs} | {"root": root}


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


def _zero_new_layer(src_layer, suffix, loaded, name, source):
    old = f"decoder.layers.{src_layer.old_index}.{suffix}"
    for key in ("params", "exp_avg", "exp_avg_sq"):
        if suffix in OUTPUT_PROJ:  # zeroed: value and moments
            assert not loaded[key][name].any(), (key, name)
        else:
            assert torch.equal(loaded[key][name], source[key][old]), (key, name)


def test_grow_zero_is_function_preserving_and_loads_with_optimizer_state(grown):
    plan, manifest, source, loaded = grown["zero"]
    assert manifest["kind"] == "megatron-torch-dist"
    grown_ck = TorchDistCheckpoint(grown["root"] / "zero")
    assert grown_ck.num_layers == 3
    assert tuple(grown_ck.tensors["decoder.layers.mlp.linear_fc1.weight"].size) == (3, 128, 32)
    assert "decoder.layers.mlp.linear_fc2._extra_state/shard_2_3" in grown_ck.objects
    assert not any(k.endswith("_2") for k in grown_ck.objects)  # every object re-keyed

    _check_layers(loaded, source, plan, _zero_new_layer)
    assert torch.equal(loaded["logits"], source["logits"])  # identity block: bit-identical


def test_grow_by_reference_hard_links_the_source_and_loads_the_same(grown, sources):
    """reuse='link' (TP=2 source: two chunks per layer row): megatron loads the same tensors the
    plan asks for, and the grown directory shares the source's data files."""
    plan, manifest, source, loaded = grown["zero-linked"]
    _check_layers(loaded, source, plan, _zero_new_layer)
    src, dst = sources[2][0], grown["root"] / "zero-linked"
    linked = manifest["extra"]["hard_linked_files"]
    assert linked and all((dst / n).stat().st_ino == (src / n).stat().st_ino for n in linked)
    fresh = (dst / "__lag_grown.distcp").stat().st_size
    assert fresh < sum((src / n).stat().st_size for n in linked) / 4  # only the new rows


def test_a_grown_checkpoint_grows_again_but_not_by_reference(grown, tmp_path):
    """lag_ds's rewrite stores each stacked tensor as one chunk: growing it again works (3 -> 4),
    referencing its rows does not (one chunk spans all layers) and is refused before writing."""
    first = grown["root"] / "zero"
    plan = plan_growth(parse_operator("k=1,i0=0,b=1,init=duplicate"), 3, seed=1)
    with pytest.raises(ValueError, match="chunk spanning layers"):
        grow_torch_dist_checkpoint(first, tmp_path / "linked", plan, show_progress=False,
                                   reuse="link")
    assert not (tmp_path / "linked").exists()
    grow_torch_dist_checkpoint(first, tmp_path / "again", plan, show_progress=False)
    a, b = TorchDistCheckpoint(first), TorchDistCheckpoint(tmp_path / "again")
    key = "optimizer.state.exp_avg.decoder.layers.mlp.linear_fc2.weight"
    old, new = a.read(key), b.read(key)
    assert b.num_layers == 4 and torch.equal(new, torch.cat([old[:1], old]))


def test_grow_random_loads_at_tp2(grown):
    plan, _, source, loaded = grown["random"]

    def new_layer(src_layer, suffix, loaded, name, source):
        ckpt_suffix = CKPT_SUFFIX.get(suffix, suffix)
        want = random_layer_param(ckpt_suffix, tuple(loaded["params"][name].shape), std=0.02,
                                  num_layers=3, seed=src_layer.seed)
        assert torch.equal(loaded["params"][name], want), name
        assert not loaded["exp_avg"][name].any() and not loaded["exp_avg_sq"][name].any()

    _check_layers(loaded, source, plan, new_layer)


def test_grow_duplicate_of_a_tp2_checkpoint_loads_at_tp1(grown):
    plan, _, source, loaded = grown["duplicate"]

    def new_layer(src_layer, suffix, loaded, name, source):
        old = f"decoder.layers.{src_layer.copy_from}.{suffix}"
        for key in ("params", "exp_avg", "exp_avg_sq"):
            assert torch.equal(loaded[key][name], source[key][old]), (key, name)

    _check_layers(loaded, source, plan, new_layer)


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


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    if str(REPO / "tools") not in sys.path:  # as tests/test_bad_input.py imports the tool
        sys.path.insert(0, str(REPO / "tools"))
    tool = importlib.import_module("grow_checkpoint")
    code = tool.main([*argv, "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_names_the_format_and_refuses_bad_input_in_one_line(sources, tmp_path, capsys):
    src, _, _ = sources[1]
    code, out, _ = _cli(capsys, "--src", str(src), "--op", "k=1,i0=1,b=1,init=zero", "--dry-run")
    assert code == 0 and out.startswith("source: megatron-torch-dist, 2 layers"), out
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    (broken / ".metadata").write_bytes((broken / ".metadata").read_bytes()[:100])
    flat = tmp_path / "flat"  # as if a distributed optimizer had stored N-D flattened shards
    shutil.copytree(src, flat)
    with open(flat / ".metadata", "rb") as f:
        metadata = pickle.load(f)
    metadata.mcore_data = {"optimizer.state.exp_avg.x": {"nd_reformulated_orig_global_shape": ()}}
    with open(flat / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    cases = [
        (["--src", str(flat), "--dst", str(tmp_path / "c"), "--op", "k1-i1-b1-zero"],
         "N-D flattened tensors"),
        (["--src", str(src), "--dst", str(tmp_path / "a"), "--op", "k1-i1-b1-zero",
          "--target-tp", "2"], "--target-tp does not apply to megatron-torch-dist"),
        (["--src", str(broken), "--dst", str(tmp_path / "b"), "--op", "k1-i1-b1-zero"],
         ".metadata: cannot be read"),
        (["--src", str(src), "--dst", str(src.parent), "--op", "k1-i1-b1-zero"],
         "already exists"),
    ]
    for argv, message in cases:
        code, out, err = _cli(capsys, *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, (argv, err)
    assert not any((tmp_path / n).exists() for n in "abc")


def test_sources_untouched(sources):
    """Last: every growth above read the sources; none of their bytes changed."""
    for ckpt, _, hashes in sources.values():
        assert _tree_hash(ckpt) == hashes
        assert json.loads((ckpt / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
