"""Growth of DeepSpeed ``PipelineModule`` (layer-file) checkpoints written by *stock* DeepSpeed.

Sources come from ``tests/dist/pipe_ckpt.py`` (a tiny GPT as ``LayerSpec`` / ``TiedLayerSpec`` lists
with Megatron-DeepSpeed, BLOOM-era Megatron-DeepSpeed or GPT-NeoX layer names, topology
``PipeModelDataParallelTopology``, ZeRO-1 or ``BF16_Optimizer``), 2 gloo ranks under the deepspeed
launcher; no lag_ds code runs in them. The same script, in a fresh process, loads the grown output
with ``load_universal`` at another pipeline / data-parallel degree, dumps every parameter's fp32
master and Adam moments (``safe_get_full_*``), reloads the layer files with stock
``PipelineModule.load_state_dir`` (they must give the same weights), evaluates a fixed batch and
trains two steps. The test applies the plan to the source's dump and compares bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import BIN, REPO, deepspeed_env

from lag_ds.checkpoint.deepspeed_pipe import PipeCheckpoint
from lag_ds.checkpoint.formats import CheckpointReader, open_checkpoint, read_checkpoint_info
from lag_ds.growth import parse_operator, plan_growth
from lag_ds.train.distributed import free_port

SCRIPT = REPO / "tests/dist/pipe_ckpt.py"
STEPS = 3
LAYERS = 4
TAG = f"global_step{STEPS}"

SOURCES = {  # name: (ranks, env)
    "meg_pp2": (2, {"STYLE": "megatron", "PP": "2", "STAGE": "1"}),
    "meg_dp2": (2, {"STYLE": "megatron", "PP": "1", "STAGE": "1"}),
    "neox_pp2": (2, {"STYLE": "neox", "PP": "2", "STAGE": "1", "TIED": "0"}),
    "bf16_z1_dp2": (2, {"STYLE": "megatron", "PP": "1", "STAGE": "1", "BF16": "1"}),
    "bf16_z0_old_pp2": (2, {"STYLE": "megatron_old", "PP": "2", "STAGE": "0", "BF16": "1"}),
}
FIRST_LAYER = {"megatron": 2, "megatron_old": 3, "neox": 2}


def run_pipe(ranks: int, out: Path, **env_vars: str) -> dict:
    env = deepspeed_env()
    env.update({"LAYERS": str(LAYERS), "OUT": str(out), **env_vars})
    cmd = [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()),
           str(SCRIPT)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(Path(f"{out}.json").read_text())
    stages = sorted(out.parent.glob(f"{out.name}.pp*"))
    dump: dict = {}
    for path in stages:
        for name, values in torch.load(path).items():
            if name not in dump:  # a tied module lives on the first and the last stage:
                dump[name] = values  # the first stage's copy is the one its layer file holds
            elif name.endswith("word_embeddings.weight"):  # the tied weight itself is synchronised
                assert all(torch.equal(values[k], dump[name][k]) for k in values), name
    report["dump"] = dump
    return report


class _Sources(dict):
    """Stock-DeepSpeed source checkpoints, each written on first use (a test selected with -k
    builds only what it needs)."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, name: str) -> dict:
        ranks, env = SOURCES[name]
        report = run_pipe(ranks, self.root / name, MODE="save", DIR=str(self.root / f"{name}_ck"),
                          TRAIN_STEPS=str(STEPS), **env)
        self[name] = {"dir": self.root / f"{name}_ck", "env": env, **report}
        return self[name]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> _Sources:
    return _Sources(tmp_path_factory.mktemp("pipe_sources"))


def grow(src: Path, dst: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "python"), str(REPO / "tools/grow_checkpoint.py"), "--src", str(src),
           "--dst", str(dst), "--no-progress", *args]
    return subprocess.run(cmd, cwd=REPO, env=deepspeed_env(), capture_output=True, text=True,
                          timeout=300)


def expected(name: str, plan, style: str) -> tuple[str | None, object]:
    """Source parameter of grown parameter ``name`` and the plan's layer (None outside layers)."""
    first = FIRST_LAYER[style]
    head, _, suffix = name.partition(".")
    if not head.isdigit():
        return name, None  # tied_modules.*
    idx = int(head)
    if idx < first:
        return name, None
    if idx >= first + plan.new_num_layers:
        return f"{idx - plan.operator.num_new_layers}.{suffix}", None
    layer = plan.layers[idx - first]
    return (None if layer.copy_from is None else f"{first + layer.copy_from}.{suffix}"), layer


OUT_PROJ = ("dense.weight", "dense.bias", "dense_4h_to_h.weight", "dense_4h_to_h.bias",
            "linear2.weight", "linear2.bias")


def check_against_plan(got: dict, ref: dict, plan, style: str, policy: str = "copy") -> int:
    """Every grown parameter and moment equals the plan applied to the source; returns #checked."""
    checked = 0
    assert len(got) == len(ref) + plan.operator.num_new_layers * 12, (len(got), len(ref))
    for name, values in got.items():
        source, layer = expected(name, plan, style)
        new = layer is not None and layer.is_new
        zeroed = new and layer.zero_output_projections and name.endswith(OUT_PROJ)
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            value = values[key]
            if zeroed or (new and key != "fp32" and (policy == "zero" or source is None)):
                assert value.abs().sum() == 0, (name, key)
            elif source is None:  # a random layer's value
                if name.endswith("bias"):
                    assert value.abs().sum() == 0, name
                elif "layernorm" in name:
                    assert torch.equal(value, torch.ones_like(value)), name
                else:
                    assert 0.001 < value.std().item() < 0.05, name
            else:
                assert torch.equal(value, ref[source][key]), (name, key, source)
            checked += 1
        assert torch.equal(values["lp"], values["fp32"].to(values["lp"].dtype).float()) or \
            torch.equal(values["lp"], values["fp32"].bfloat16().float()), name
    return checked


def load(dst: Path, out: Path, *, ranks: int, pp: int, style: str, tied: str = "1",
         bf16: str = "0", stage: str = "1", layers: int) -> dict:
    env = {"STYLE": style, "PP": str(pp), "TIED": tied, "BF16": bf16, "STAGE": stage,
           "LAYERS": str(layers)}
    report = run_pipe(ranks, out, MODE="load", UNIVERSAL="1", DIR=str(dst), SEED="99",
                      TRAIN_STEPS="2", **env)
    assert report["loaded_global_steps"] == STEPS
    assert report["layer_file_mismatches"] == []  # stock load_state_dir reads the same weights
    assert report["global_steps"] == STEPS + 2 and len(report["train"]) == 2  # training continues
    return report


# ----------------------------------------------------------------------------- growth, loaded back
CASES = {  # source, operator, policy, load layouts [(ranks, pp)]
    "meg_pp2": ("k=2,i0=1,b=1,init=duplicate", "copy", [(2, 2), (1, 1)]),
    "meg_dp2": ("k=2,i0=2,b=2,init=zero", "copy", [(2, 2), (1, 1)]),
    "neox_pp2": ("k=2,i0=0,b=2,init=random", "zero", [(2, 2), (1, 1)]),
    "bf16_z1_dp2": ("k=1,i0=3,b=1,init=zero", "copy", [(2, 2), (2, 1)]),
    "bf16_z0_old_pp2": ("k=2,i0=1,b=1,init=duplicate", "zero", [(2, 2), (1, 1)]),
}
LOAD_STAGE = {"bf16_z0_old_pp2": "1"}
"""Stock DeepSpeed 0.19.8 passes no checkpoint folder to ``BF16_Optimizer`` at ZeRO-0 (engine.py
``_load_checkpoint``), so it loads universal state only with ZeRO-1; BF16_Optimizer partitions
fp32 masters and moments over DP exactly like ZeRO-1, so the run continues with bf16 ZeRO-1."""


@pytest.mark.parametrize("name", list(CASES))
def test_grown_pipe_checkpoint_loads_at_other_pp_and_dp_and_equals_the_plan(sources, tmp_path, name):
    source = sources[name]
    op, policy, layouts = CASES[name]
    env = source["env"]
    src_tag = source["dir"] / TAG
    before = {p.name: p.read_bytes() for p in src_tag.iterdir()}
    dst = tmp_path / "grown"
    proc = grow(source["dir"], dst, "--op", op, "--optimizer-state", policy, "--seed", "3", "--verify")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in src_tag.iterdir()} == before  # source only read
    plan = plan_growth(parse_operator(op), LAYERS, seed=3)
    style = env["STYLE"]
    _check_layer_files(source["dir"] / TAG, dst / TAG, plan, FIRST_LAYER[style])
    info = read_checkpoint_info(dst)
    assert (info.num_layers, info.step) == (LAYERS + plan.operator.num_new_layers, STEPS)
    for ranks, pp in layouts:
        got = load(dst, tmp_path / f"pp{pp}r{ranks}", ranks=ranks, pp=pp, style=style,
                   tied=env.get("TIED", "1"), bf16=env.get("BF16", "0"),
                   stage=LOAD_STAGE.get(name, env["STAGE"]),
                   layers=plan.new_num_layers)
        assert check_against_plan(got["dump"], source["dump"], plan, style, policy) > 100
        if plan.operator.function_preserving:  # zero init: the same function, the same loss
            assert got["eval_before"] == source["eval_after"], (got["eval_before"], source["eval_after"])
        else:
            assert got["eval_before"] != source["eval_after"]


def _check_layer_files(src: Path, dst: Path, plan, first: int) -> None:
    """Renumbered and duplicated layers are hard links to the source's files; new ones written."""
    k = plan.operator.num_new_layers
    src_files = {p.name: p for p in src.glob("layer_*")}
    dst_files = {p.name: p for p in dst.glob("layer_*")}
    assert len(dst_files) == len(src_files) + k
    for name, path in dst_files.items():
        idx = int(name[6:8])
        rest = name[8:]
        if first <= idx < first + plan.new_num_layers:
            layer = plan.layers[idx - first]
            linked = not layer.is_new or layer.init == "duplicate"
            src_idx = first + layer.old_index
        else:
            linked, src_idx = True, idx if idx < first else idx - k
        source = src / f"layer_{src_idx:02d}{rest}"
        if linked:
            assert os.path.samefile(path, source), name
        else:
            assert path.stat().st_nlink == 1 and path.read_bytes() != source.read_bytes(), name


def test_roles_come_from_names_not_offsets(sources):
    cases = {"meg_pp2": ("megatron-deepspeed-pipe", 2, [1, 6], {"embed": 1}),
             "bf16_z0_old_pp2": ("megatron-deepspeed-pipe", 3, [1, 8], {"embed": 1}),
             "neox_pp2": ("neox-pipe", 2, [0, 7, 8], {})}
    for name, (family, first, others, tied) in cases.items():
        ck = PipeCheckpoint(sources[name]["dir"])
        assert (ck.family, ck.first_layer_index, ck.num_layers) == (family, first, LAYERS)
        assert sorted(set(ck.layer_files) - set(ck.layer_indices)) == others
        assert ck.tied_index == tied
    assert PipeCheckpoint(sources["neox_pp2"]["dir"]).role(8) == "head"
    for name, stage in (("meg_pp2", 1), ("bf16_z0_old_pp2", 0)):
        info = read_checkpoint_info(sources[name]["dir"])
        assert (info.format, info.num_layers, info.step, info.zero_stage) == (
            "deepspeed-pipe", LAYERS, STEPS, stage)
    ck = PipeCheckpoint(sources["meg_pp2"]["dir"])
    assert (ck.pp, ck.tp, ck.dp, ck.bf16) == (2, 1, 1, False)
    ck = PipeCheckpoint(sources["bf16_z1_dp2"]["dir"])
    assert (ck.pp, ck.tp, ck.dp, ck.bf16, ck.optim_prefix) == (1, 1, 2, True, "bf16_")


def test_reader_protocol_values_equal_what_deepspeed_held(sources):
    """The seam's reader gives, for every parameter, the fp32 master and moments the live engine
    had (dumped by the stock process), gathered over DP partitions and pipeline stages."""
    for name in ("meg_pp2", "bf16_z1_dp2"):
        reader = open_checkpoint(sources[name]["dir"])
        assert isinstance(reader, CheckpointReader) and reader.format == "deepspeed-pipe"
        assert (reader.num_layers, reader.global_steps) == (LAYERS, STEPS)
        dump = sources[name]["dump"]
        assert sorted(reader.param_names()) == sorted(dump)
        for param in reader.param_names():
            assert reader.full_shape(param) == tuple(dump[param]["fp32"].shape)
            for key in ("fp32", "exp_avg", "exp_avg_sq"):
                assert torch.equal(reader.value(param, key), dump[param][key]), (name, param, key)


# ----------------------------------------------------------------------------- bad inputs
def _broken(sources, tmp_path, name="meg_pp2") -> Path:
    ck = tmp_path / "ck"
    shutil.copytree(sources[name]["dir"], ck)
    return ck / TAG


def _cli():
    import importlib.util

    spec = importlib.util.spec_from_file_location("grow_cli", REPO / "tools/grow_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _fails(src: Path, tmp_path: Path, *needles: str, args=("--op", "k=1,i0=0,b=1,init=duplicate")):
    """In-process CLI call: exit code 2, one error line naming the culprit, nothing written."""
    import contextlib
    import io

    dst = tmp_path / "out"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = _cli()(["--src", str(src), "--dst", str(dst), "--no-progress", *args])
    assert code == 2, err.getvalue()
    lines = err.getvalue().strip().splitlines()
    assert lines[-1].startswith("error: "), lines[-1]
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    assert not dst.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_missing_layer_file(sources, tmp_path):
    tag = _broken(sources, tmp_path)
    (tag / "layer_06-model_00-model_states.pt").unlink()
    _fails(tag, tmp_path, "layer_06-model_00-model_states.pt: missing")


def test_gap_in_layer_numbering(sources, tmp_path):
    tag = _broken(sources, tmp_path)
    os.rename(tag / "layer_04-model_00-model_states.pt", tag / "layer_09-model_00-model_states.pt")
    _fails(tag, tmp_path, "layer_04-model_00-model_states.pt: missing")


def test_layer_file_from_another_run(sources, tmp_path):
    tag = _broken(sources, tmp_path)
    shutil.copyfile(sources["meg_dp2"]["dir"] / TAG / "layer_03-model_00-model_states.pt",
                    tag / "layer_03-model_00-model_states.pt")
    _fails(tag, tmp_path, "layer_03-model_00-model_states.pt", "another run")


def test_mismatched_pipeline_count(sources, tmp_path):
    tag = _broken(sources, tmp_path)
    (tag / "mp_rank_01_model_states.pt").unlink()
    _fails(tag, tmp_path, "mp_rank_00_model_states.pt", "mp_world_size=2")


def test_mismatched_tensor_parallel_count(sources, tmp_path):
    tag = _broken(sources, tmp_path)  # one layer claims a second TP rank the others lack
    shutil.copyfile(tag / "layer_03-model_00-model_states.pt", tag / "layer_03-model_01-model_states.pt")
    _fails(tag, tmp_path, "layer_01-model_01-model_states.pt: missing")


def test_missing_optimizer_partition(sources, tmp_path):
    tag = _broken(sources, tmp_path, "meg_dp2")
    (tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    _fails(tag, tmp_path, "zero_pp_rank_1_mp_rank_00_optim_states.pt: missing")


def test_options_a_format_cannot_honour_are_errors(sources, tmp_path):
    _fails(sources["meg_pp2"]["dir"], tmp_path, "--target-tp 2",
           args=("--op", "k=1,i0=0,b=1,init=duplicate", "--target-tp", "2"))


def test_hf_checkpoint_refuses_optimizer_state_option(tmp_path):
    import transformers

    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=16)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
    _fails(tmp_path / "hf", tmp_path, "--optimizer-state does not apply to hf-safetensors",
           args=("--op", "k=1,i0=0,b=1,init=duplicate", "--optimizer-state", "zero"))
    _fails(tmp_path / "hf", tmp_path, "--init-std does not apply to hf-safetensors",
           args=("--op", "k=1,i0=0,b=1,init=random", "--init-std", "0.01"))


def test_megatron_args_follow_the_grown_depth(sources, tmp_path):
    """Megatron-DeepSpeed pickles its argparse ``args`` into the mp_rank files and checks
    ``args.num_layers`` on load: the grown metadata carries the grown depth."""
    import argparse

    from lag_ds.checkpoint.grow import grow_checkpoint

    tag = _broken(sources, tmp_path)
    for path in tag.glob("mp_rank_*_model_states.pt"):
        meta = torch.load(path, weights_only=False)
        meta["args"] = argparse.Namespace(num_layers=LAYERS, hidden_size=16)
        torch.save(meta, path)
    plan = plan_growth(parse_operator("k=1,i0=0,b=1,init=duplicate"), LAYERS)
    grow_checkpoint(tag, tmp_path / "out", plan, show_progress=False, unsafe_load=True)
    meta = torch.load(tmp_path / "out" / TAG / "mp_rank_00_model_states.pt", weights_only=False)
    assert meta["args"].num_layers == LAYERS + 1 and meta["args"].hidden_size == 16
