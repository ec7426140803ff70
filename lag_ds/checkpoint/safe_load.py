"""Load checkpoint files without executing arbitrary pickles (RELIABILITY.md #6).

``torch.load(weights_only=True)`` with an explicit allow-list of the few DeepSpeed classes its ZeRO
optimizer files pickle (found with ``torch.serialization.get_unsafe_globals_in_checkpoint``).
Anything else is refused with the file named; ``unsafe=True`` (CLI ``--unsafe-load``) lifts the
restriction for checkpoints you trust. Files are memory-mapped (``mmap=True``) so a shard costs
address space, not RSS, until its bytes are touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def _deepspeed_allow_list() -> list[Any]:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_checkpoint_file(path: Path, *, mmap: bool = True, unsafe: bool = False) -> Any:
    """Load one ``.pt`` file; one-line ``ValueError`` naming the file if it is missing, truncated or unsafe."""
    path = Path(path)
    _check_regular_file(path)
    try:
        if unsafe:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
        with torch.serialization.safe_globals(_deepspeed_allow_list()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises RuntimeError/UnpicklingError/EOFError/...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "Weights only load failed" in first or "Unsupported global" in str(exc):
            raise ValueError(f"{path}: refused by weights-only loading (pickle needs a class outside the "
                             f"allow-list); pass --unsafe-load only if you trust this file") from None
        raise ValueError(f"{path}: cannot be read (truncated or corrupt?): {first[:200]}") from None


def _check_regular_file(path: Path) -> None:
    if not path.exists():
        raise ValueError(f"missing checkpoint file: {path}")
    if not path.is_file():  # e.g. a directory where a shard should be: name it, no traceback
        raise ValueError(f"{path}: not a regular file (expected a checkpoint shard)")


TRUSTED_PICKLE_MODULES = ("torch.", "deepspeed.", "megatron.", "collections.", "numpy.")
"""Packages whose classes a DeepSpeed checkpoint may reference (:func:`check_pickle_globals`)."""


def check_pickle_globals(path: Path) -> None:
    """Refuse a ``.pt`` file whose pickle names anything outside torch/DeepSpeed/megatron classes,
    without running it; one-line ``ValueError`` naming the file.

    Why: DeepSpeed's ``load_checkpoint`` itself calls ``torch.load(weights_only=False)`` on every
    file of a tag, so the trainer must look before DeepSpeed does. The pickle's opcodes are only
    scanned (``get_unsafe_globals_in_checkpoint``), never executed; a file that is not a readable
    torch zip (truncated, flipped header byte) fails here too."""
    path = Path(path)
    _check_regular_file(path)
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: cannot be read (truncated or corrupt?): {first[:200]}") from None
    bad = [n for n in names if not n.startswith(TRUSTED_PICKLE_MODULES)]
    if bad:
        raise ValueError(f"{path}: refused, its pickle calls {bad[0]} (not a torch/DeepSpeed "
                         "class); it was not loaded")
