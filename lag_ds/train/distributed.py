"""Process-group set-up shared by every entry point (trainer, tests, benchmarks).

Works the same under the ``deepspeed`` launcher (which sets RANK/WORLD_SIZE/MASTER_*), under
``torch.multiprocessing`` in tests, and as a plain single process (defaults filled in), so that
``python -m lag_ds.train`` runs without any launcher. Backend: NCCL when CUDA is present, gloo
otherwise (DeepSpeed's CPU accelerator).
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from lag_ds.launch.shm_segments import unlink_own_segment


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(*, tensor_parallel: int = 1) -> None:
    """Initialise torch.distributed (via DeepSpeed) and megatron-core's parallel state."""
    import deepspeed

    if "RANK" not in os.environ:  # plain `python -m lag_ds.train`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   auto_mpi_discovery=False)
        # Every rank has now mapped every peer's CPU shm segment (DeepSpeed does it inside
        # init_distributed); after this barrier the names can go, so that the memory is freed
        # when the job ends, even by SIGKILL (lag_ds/launch/shm_segments.py says why).
        if dist.get_world_size() > 1:
            dist.barrier()
        unlink_own_segment()
    world = dist.get_world_size()
    if world % tensor_parallel:
        raise ValueError(f"tensor_parallel={tensor_parallel} does not divide the world size {world}")
    if torch.cuda.is_available():  # pragma: no cover - GPU path
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel)
    elif ps.get_tensor_model_parallel_world_size() != tensor_parallel:
        raise ValueError("parallel state already initialised with another tensor-parallel degree")


def shutdown_distributed() -> None:
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
