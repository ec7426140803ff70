"""Adapter exposing ``megatron.core.parallel_state`` under the old Megatron ``mpu`` names.

Why: ``deepspeed.initialize(mpu=...)`` calls ``get_model_parallel_world_size`` and friends, which
megatron-core renamed (tensor/pipeline parallel). DeepSpeed uses the *model-parallel* rank to
name checkpoint files (``mp_rank_XX_model_states.pt``) and the data-parallel group for ZeRO.
With pipeline parallelism = 1 (all we support), model parallel == tensor parallel.
"""

from __future__ import annotations

from megatron.core import parallel_state as ps


class MegatronMpu:
    """The subset of the legacy mpu interface DeepSpeed uses."""

    # tensor parallel
    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_src_rank = staticmethod(ps.get_tensor_model_parallel_src_rank)
    # model parallel == tensor parallel (PP = 1)
    get_model_parallel_group = staticmethod(ps.get_model_parallel_group)
    get_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    # data parallel
    get_data_parallel_group = staticmethod(ps.get_data_parallel_group)
    get_data_parallel_world_size = staticmethod(ps.get_data_parallel_world_size)
    get_data_parallel_rank = staticmethod(ps.get_data_parallel_rank)
    # pipeline (always 1 here)
    get_pipeline_model_parallel_world_size = staticmethod(ps.get_pipeline_model_parallel_world_size)
    get_pipeline_model_parallel_rank = staticmethod(ps.get_pipeline_model_parallel_rank)
    get_pipe_parallel_group = staticmethod(ps.get_pipeline_model_parallel_group)

    @staticmethod
    def get_data_parallel_group_ranks() -> list[int]:
        import torch.distributed as dist

        return dist.get_process_group_ranks(ps.get_data_parallel_group())
