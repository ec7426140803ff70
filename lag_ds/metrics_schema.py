"""``metrics.jsonl``: the one record format the trainer writes and the launcher and selector read.

Each line is one JSON object: ``{"step": int, "wall_time": float, "<tag>": float, ...}``.  The tag
names and the parser live here only, so the writer (:mod:`lag_ds.train.metrics`), the live
watcher (:mod:`lag_ds.launch.watch`) and the curve reader (:mod:`lag_ds.select.curves`) cannot
drift apart.  Non-finite values are JSON ``NaN``/``Infinity`` (Python's json default) so that a
diverging run is visible rather than dropped.

Example::

    >>> parse_record('{"step": 3, "val/loss": 2.5}', where="m.jsonl:1")[VAL_LOSS]
    2.5
"""

from __future__ import annotations

import json

STEP = "step"
WALL_TIME = "wall_time"
TRAIN_LOSS = "train/loss"
TRAIN_LR = "train/lr"
TRAIN_GRAD_NORM = "train/grad_norm"
TRAIN_TOKENS_PER_S = "train/tokens_per_s"
VAL_LOSS = "val/loss"
"""Token-weighted validation loss over every denoiser: what LAG ranks candidates by."""
VAL_LOSS_PREFIX = "val/loss/"
"""``val/loss/<denoiser>``: the validation loss of one UL2 denoiser."""
VAL_SINCE_GROWTH = "val_since_growth/loss"
"""TensorBoard only: ``val/loss`` against steps since growing."""


def is_loss_tag(tag: str) -> bool:
    """Tags whose non-finite value means the run diverged."""
    return tag in (TRAIN_LOSS, VAL_LOSS) or tag.startswith(VAL_LOSS_PREFIX)


def parse_record(line: str | bytes, *, where: str) -> dict:
    """One line as a record; ``ValueError("<where>: ...")`` unless it is a JSON object with an
    integer ``step`` and numeric loss tags."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{where}: not a JSON object ({getattr(err, 'msg', err)})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    step = record.get(STEP)
    if isinstance(step, bool) or not isinstance(step, int):
        raise ValueError(f"{where}: 'step' must be an integer, got {step!r}")
    for tag, value in record.items():
        if is_loss_tag(tag) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{where}: {tag!r} must be a number, got {value!r}")
    return record
