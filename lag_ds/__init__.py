"""lag_ds: Landscape-Aware Growing (Karp, Saunshi et al., 2024) for DeepSpeed + megatron-core.

Rooms (see README): ``model`` (presets, layer specs), ``data`` (corpus, tokenizer, UL2),
``train`` (engine, loop, checkpoints), ``growth`` (pure operators and plans), ``checkpoint``
(format adapters executing plans), ``launch`` (allocations, jobs, supervision), ``select``
(LAG@k over curves).
"""

__version__ = "0.1.0"
