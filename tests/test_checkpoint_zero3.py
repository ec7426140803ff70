"""ZeRO-3 checkpoints of the project's trainer: read per parameter, grown with optimizer state.

Ground truth is stock DeepSpeed, as in ``test_checkpoint_deepspeed.py``: the source (ZeRO-3,
DP=2, 3 steps) is loaded natively by DeepSpeed and every fp32 value and Adam moment dumped; the
grown output (universal layout) is loaded by stock ZeRO-3 at another DP degree (DP=1) and dumped
the same way, then compared with the plan applied to the first dump. The same DP degree (DP=2) is
covered by the trainer itself: a zero-init LAG candidate (hard-linked from a universal base)
resumes under ZeRO-3 at DP=2 with the base's validation loss. Bad inputs and a failing write go
through the CLI's ``main`` in-process (one ``error:`` line, exit 2, no destination).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO
from test_checkpoint_deepspeed import _train, _val_at, dump, expected_source, tree_digest

from lag_ds.checkpoint.formats import CheckpointReader, open_checkpoint, read_checkpoint_info
from lag_ds.checkpoint.universal_links import materialise_candidate
from lag_ds.growth import parse_operator, plan_growth
from lag_ds.train.preflight import preflight

STEPS = 3
DUP = "k=2,i0=0,b=1,init=duplicate"  # [0, 0*, 1, 1*]
ZERO = "k=2,i0=0,b=2,init=zero"  # [0, 1, 0*, 1*] with zeroed output projections


def _cli(tool: str = "grow_checkpoint"):
    spec = importlib.util.spec_from_file_location(tool, REPO / f"tools/{tool}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def z3(tmp_path_factory) -> dict:
    """A ZeRO-3 DP=2 run of the trainer (3 steps), its stock-DeepSpeed dump, a duplicate-grown
    copy written by the CLI, and the source's digest before and after."""
    root = tmp_path_factory.mktemp("zero3")
    cfg = yaml.safe_load((REPO / "launch_scripts/configs/tiny_base.yaml").read_text())
    cfg.update(cache_dir=str(root / "cache"), train_steps=STEPS, save_interval=STEPS,
               eval_interval=STEPS, ds_config=str(REPO / "ds_configs/cpu_zero3.json"))
    (root / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    run = _train(root, "z3dp2", ranks=2)
    src = run / "checkpoints"
    tag = src / f"global_step{STEPS}"
    assert sorted(p.name for p in tag.iterdir()) == [
        f"zero_pp_rank_{d}_mp_rank_00_{kind}_states.pt"
        for d in (0, 1) for kind in ("model", "optim")]
    before = tree_digest(src)
    ref = dump(src, root / "ref", stage=3, tp=1, dp=2, layers=2, universal=False, train_steps=0)
    dup = root / "dup"
    assert _cli()(["--src", str(src), "--dst", str(dup), "--op", DUP, "--no-progress",
                   "--verify"]) == 0
    return {"root": root, "run": run, "src": src, "ref": ref, "dup": dup, "before": before}


def test_reader_matches_stock_zero_to_fp32(z3):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    info = read_checkpoint_info(z3["src"])
    assert (info.format, info.num_layers, info.step, info.zero_stage) == (
        "deepspeed-zero3", 2, STEPS, 3)
    reader = open_checkpoint(z3["src"])
    assert isinstance(reader, CheckpointReader) and reader.num_layers == 2
    assert reader.full_shape("decoder.layers.0.mlp.linear_fc1.weight") == (128, 32)
    stock = get_fp32_state_dict_from_zero_checkpoint(str(z3["src"]))
    assert sorted(stock) == sorted(reader.param_names())
    for name in reader.param_names():  # values gathered from both ranks, padding cut off
        assert torch.equal(reader.value(name), stock[name].float()), name
        for key in ("fp32", "exp_avg", "exp_avg_sq"):  # and what stock DeepSpeed loads
            assert torch.equal(reader.value(name, key), z3["ref"][name][key]), (name, key)


def test_export_hf_reads_zero3(z3, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "hf"
    assert _cli("export_hf")([str(z3["src"]), str(out), "--config",
                              str(z3["root"] / "tiny.yaml"), "--no-tokenizer"]) == 0
    weights = load_file(out / "model.safetensors")
    reader = open_checkpoint(z3["src"])
    assert torch.equal(weights["model.layers.1.mlp.down_proj.weight"],
                       reader.value("decoder.layers.1.mlp.linear_fc2.weight"))
    assert torch.equal(weights["model.embed_tokens.weight"],
                       reader.value("embedding.word_embeddings.weight"))


def test_duplicate_growth_loads_with_stock_zero3_at_another_dp(z3, tmp_path):
    assert tree_digest(z3["src"]) == z3["before"]  # the source is only read
    ref = z3["ref"]
    got = dump(z3["dup"], tmp_path / "got", stage=3, tp=1, dp=1, layers=4, universal=True)
    plan = plan_growth(parse_operator(DUP), 2)
    assert got["__global_steps__"] == ref["__global_steps__"] == STEPS
    assert sum(1 for k in got if k.startswith("decoder.layers.3.")) > 0
    for name in (k for k in got if not k.startswith("__")):
        source, _ = expected_source(name, plan)
        for key in ("fp32", "exp_avg", "exp_avg_sq"):  # bit for bit, moments copied
            assert torch.equal(got[name][key], ref[source][key]), (name, key, source)
    assert ref["decoder.layers.0.mlp.linear_fc1.weight"]["exp_avg"].abs().sum() > 0


def test_zero_init_candidate_keeps_the_validation_loss_under_zero3(z3):
    """The LAG path: universal base once, a hard-linked candidate, the trainer resumes it."""
    root = z3["root"]
    base = root / "base_universal"
    assert _cli()(["--src", str(z3["src"]), "--dst", str(base), "--target-dp", "2",
                   "--no-progress"]) == 0
    cand = root / "cand_zero"
    plan = plan_growth(parse_operator(ZERO), 2)
    manifest = materialise_candidate(base, cand, plan, optimizer_state="zero")
    assert manifest["extra"]["hard_linked_files"] > 0
    tag = cand / f"global_step{STEPS}"
    assert (tag / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file()
    for name, src in [(f"decoder.layers.{i}.{s}", f"decoder.layers.{j}.{s}")
                      for i, j in ((2, 0), (3, 1))
                      for s in ("mlp.linear_fc2.weight", "mlp.linear_fc1.weight")]:
        old = {k: torch.load(base / tag.name / "zero" / src / f"{k}.pt")["param"]
               for k in ("fp32", "exp_avg")}
        new = {k: torch.load(tag / "zero" / name / f"{k}.pt")["param"] for k in ("fp32", "exp_avg")}
        assert new["exp_avg"].abs().sum() == 0  # optimizer_state=zero: new layers, zero moments
        if name.endswith("fc2.weight"):
            assert new["fp32"].abs().sum() == 0  # zeroed output projection
        else:
            assert torch.equal(new["fp32"], old["fp32"])
    run = _train(root, "z3_cand", f"init_from={cand}", "num_layers=4",
                 f"train_steps={STEPS + 1}", ranks=2)
    base_val, grown_val = _val_at(z3["run"], STEPS), _val_at(run, STEPS)
    assert grown_val == pytest.approx(base_val, rel=1e-5, abs=1e-5)
    saved = read_checkpoint_info(run / "checkpoints")  # the trainer saves native ZeRO-3 again
    assert (saved.format, saved.num_layers, saved.step) == ("deepspeed-zero3", 4, STEPS + 1)
    cfg = dataclasses.replace(_config(root), run_dir=str(run), num_layers=4)
    assert preflight(cfg) == f"resume {run / 'checkpoints' / f'global_step{STEPS + 1}'}"


# ----------------------------------------------------------------------------- bad inputs
def _fails(capsys, argv: list[str], dst: Path, *needles: str) -> None:
    capsys.readouterr()
    assert _cli()([*argv, "--dst", str(dst), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for needle in needles:
        assert needle in err[0], err[0]
    assert not dst.exists() and not list(dst.parent.glob(f".{dst.name}.partial-*"))


def _config(root: Path):
    from lag_ds.config import load_yaml
    from lag_ds.train.config import TrainConfig

    return load_yaml(TrainConfig, root / "tiny.yaml")


def test_trainer_preflight_validates_a_zero3_resume(z3, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(z3["run"] / "checkpoints", run / "checkpoints")
    cfg = dataclasses.replace(_config(z3["root"]), run_dir=str(run))
    assert preflight(cfg).startswith("resume ")
    with pytest.raises(ValueError, match="tensor_parallel=2"):
        preflight(dataclasses.replace(cfg, tensor_parallel=2))
    tag = run / "checkpoints" / f"global_step{STEPS}"
    (tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(ValueError, match=r"missing dp rank\(s\) \[1\]"):
        preflight(cfg)


def test_bad_inputs_fail_in_one_line(z3, tmp_path, capsys):
    ck = tmp_path / "ck"
    shutil.copytree(z3["src"], ck)
    tag = ck / f"global_step{STEPS}"
    out = tmp_path / "out"
    _fails(capsys, ["--src", str(ck), "--op", DUP, "--target-tp", "2"], out, "--target-tp")
    capsys.readouterr()
    assert _cli()(["--src", str(z3["src"]), "--dst", str(z3["dup"]), "--op", DUP]) == 2
    assert "already exists" in capsys.readouterr().err
    victim = tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    _fails(capsys, ["--src", str(ck), "--op", DUP], out, victim.name, "truncated or corrupt")
    victim.unlink()
    _fails(capsys, ["--src", str(ck), "--op", DUP], out, "missing dp rank(s) [1]")
    (tag / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()
    _fails(capsys, ["--src", str(ck), "--op", DUP], out, "dp_world_size=2")
    _fails(capsys, ["--src", str(z3["src"]), "--op", "k=3,i0=0,b=1,init=duplicate"], out, "k=3")


def test_a_failing_write_leaves_no_destination(z3, tmp_path, monkeypatch):
    from lag_ds.checkpoint import deepspeed_zero3

    calls = {"n": 0}
    real_save = torch.save

    def flaky_save(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError("disk full (injected)")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(deepspeed_zero3.torch, "save", flaky_save)
    dst = tmp_path / "out"
    with pytest.raises(OSError, match="injected"):
        deepspeed_zero3.grow_zero3_checkpoint(z3["src"], dst, plan_growth(parse_operator(DUP), 2),
                                              show_progress=False)
    assert not dst.exists() and not list(tmp_path.glob(".out.partial-*"))
    assert tree_digest(z3["src"]) == z3["before"]


def test_bf16_zero3_grows_and_keeps_the_validation_loss_at_another_dp(z3):
    """bf16 ZeRO-3 (``bf16_zero_pp_rank_*`` files, fp32 masters): zero-init growth of a DP=2 run,
    resumed by the trainer at DP=1 under bf16 ZeRO-3, gives the base's validation loss."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root = z3["root"]
    ds = root / "bf16_zero3.json"
    ds.write_text('{"zero_optimization": {"stage": 3}, "bf16": {"enabled": true}, '
                  '"gradient_clipping": 1.0, "steps_per_print": 1000000}')
    run = _train(root, "bf16_z3dp2", f"ds_config={ds}", ranks=2)
    src = run / "checkpoints"
    assert sorted(p.name for p in (src / f"global_step{STEPS}").glob("*optim_states.pt")) == [
        f"bf16_zero_pp_rank_{d}_mp_rank_00_optim_states.pt" for d in (0, 1)]
    reader = open_checkpoint(src)
    stock = get_fp32_state_dict_from_zero_checkpoint(str(src))
    for name in reader.param_names():  # the fp32 masters, not the bf16 module copies
        assert torch.equal(reader.value(name), stock[name].float()), name
    dst = root / "bf16_zero"
    assert _cli()(["--src", str(src), "--dst", str(dst), "--op", ZERO, "--no-progress"]) == 0
    grown = _train(root, "bf16_z3_grown", f"ds_config={ds}", f"init_from={dst}", "num_layers=4",
                   f"train_steps={STEPS + 1}")
    assert _val_at(grown, STEPS) == pytest.approx(_val_at(run, STEPS), rel=1e-5, abs=1e-5)


def test_sigkill_mid_write_leaves_no_destination_and_rerun_succeeds(z3, tmp_path):
    import subprocess
    import sys

    from conftest import deepspeed_env

    dst = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "tools/grow_checkpoint.py"), "--src", str(z3["src"]),
           "--dst", str(dst), "--op", DUP, "--no-progress"]
    env = dict(deepspeed_env(), LAG_DS_FAULT_POINT="zero3.param_written:5")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILL after the 5th parameter
    assert not dst.exists() and list(tmp_path.glob(".out.partial-*"))
    assert tree_digest(z3["src"]) == z3["before"]
    assert _cli()(["--src", str(z3["src"]), "--dst", str(dst), "--op", DUP, "--no-progress",
                   "--verify"]) == 0
    assert not list(tmp_path.glob(".out.partial-*"))  # the killed run's leftovers are gone
