"""Run under the deepspeed launcher with TP=<ranks>: writes the tiny model's full logits (same seed,
same input, one prefix-LM row) so the test can compare TP=1 with TP=2."""

import os
import sys

import torch
import torch.distributed as dist

from lag_ds.model.build import build_gpt_model
from lag_ds.model.presets import get_preset
from lag_ds.train.distributed import init_distributed
from megatron.core import parallel_state as ps

tp = int(os.environ["TP"])
init_distributed(tensor_parallel=tp)
model = build_gpt_model(get_preset("tiny"), vocab_size=256, seed=11).eval()
g = torch.Generator().manual_seed(3)
ids = torch.randint(0, 256, (2, 32), generator=g)
mask = torch.ones(2, 1, 32, 32, dtype=torch.bool).triu(1)
mask[1, :, :10, :10] = False  # a prefix-LM row
with torch.no_grad():
    logits = model(ids, torch.arange(32).expand(2, 32), mask)  # [b, s, vocab/tp]
    # megatron's gather helper allocates on CUDA; gather the vocab shards by hand over gloo
    parts = [torch.empty_like(logits) for _ in range(tp)]
    dist.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
    full = torch.cat(parts, dim=-1)
if dist.get_rank() == 0:
    torch.save(full, os.environ["OUT"])
dist.barrier()
