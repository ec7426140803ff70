"""Gather one full (TP-merged) tensor from the flat ZeRO fragments of each TP rank, in one copy.

Why: a ZeRO-1/2 checkpoint stores each TP rank's parameters flattened into DP partitions; a
parameter is a run of fragments, possibly across partitions. Concatenating the fragments per rank
(`torch.cat`), then the ranks (`merge_tp`), copies every byte two or three times and holds the
shards beside the result: about 3x the tensor's size at the peak, which the performance issue
bounds at 1.25x. Here the output is allocated once (or handed in: ``out``), and each fragment
-- a view into the memory-mapped partition file -- is copied straight to its place in it, a
row-parallel matrix's fragments row block by row block. Only a row-parallel tensor that is not a
matrix, or has sub-parameters, passes through one temporary of the shard's size, 1/TP of the
tensor.

Placement follows :func:`lag_ds.checkpoint.megatron_layout.merge_tp`: rank r's shard goes after
ranks 0..r-1 along the split dimension; a GLU fc1 (``num_sub_params=2``) is [gate; up] on every
rank, and the full tensor is [gate_0 .. gate_{TP-1}; up_0 .. up_{TP-1}]. A replicated parameter
is rank 0's copy.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Callable, Iterable, Sequence

import torch

from lag_ds.checkpoint.megatron_layout import TpRule


def _regions(full: torch.Tensor, rule: TpRule, shapes: Sequence[tuple[int, ...]],
             rank: int) -> list[torch.Tensor]:
    """Views of ``full`` that rank ``rank``'s shard fills, one per sub-parameter, in shard order."""
    dim, sub = rule.cat_dim, rule.num_sub_params
    if dim is None or len(shapes) == 1:
        return [full]
    part = shapes[rank][dim] // sub
    full_part = full.shape[dim] // sub
    offset = sum(s[dim] for s in shapes[:rank]) // sub
    return [full.narrow(dim, i * full_part + offset, part) for i in range(sub)]


def _fill(pieces: Iterable[torch.Tensor], segments: list[tuple[int, torch.Tensor]],
          numel: int, what: str) -> None:
    """Copy consecutive flat ``pieces`` into 1-D ``segments`` given as (flat start, view)."""
    pos = 0
    for piece in pieces:
        n = piece.numel()
        for start, dest in segments:
            lo, hi = max(pos, start), min(pos + n, start + dest.numel())
            if lo < hi:
                dest.narrow(0, lo - start, hi - lo).copy_(piece.narrow(0, lo - pos, hi - lo))
        pos += n
    if pos != numel:
        raise ValueError(f"{what}: fragments hold {pos} elements, the shard has {numel}")


def _fill_rows(pieces: Iterable[torch.Tensor], region: torch.Tensor, numel: int, what: str) -> None:
    """Copy consecutive flat ``pieces`` of a row-major shard into ``region``, a 2-D strided view
    of the output (its columns for this rank): whole rows in one strided copy, a piece's partial
    first and last rows apart. No temporary: the shard never exists as a tensor of its own."""
    width = region.shape[1]
    pos = 0
    for piece in pieces:
        n = piece.numel()
        if pos + n > numel:
            raise ValueError(f"{what}: fragments hold more than the shard's {numel} elements")
        lo, off = pos, 0
        while off < n:
            row, col = divmod(lo, width)
            if col or n - off < width:
                take = min(width - col, n - off)
                region[row, col:col + take].copy_(piece.narrow(0, off, take))
            else:
                rows = (n - off) // width
                take = rows * width
                region[row:row + rows].copy_(piece.narrow(0, off, take).view(rows, width))
            lo += take
            off += take
        pos += n
    if pos != numel:
        raise ValueError(f"{what}: fragments hold {pos} elements, the shard has {numel}")


def gather_full(full_shape: tuple[int, ...], rule: TpRule, shapes: Sequence[tuple[int, ...]],
                pieces: Callable[[int], Iterable[torch.Tensor]], *, what: str = "tensor",
                dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """The full tensor; ``pieces(r)`` yields rank r's flat fragments in order (views are fine).
    ``out``: a contiguous buffer of the full size to gather into (e.g. a reused one,
    ``writer.py``) instead of a new tensor."""
    if out is None:
        full = torch.empty(full_shape, dtype=dtype)
    else:
        if out.numel() != math.prod(full_shape) or out.dtype != dtype or not out.is_contiguous():
            raise ValueError(f"{what}: out buffer {tuple(out.shape)} {out.dtype} does not fit "
                             f"{tuple(full_shape)} {dtype}")
        full = out.view(full_shape)
    ranks = [0] if rule.cat_dim is None else range(len(shapes))
    for rank in ranks:
        numel = math.prod(shapes[rank])
        regions = _regions(full, rule, shapes, rank)
        if rule.cat_dim in (None, 0) or len(shapes) == 1:
            # Each sub-parameter is a contiguous block of the shard and of the output.
            chunk = numel // len(regions)
            _fill(pieces(rank), [(i * chunk, r.view(-1)) for i, r in enumerate(regions)], numel,
                  f"{what} (TP rank {rank})")
            continue
        if full.dim() == 2 and rule.cat_dim == 1 and len(regions) == 1:
            # Row-parallel matrix: the shard's rows are strided rows of the output.
            _fill_rows(pieces(rank), regions[0], numel, f"{what} (TP rank {rank})")
            continue
        shard = torch.empty(numel, dtype=dtype)
        _fill(pieces(rank), [(0, shard)], numel, f"{what} (TP rank {rank})")
        chunks = shard.view(shapes[rank]).chunk(rule.num_sub_params, dim=rule.cat_dim)
        for region, chunk_ in zip(regions, chunks):
            region.copy_(chunk_)
    return full


_PAGE = mmap.PAGESIZE
_MADV_WILLNEED = 3
_libc = None


def willneed(tensors: Iterable[torch.Tensor]) -> None:
    """Ask the kernel to start reading the pages behind ``tensors`` (views into memory-mapped
    checkpoint files) into the page cache, asynchronously: ``madvise(MADV_WILLNEED)``.

    Why: the gather of the next tensor then finds its source pages already read while the
    current tensor is being written, instead of faulting them in one by one; the pages belong to
    the page cache, not to the process, so it costs no memory the process owns. Advice only: on
    a platform without ``madvise``, or for memory that is not file-backed, nothing happens."""
    global _libc
    if _libc is None:
        try:
            import ctypes

            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if nbytes == 0 or t.device.type != "cpu":
            continue
        start = t.data_ptr() & ~(_PAGE - 1)
        _libc.madvise(start, t.data_ptr() + nbytes - start, _MADV_WILLNEED)
