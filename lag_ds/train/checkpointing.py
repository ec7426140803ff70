"""Save / resume DeepSpeed checkpoints with a pointer that is never half-written.

Layout (DeepSpeed's own, so stock tools and ``engine.load_checkpoint`` read it)::

    <ckpt_dir>/latest                                  -> "global_step<N>"
    <ckpt_dir>/global_step<N>/mp_rank_<tp>_model_states.pt
    <ckpt_dir>/global_step<N>/zero_pp_rank_<dp>_mp_rank_<tp>_optim_states.pt   (ZeRO 1/2)

Why not DeepSpeed's ``save_latest``: it rewrites ``latest`` in place. We save with
``save_latest=False``, wait for every rank, then rank 0 replaces ``latest`` via temp file + fsync +
rename (RELIABILITY.md #3), and only then deletes checkpoints beyond ``keep`` (#10).
A ``latest`` naming a missing or incomplete directory is an error, never a silent fresh start.

Disk full (#9): before DeepSpeed writes anything every rank checks the free space against an
estimate of the whole checkpoint (``checkpoint_bytes``) and all ranks agree, so a full disk stops
every rank with the same one-line :class:`DiskFullError` (the trainer exits 2). If the disk still
fills during the write (another writer), the half-written ``global_step<N>`` directory is removed
and the same error raised; ``latest`` and the checkpoint it names are never touched. Limitation:
with several ranks, a rank that hits ENOSPC mid-write raises while its peers wait in DeepSpeed's
own closing barrier; the launcher's no-progress supervisor stops them.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lag_ds.atomic_io import atomic_write_text
from lag_ds.checkpoint.atomic import (
    DiskFullError,
    check_free_space,
    disk_full_error,
    is_disk_full,
    stored_size,
)
from lag_ds.faults import fault_point

TAG_PATTERN = re.compile(r"^global_step(\d+)$")


def tag_for_step(step: int) -> str:
    return f"global_step{step}"


def read_latest(ckpt_dir: Path) -> str | None:
    """Tag named by ``ckpt_dir/latest``; None when there is no pointer (a fresh run)."""
    pointer = Path(ckpt_dir) / "latest"
    if not pointer.exists():
        return None
    tag = pointer.read_text().strip()
    if not TAG_PATTERN.match(tag):
        raise ValueError(f"{pointer}: garbage checkpoint pointer {tag[:40]!r} (expected global_step<N>)")
    target = pointer.parent / tag
    # ZeRO-3 names its model-state files zero_pp_rank_<dp>_mp_rank_<tp>_model_states.pt.
    if not any(target.glob("mp_rank_*_model_states.pt")) and \
            not any(target.glob("zero_pp_rank_*_mp_rank_*_model_states.pt")):
        raise ValueError(f"{pointer}: dangling pointer, {target} has no mp_rank_*_model_states.pt")
    return tag


def read_init_pointer(ckpt_dir: Path) -> tuple[str, bool]:
    """Tag to start from in an ``init_from`` directory and whether it is DeepSpeed's universal layout.

    Grown/resharded checkpoints of ZeRO-1/2 runs (``tools/grow_checkpoint.py``) carry
    ``latest_universal``; ordinary DeepSpeed checkpoints carry ``latest``.
    """
    ckpt_dir = Path(ckpt_dir)
    universal = ckpt_dir / "latest_universal"
    if universal.is_file() and not (ckpt_dir / "latest").exists():
        tag = universal.read_text().strip()
        if not TAG_PATTERN.match(tag) or not (ckpt_dir / tag / "zero" / "optimizer_state.pt").is_file():
            raise ValueError(f"{universal}: names {tag[:40]!r}, which is not a complete universal checkpoint")
        return tag, True
    tag = read_latest(ckpt_dir)
    if tag is None:
        raise ValueError(f"init_from={ckpt_dir}: no 'latest' or 'latest_universal' pointer in that directory")
    return tag, False


def checkpoint_num_layers(ckpt_dir: Path, tag: str, *, universal: bool) -> int:
    """Decoder layers in a checkpoint, as its format's reader counts them from parameter names.

    ``universal`` is kept for callers; the registry tells the layouts apart by itself."""
    from lag_ds.checkpoint.formats import read_checkpoint_info

    return read_checkpoint_info(Path(ckpt_dir) / tag).num_layers


def write_pointer(path: Path, text: str) -> None:
    """Atomically replace ``path`` with ``text`` (temp file, fsync, rename, fsync dir)."""
    atomic_write_text(path, text)


def checkpoint_bytes(engine: Any) -> int:
    """Estimated size of one DeepSpeed checkpoint of ``engine``, all ranks together.

    Per parameter element: the module's copy (its dtype) + fp32 master + two Adam moments (12 B),
    whether ZeRO partitions them over DP ranks or not; the module is split over TP ranks; plus
    the ``torch.save`` container of each rank's files."""
    from megatron.core import parallel_state as ps

    local = sum(p.numel() * (p.element_size() + 12) for p in engine.module.parameters())
    tp = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    return tp * local + dist.get_world_size() * 2 * stored_size(1 << 16)


def _all_ranks(ok: bool) -> bool:
    """True on every rank iff ``ok`` on every rank (NCCL reduces only device tensors)."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    flag = torch.tensor([1 if ok else 0], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _check_space_everywhere(engine: Any, ckpt_dir: Path, tag: str) -> None:
    """Every rank checks; if any refuses, all raise (no rank is left waiting in a barrier)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    refusal = None
    try:
        check_free_space(ckpt_dir, checkpoint_bytes(engine), destination=ckpt_dir / tag)
    except DiskFullError as exc:
        refusal = exc
    everyone_ok = _all_ranks(refusal is None)
    if refusal is not None:
        raise refusal
    if not everyone_ok:
        raise DiskFullError(f"not enough free space for {ckpt_dir / tag} on another rank's disk")


def _discard(ckpt_dir: Path, tag: str) -> None:
    """Remove a half-written tag directory (never the one ``latest`` names)."""
    pointer = ckpt_dir / "latest"
    if pointer.is_file() and pointer.read_text().strip() == tag:
        return
    shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


def save(engine: Any, ckpt_dir: Path, *, step: int, client_state: dict[str, Any], keep: int) -> Path:
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for_step(step)
    _check_space_everywhere(engine, ckpt_dir, tag)
    fault_point("train.save_checked", ckpt_dir / tag)
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    except Exception as exc:
        if not is_disk_full(exc, ckpt_dir):
            raise
        _discard(ckpt_dir, tag)
        raise disk_full_error(exc, ckpt_dir, writing=ckpt_dir / tag) from exc
    dist.barrier()
    fault_point("train.saved", ckpt_dir / tag)
    failure = None
    if dist.get_rank() == 0:
        try:
            write_pointer(ckpt_dir / "latest", tag)
        except OSError as exc:
            if not is_disk_full(exc, ckpt_dir):
                raise
            _discard(ckpt_dir, tag)  # complete but unnamed: give its space back
            failure = disk_full_error(exc, ckpt_dir, writing=ckpt_dir / "latest")
        else:
            _prune(ckpt_dir, keep=keep, protect=tag)
    everyone_ok = _all_ranks(failure is None)  # doubles as the closing barrier
    if failure is not None:
        raise failure
    if not everyone_ok:
        raise DiskFullError(f"disk full while writing {ckpt_dir / 'latest'} (on rank 0)")
    return ckpt_dir / tag


def load(engine: Any, ckpt_dir: Path, tag: str) -> dict[str, Any]:
    """Load model, optimizer and scheduler state; returns the client state."""
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise ValueError(f"DeepSpeed could not load checkpoint {Path(ckpt_dir) / tag}")
    return client_state or {}


def _prune(ckpt_dir: Path, *, keep: int, protect: str) -> None:
    tags = sorted(
        (int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := TAG_PATTERN.match(p.name)) and p.is_dir()
    )
    for _, path in tags[:-keep]:
        if path.name != protect:
            shutil.rmtree(path)
