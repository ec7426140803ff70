"""Run under the deepspeed launcher: load a checkpoint with *stock* DeepSpeed into a fresh model
and dump every parameter's fp32 value and Adam moments (TP-local, DP-gathered), then optionally
train a few steps. Env: TP, STAGE, LAYERS, VOCAB, SRC, UNIVERSAL (0/1), OUT, TRAIN_STEPS."""

import math
import os

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from megatron.core import parallel_state as ps

from lag_ds.model.build import build_gpt_model
from lag_ds.model.mpu import MegatronMpu
from lag_ds.model.presets import get_preset
from lag_ds.train.distributed import init_distributed

env = os.environ
tp, stage, layers = int(env["TP"]), int(env["STAGE"]), int(env["LAYERS"])
init_distributed(tensor_parallel=tp)
dp = ps.get_data_parallel_world_size()
# a different seed from the trainer's: every value we dump must come from the checkpoint
model = build_gpt_model(get_preset("tiny").with_layers(layers), vocab_size=int(env["VOCAB"]), seed=987654)
ds = {"train_batch_size": 2 * dp, "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0,
      "zero_optimization": {"stage": stage}}
if env.get("UNIVERSAL") == "1":
    ds["checkpoint"] = {"load_universal": True}
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds, mpu=MegatronMpu())
path, _ = engine.load_checkpoint(env["SRC"])
assert path is not None, "DeepSpeed did not load the checkpoint"
if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
    engine.optimizer._lazy_init_hp_params_optimizer_state()
dump = {"__global_steps__": engine.global_steps}
for name, p in engine.module.named_parameters():
    if stage == 0:
        state = engine.optimizer.state[p]
        dump[name] = {"fp32": p.detach().float().clone(), "exp_avg": state["exp_avg"].clone(),
                      "exp_avg_sq": state["exp_avg_sq"].clone(), "step": float(state["step"])}
    else:
        dump[name] = {"fp32": safe_get_full_fp32_param(p).clone(),
                      "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").clone(),
                      "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").clone()}
if ps.get_data_parallel_rank() == 0:
    torch.save(dump, f"{env['OUT']}.tp{ps.get_tensor_model_parallel_rank()}")
g = torch.Generator().manual_seed(ps.get_data_parallel_rank())
losses = []
for _ in range(int(env.get("TRAIN_STEPS", "0"))):
    ids = torch.randint(0, int(env["VOCAB"]), (2, 32), generator=g)
    loss = engine(ids, torch.arange(32).expand(2, 32), None, labels=ids).mean()
    engine.backward(loss)
    engine.step()
    losses.append(loss.item())
assert all(math.isfinite(x) for x in losses), losses
dist.barrier()
