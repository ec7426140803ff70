"""Save / resume DeepSpeed checkpoints with a pointer that is never half-written.

Layout (DeepSpeed's own, so stock tools and ``engine.load_checkpoint`` read it)::

    <ckpt_dir>/latest                                  -> "global_step<N>"
    <ckpt_dir>/global_step<N>/mp_rank_<tp>_model_states.pt
    <ckpt_dir>/global_step<N>/zero_pp_rank_<dp>_mp_rank_<tp>_optim_states.pt   (ZeRO 1/2)

Why not DeepSpeed's ``save_latest``: it rewrites ``latest`` in place. We save with
``save_latest=False``, wait for every rank, then rank 0 replaces ``latest`` via temp file + fsync +
rename (RELIABILITY.md #3), and only then deletes checkpoints beyond ``keep`` (#10).
A ``latest`` naming a missing or incomplete directory is an error, never a silent fresh start.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from lag_ds.atomic_io import atomic_write_text

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


def save(engine: Any, ckpt_dir: Path, *, step: int, client_state: dict[str, Any], keep: int) -> Path:
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for_step(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()
    if dist.get_rank() == 0:
        write_pointer(ckpt_dir / "latest", tag)
        _prune(ckpt_dir, keep=keep, protect=tag)
    dist.barrier()
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
