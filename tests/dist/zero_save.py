"""A tiny megatron-core GPTModel trained a few steps and saved by the trainer's own
``lag_ds.train.checkpointing.save`` (stock ``engine.save_checkpoint`` underneath), one rank.

Env: DIR (checkpoint dir), STAGE (ZeRO stage), STEPS, OUT (JSON report), MODE:

* ``save``: train STEPS steps, save once (the source for the surgery fault tests).
* ``full``: DIR is on a small tmpfs. Save at step 1, then twice try to save step 2 onto a full
  disk: (1) the disk is already full (the free-space check refuses), (2) the disk fills after the
  check (``LAG_DS_FAULT_FILL=train.save_checked``, set by this script). Each must raise one
  ``DiskFullError`` line, leave no ``global_step2`` and no temporary file, keep ``latest``; then
  the step-1 checkpoint is loaded back and compared with the weights saved.
"""

import json
import os
from pathlib import Path

import deepspeed
import torch

from lag_ds.checkpoint.atomic import DiskFullError
from lag_ds.faults import FILL_ENV, fill_filesystem
from lag_ds.model.build import build_gpt_model
from lag_ds.model.mpu import MegatronMpu
from lag_ds.model.presets import get_preset
from lag_ds.train import checkpointing
from lag_ds.train.distributed import init_distributed

env = os.environ
VOCAB = 256
init_distributed(tensor_parallel=1)
model = build_gpt_model(get_preset("tiny").with_layers(2), vocab_size=VOCAB, seed=1)
ds = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0,
      "zero_optimization": {"stage": int(env.get("STAGE", "2"))}, "steps_per_print": 10**6}
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds, mpu=MegatronMpu())
g = torch.Generator().manual_seed(0)
ckpt = Path(env["DIR"])
client = {"num_layers": 2, "preset": "tiny", "data_seed": 0}


def step() -> None:
    ids = torch.randint(0, VOCAB, (2, 32), generator=g)
    loss = engine(ids, torch.arange(32).expand(2, 32), None, labels=ids).float().mean()
    engine.backward(loss)
    engine.step()


def weights() -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def leftovers() -> list[str]:
    return sorted(p.name for p in ckpt.iterdir() if p.name not in ("latest", "global_step1"))


report: dict = {}
if env["MODE"] == "save":
    for _ in range(int(env.get("STEPS", "2"))):
        step()
    checkpointing.save(engine, ckpt, step=engine.global_steps, client_state=client, keep=2)
else:
    step()
    checkpointing.save(engine, ckpt, step=1, client_state=client, keep=2)
    saved = weights()
    report["estimate"] = checkpointing.checkpoint_bytes(engine)
    step()
    for case in ("precheck", "fill"):
        filler = None
        if case == "precheck":
            filler = fill_filesystem(ckpt / ".outside_filler")  # another program filled the disk
        else:
            env[FILL_ENV] = "train.save_checked"
        try:
            checkpointing.save(engine, ckpt, step=2, client_state=client, keep=2)
            report[case] = {"error": None}
        except DiskFullError as exc:
            report[case] = {"error": str(exc), "lines": len(str(exc).splitlines())}
        env.pop(FILL_ENV, None)
        if filler is not None:
            filler.unlink()
            filler.parent.rmdir()
        report[case].update(latest=(ckpt / "latest").read_text(), leftovers=leftovers())
    path, loaded_client = engine.load_checkpoint(str(ckpt), tag=checkpointing.read_latest(ckpt))
    report["loaded"] = path is not None
    report["loaded_steps"] = engine.global_steps
    report["loaded_client_num_layers"] = loaded_client.get("num_layers")
    now = weights()
    report["weights_equal_step1"] = all(torch.equal(now[n], saved[n]) for n in saved)
    step()  # the optimizer state came back too: training goes on
    report["trains_after_load"] = engine.global_steps == 2
Path(env["OUT"]).write_text(json.dumps(report))
