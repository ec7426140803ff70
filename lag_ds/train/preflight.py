"""Checks the trainer runs before it starts anything: where will this run start from, and can it?

Why here, in every rank's process, before torch.distributed, data preparation and DeepSpeed:

* a bad checkpoint must be an error naming the file (exit 2), not a DeepSpeed traceback half-way
  through start-up, and never a silent fresh start (RELIABILITY.md #3);
* DeepSpeed's ``load_checkpoint`` unpickles every file of a tag with ``weights_only=False``, so a
  malicious pickle must be refused before DeepSpeed opens it (RELIABILITY.md #6): every ``.pt``
  file of the tag is scanned without being run
  (:func:`~lag_ds.checkpoint.safe_load.check_pickle_globals`);
* a checkpoint of another depth or tensor-parallel degree would fail deep inside DeepSpeed (or, for
  universal checkpoints, silently skip parameters).

Where a run starts (the order of :func:`lag_ds.train.loop.train`): its own ``checkpoints/latest``,
else ``init_from``, else scratch. ``checkpoints/`` without ``latest``:

* absent, empty, or one tag directory: a fresh start. One tag without a pointer is a first save
  killed before its pointer was written (the pointer is the commit), so nothing was committed;
  the run says so on stderr and retrains (a retried candidate must not be stuck on it);
* two or more tag directories: an error. A run writes its second tag only after committing the
  first, so the pointer was lost; starting from scratch would silently throw the run away.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from lag_ds.train.config import TrainConfig

TAG_PATTERN = re.compile(r"^global_step(\d+)$")
MODEL_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
OPTIM_FILE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def preflight(cfg: TrainConfig) -> str:
    """Validate ``cfg``'s inputs; ``ValueError`` (one line naming the file) on anything wrong.

    Returns where the run will start: ``"resume <dir>"``, ``"init_from <dir>"`` or ``"scratch"``."""
    from lag_ds.families import get_family

    preset = get_family(cfg.family).get_preset(cfg.preset)
    layers = cfg.num_layers if cfg.num_layers is not None else preset.num_layers
    _check_ds_config(Path(cfg.ds_config))
    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run_dir={run_dir}: exists and is not a directory")
    ckpt_dir = run_dir / "checkpoints"
    tag = own_tag(ckpt_dir)
    if tag is not None:
        _check_tag(ckpt_dir / tag, cfg, layers=layers, what=f"{ckpt_dir}/latest")
        return f"resume {ckpt_dir / tag}"
    if cfg.init_from:
        from lag_ds.train.checkpointing import read_init_pointer

        init = Path(cfg.init_from)
        if not init.is_dir():
            raise ValueError(f"init_from={init}: no such directory")
        init_tag, universal = _pointer_errors(lambda: read_init_pointer(init), init)
        _check_tag(init / init_tag, cfg, layers=layers, what=f"init_from={init}",
                   native=not universal)
        return f"init_from {init / init_tag}"
    return "scratch"


def own_tag(ckpt_dir: Path) -> str | None:
    """The run's committed tag, None for a fresh start; ``ValueError`` when neither is safe."""
    from lag_ds.train.checkpointing import read_latest

    if ckpt_dir.exists() and not ckpt_dir.is_dir():
        raise ValueError(f"{ckpt_dir}: exists and is not a directory")
    pointer = ckpt_dir / "latest"
    if pointer.exists() and not pointer.is_file():
        raise ValueError(f"{pointer}: not a file (the checkpoint pointer names a tag directory)")
    tag = _pointer_errors(lambda: read_latest(ckpt_dir), ckpt_dir)
    if tag is not None or not ckpt_dir.is_dir():
        return tag
    tags = sorted((int(m.group(1)), p.name) for p in ckpt_dir.iterdir()
                  if (m := TAG_PATTERN.match(p.name)) and p.is_dir())
    if len(tags) >= 2:
        raise ValueError(f"{pointer}: missing, but {len(tags)} checkpoint tags exist "
                         f"({', '.join(n for _, n in tags[-3:])}): the pointer was lost; restore "
                         "it or move the directory away to start from scratch")
    if tags:
        print(f"warning: {ckpt_dir}/{tags[0][1]} has no 'latest' pointer (a save killed before "
              "committing); it is ignored and the run starts as if new", file=sys.stderr)
    return None


def _pointer_errors(read, where: Path):
    """A pointer that is not text is garbage too: say which file, not a codec error."""
    try:
        return read()
    except UnicodeDecodeError:
        raise ValueError(f"{where}: garbage checkpoint pointer (not text)") from None


def _check_ds_config(path: Path) -> None:
    if not path.is_file():
        raise ValueError(f"ds_config not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be a JSON object")


def _check_tag(tag_dir: Path, cfg: TrainConfig, *, layers: int, what: str,
               native: bool = True) -> None:
    """Every file of the tag safe to unpickle, the shard set complete, depth and TP as
    configured."""
    from lag_ds.checkpoint.formats import read_checkpoint_info
    from lag_ds.checkpoint.safe_load import check_pickle_globals, load_checkpoint_file

    for path in sorted(tag_dir.rglob("*.pt")):
        check_pickle_globals(path)
    if native:
        native = not _check_zero3(tag_dir, cfg, what=what)
    if native:
        names = [p.name for p in tag_dir.iterdir()]
        model = sorted(int(m.group(1)) for n in names if (m := MODEL_FILE.match(n)))
        meta = load_checkpoint_file(tag_dir / "mp_rank_00_model_states.pt")
        mp = int(meta.get("mp_world_size", len(model)))
        if model != list(range(mp)):
            raise ValueError(f"{tag_dir}: model state files for ranks {model}, but the checkpoint "
                             f"says mp_world_size={mp} (missing or extra shard?)")
        if mp != cfg.tensor_parallel:
            raise ValueError(f"{what}: written with tensor parallel degree {mp}, the config says "
                             f"tensor_parallel={cfg.tensor_parallel}")
        optim = {(int(m.group(2)), int(m.group(3))) for n in names if (m := OPTIM_FILE.match(n))}
        stage = int((meta.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0))
        if optim or stage > 0:
            dp = int(meta.get("dp_world_size", 1))
            expected = {(d, t) for d in range(dp) for t in range(mp)}
            if optim != expected:
                odd = sorted(expected - optim) or sorted(optim - expected)
                d, t = odd[0]
                state = "missing" if odd[0] in expected else "unexpected"
                raise ValueError(f"{tag_dir}/zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt: "
                                 f"{state} (checkpoint says DP={dp} x TP={mp})")
    found = read_checkpoint_info(tag_dir).num_layers
    if found != layers:
        raise ValueError(f"{what}: checkpoint has {found} layers but the run builds {layers} "
                         f"(set num_layers={found})")


def _check_zero3(tag_dir: Path, cfg: TrainConfig, *, what: str) -> bool:
    """ZeRO-3 names its model states ``zero_pp_rank_<d>_mp_rank_00_model_states.pt``: its reader
    validates the shard set (one model and one optimizer file per DP rank, stage, partitions).
    False when ``tag_dir`` is not a ZeRO-3 save."""
    from lag_ds.checkpoint.deepspeed_zero3 import Zero3Checkpoint, zero3_tag_dir

    if zero3_tag_dir(tag_dir) != tag_dir:
        return False
    Zero3Checkpoint(tag_dir)
    if cfg.tensor_parallel != 1:
        raise ValueError(f"{what}: a ZeRO-3 checkpoint (tensor parallel degree 1), the config says "
                         f"tensor_parallel={cfg.tensor_parallel}")
    return True
