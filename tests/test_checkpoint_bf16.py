"""bf16 DeepSpeed checkpoints of the project's trainer: ZeRO-1 (``bf16_zero_pp_rank_*`` files) and
ZeRO-0 (DeepSpeed's mixed-precision wrapper inside ``mp_rank_00_model_states.pt['optimizer']``:
fp32 masters in ``fp32_groups``, Adam moments in ``optimizer_state_dict``).

Both grow with their optimizer state; a zero-init growth leaves the validation loss of the
trainer unchanged (ZeRO-1: resumed at DP=1 and DP=2), and ZeRO-0's output files are checked
against the source files directly, parameter by parameter, with the test's own name mapping.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import BIN, REPO, deepspeed_env

from lag_ds.train.distributed import free_port

TOOL = REPO / "tools/grow_checkpoint.py"
STEPS = 3


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=deepspeed_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _train(root: Path, name: str, *sets: str, ranks: int = 1) -> Path:
    run_dir = root / name
    args = ["--config", str(root / "tiny.yaml"), "--set", f"run_dir={run_dir}",
            *[a for s in sets for a in ("--set", s)]]
    if ranks == 1:
        cmd = [sys.executable, "-m", "lag_ds.train", *args]
    else:
        cmd = [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()),
               "--module", "lag_ds.train", *args]
    _run(cmd)
    return run_dir


def _val_at(run_dir: Path, step: int) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r["val/loss"] for r in rows if r["step"] == step and "val/loss" in r)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bf16")
    cfg = yaml.safe_load((REPO / "launch_scripts/configs/tiny_base.yaml").read_text())
    cfg.update(cache_dir=str(root / "cache"), train_steps=STEPS, save_interval=STEPS,
               eval_interval=STEPS)
    (root / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    for stage in (0, 1):
        ds = {"zero_optimization": {"stage": stage}, "bf16": {"enabled": True},
              "gradient_clipping": 1.0, "steps_per_print": 1000000}
        (root / f"bf16_zero{stage}.json").write_text(json.dumps(ds))
    return root


def grow(src: Path, dst: Path, *args: str) -> None:
    _run([sys.executable, str(TOOL), "--src", str(src), "--dst", str(dst), "--no-progress", *args])


def test_bf16_zero1_dp2_zero_init_growth_keeps_val_loss_at_dp1_and_dp2(root):
    src_run = _train(root, "z1dp2", f"ds_config={root / 'bf16_zero1.json'}", ranks=2)
    tag = src_run / "checkpoints" / f"global_step{STEPS}"
    assert sorted(p.name for p in tag.glob("*optim_states.pt")) == [
        "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    dst = root / "z1_zero"
    grow(src_run / "checkpoints", dst, "--op", "k=2,i0=0,b=2,init=zero")
    base = _val_at(src_run, STEPS)
    for ranks in (1, 2):
        run = _train(root, f"z1_grown_dp{ranks}", f"ds_config={root / 'bf16_zero1.json'}",
                     f"init_from={dst}", "num_layers=4", f"train_steps={STEPS + 1}", ranks=ranks)
        assert _val_at(run, STEPS) == pytest.approx(base, rel=1e-5, abs=1e-5), ranks


def _split(name: str) -> tuple[int, str] | None:
    match = re.match(r"^decoder\.layers\.(\d+)\.(.+)$", name)
    return (int(match.group(1)), match.group(2)) if match else None


def test_bf16_zero0_grows_with_its_optimizer_state(root):
    src_run = _train(root, "z0", f"ds_config={root / 'bf16_zero0.json'}")
    src_file = src_run / "checkpoints" / f"global_step{STEPS}" / "mp_rank_00_model_states.pt"
    dst = root / "z0_dup"
    grow(src_run / "checkpoints", dst, "--op", "k=1,i0=1,b=1,init=duplicate")  # [0, 1, 1*]
    out_file = dst / f"global_step{STEPS}" / "mp_rank_00_model_states.pt"
    src, out = torch.load(src_file, weights_only=False), torch.load(out_file, weights_only=False)

    def table(states):
        names = [k for k, v in states["module"].items() if isinstance(v, torch.Tensor)]
        opt = states["optimizer"]
        return {n: {"lp": states["module"][n], "fp32": opt["fp32_groups"][0][i],
                    **{k: opt["optimizer_state_dict"]["state"][i][k] for k in ("exp_avg", "exp_avg_sq")}}
                for i, n in enumerate(names)}

    before, after = table(src), table(out)
    assert len(after) == len(before) + sum(1 for n in before if n.startswith("decoder.layers.0."))
    assert out["optimizer"]["cur_scale"] == src["optimizer"]["cur_scale"]
    for name, values in after.items():
        split = _split(name)
        source = name if split is None else f"decoder.layers.{min(split[0], 1)}.{split[1]}"
        for key in ("lp", "fp32", "exp_avg", "exp_avg_sq"):
            assert values[key].dtype == before[source][key].dtype, (name, key)
            assert torch.equal(values[key], before[source][key]), (name, key)
    assert before["decoder.layers.1.mlp.linear_fc1.weight"]["exp_avg"].abs().sum() > 0
    zero = root / "z0_zero"  # function preserving: the trainer resumes it with the same val loss
    grow(src_run / "checkpoints", zero, "--op", "k=1,i0=1,b=1,init=zero")
    run = _train(root, "z0_grown", f"ds_config={root / 'bf16_zero0.json'}", f"init_from={zero}",
                 "num_layers=3", f"train_steps={STEPS + 1}")
    assert _val_at(run, STEPS) == pytest.approx(_val_at(src_run, STEPS), rel=1e-5, abs=1e-5)
