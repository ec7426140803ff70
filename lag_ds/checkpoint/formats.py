"""The checkpoint seam: a reader protocol, a writer (grower) signature and one registry of formats.

Why: growth runs on checkpoints other programs wrote, in several layouts. Each layout is one module
that registers a :class:`Format` here: how to recognise a directory (``sniff``), how to open it as a
:class:`CheckpointReader` (layer count, step, parameter names and full shapes, TP split rule, one
tensor's value or optimizer state on demand) and how to grow it (a function executing the per-tensor
recipes of :mod:`lag_ds.checkpoint.recipes`). Everything else -- the CLI, the trainer's
``init_from`` check, the stacking driver -- asks this registry, never the files.

An option a format cannot honour is an error naming the option (:func:`check_options`): the
Hugging Face writer has no optimizer state, so ``--optimizer-state zero`` on it fails instead of
being dropped.

    >>> info = read_checkpoint_info("runs/base/checkpoints")        # doctest: +SKIP
    >>> info.format, info.num_layers, info.step                     # doctest: +SKIP
    ('deepspeed-pipe', 4, 3)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from lag_ds.checkpoint.megatron_layout import TpRule

__all__ = [
    "GROW_OPTIONS",
    "CheckpointInfo",
    "CheckpointReader",
    "Format",
    "check_options",
    "detect_format",
    "formats",
    "open_checkpoint",
    "read_checkpoint_info",
    "register",
]

GROW_OPTIONS: Mapping[str, str] = {
    "target_tp": "--target-tp",
    "target_dp": "--target-dp",
    "optimizer_state": "--optimizer-state",
    "init_std": "--init-std",
    "unsafe_load": "--unsafe-load",
}
"""Options of a grow call (keyword -> CLI flag); a format lists the ones it honours."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What trainer and stacking need to know about a checkpoint directory."""

    format: str
    path: Path
    """The directory the reader resolved (a tag directory for DeepSpeed layouts)."""
    num_layers: int
    step: int
    """Global (optimizer) step the checkpoint was saved at; 0 when the format has none (HF)."""
    family: str
    zero_stage: int | None = None
    """DeepSpeed ZeRO stage of the run that wrote it (native DeepSpeed layouts), else None."""


@runtime_checkable
class CheckpointReader(Protocol):
    """A validated, lazily read checkpoint. Values are full (TP-merged) fp32 tensors."""

    format: str
    family: str
    num_layers: int
    global_steps: int

    def param_names(self) -> list[str]:
        """Every trainable tensor, in module order, in the format's own naming."""

    def full_shape(self, name: str) -> tuple[int, ...]: ...

    def tp_rule(self, name: str) -> TpRule: ...

    def value(self, name: str, key: str = "fp32") -> torch.Tensor:
        """``fp32`` (master value) or an optimizer state key (``exp_avg``, ``exp_avg_sq``)."""


@dataclass(frozen=True)
class Format:
    """One registered layout."""

    name: str
    sniff: Callable[[Path], bool]
    """True when a directory is in this layout (cheap: file names, no tensors)."""
    info: Callable[..., CheckpointInfo]
    """``info(path, unsafe_load=...)``: layer count and step, read from the checkpoint itself."""
    grow: Callable[..., dict[str, Any]] | None
    """``grow(src, dst, plan, show_progress=..., **options)`` -> manifest; None if read-only."""
    options: frozenset[str]
    """Keys of :data:`GROW_OPTIONS` this format honours."""
    why_not: str = ""
    """Why the other options do not apply (appended to the error)."""
    open: Callable[..., CheckpointReader] | None = None
    """``open(path, unsafe_load=...)`` -> a reader; None where only ``info`` is provided."""


_REGISTRY: list[Format] = []


def register(fmt: Format) -> Format:
    """Add a layout; the first whose ``sniff`` matches wins, so register specific layouts first."""
    if any(f.name == fmt.name for f in _REGISTRY):
        raise ValueError(f"format {fmt.name!r} registered twice")
    unknown = set(fmt.options) - set(GROW_OPTIONS)
    assert not unknown, unknown
    _REGISTRY.append(fmt)
    return fmt


def formats() -> list[Format]:
    _load_builtin()
    return list(_REGISTRY)


def detect_format(path: Path) -> Format:
    """The registered format of ``path``; ``ValueError`` naming the path if none matches."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"--src {path}: no such file or directory")
    for fmt in formats():
        if fmt.sniff(path):
            return fmt
    pointer = path / "latest"
    if pointer.exists():  # the pointer is the problem, not the layout: say so
        if not pointer.is_file():
            raise ValueError(f"{pointer}: not a file (a checkpoint pointer names a tag directory)")
        tag = pointer.read_text(errors="replace").strip()
        raise ValueError(f"{pointer}: names {tag[:40]!r}, which is not a checkpoint directory "
                         "next to it (dangling or garbage pointer)")
    names = ", ".join(f.name for f in _REGISTRY)
    raise ValueError(f"--src {path}: not a checkpoint in any known layout ({names})")


def read_checkpoint_info(path: Path, *, unsafe_load: bool = False) -> CheckpointInfo:
    """Format, layer count and step of the checkpoint at ``path`` (a run's checkpoint directory with
    its pointer, or a tag directory, or a Hugging Face model directory)."""
    return detect_format(Path(path)).info(Path(path), unsafe_load=unsafe_load)


def open_checkpoint(path: Path, *, unsafe_load: bool = False) -> CheckpointReader:
    """A reader for ``path`` (formats whose module provides ``open_reader``)."""
    fmt = detect_format(Path(path))
    if fmt.open is None:
        raise ValueError(f"{path}: {fmt.name} checkpoints have no tensor reader")
    return fmt.open(Path(path), unsafe_load=unsafe_load)


def check_options(fmt: Format, given: Mapping[str, Any]) -> dict[str, Any]:
    """Options actually given (not None/False); ``ValueError`` naming the first one ``fmt`` cannot
    honour. Returns the given options."""
    chosen = {k: v for k, v in given.items() if v is not None and v is not False}
    for key in chosen:
        if key not in GROW_OPTIONS:
            raise ValueError(f"unknown grow option {key!r}")
        if key not in fmt.options:
            reason = f" ({fmt.why_not})" if fmt.why_not else ""
            raise ValueError(f"{GROW_OPTIONS[key]} does not apply to {fmt.name} checkpoints{reason}")
    return chosen


_loaded = False


def _load_builtin() -> None:
    """Import the built-in format modules once (each registers itself; order = sniff priority)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    from lag_ds.checkpoint import builtin_formats  # noqa: F401


def check_destination(dst: Path) -> Path:
    """The one destination check every writer runs before reading its source."""
    from lag_ds.checkpoint.atomic import DestinationExistsError

    dst = Path(dst)
    if dst.exists():
        raise DestinationExistsError(f"destination already exists: {dst} (refusing to overwrite)")
    return dst


def progress_bar(enabled: bool, *, total: int, desc: str, unit: str = "tensor") -> Any:
    """The one progress bar of surgery (tqdm; silent when ``enabled`` is False)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)
