"""Validation loss on a fixed held-out set, overall and per denoiser.

Each data-parallel rank evaluates every ``dp``-th batch; sums of (loss x mask) and token counts per
denoiser are all-reduced over the DP group, so the result is identical at any DP degree (up to fp
summation order). Overall loss is token-weighted over all denoisers.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from lag_ds.data import DENOISER_NAMES
from lag_ds.metrics_schema import VAL_LOSS, VAL_LOSS_PREFIX


@torch.no_grad()
def validation_loss(engine: Any, batches: Sequence[Any], device: torch.device) -> dict[str, float]:
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    sums = torch.zeros(len(DENOISER_NAMES), 2, dtype=torch.float64, device=device)
    was_training = engine.module.training
    engine.eval()
    for batch in batches[dp_rank::dp_size]:
        per_token = engine(batch.tokens.to(device), batch.position_ids.to(device),
                           batch.attention_mask.to(device), labels=batch.labels.to(device))
        mask = batch.loss_mask.to(device)
        per_row = (per_token.float() * mask).sum(dim=1).double()
        for d in range(len(DENOISER_NAMES)):
            rows = batch.denoiser.to(device) == d
            sums[d, 0] += per_row[rows].sum()
            sums[d, 1] += mask[rows].sum().double()
    if was_training:
        engine.train()
    dist.all_reduce(sums, group=ps.get_data_parallel_group())
    out = {VAL_LOSS: (sums[:, 0].sum() / sums[:, 1].sum().clamp(min=1)).item()}
    for d, name in enumerate(DENOISER_NAMES):
        if sums[d, 1] > 0:
            out[f"{VAL_LOSS_PREFIX}{name}"] = (sums[d, 0] / sums[d, 1]).item()
    return out
