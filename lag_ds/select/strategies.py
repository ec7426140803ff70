"""The paper's strategy table (Tables 1-2): final loss, regret and cost of each way to choose.

Rows, each judged against the candidates' final losses (eqs. 1-2):

* **Oracle** -- the lowest final loss; costs training every candidate to the end.
* **LAG@k** -- the run's actual decision (``selection.json`` winner); costs ``n * k``.
* **Best at initialization (LAG@0)** -- the loss-preservation heuristic; costs nothing.
* **Stack last block on top** / **Stack random block on top** -- the design-space members closest
  to gradual stacking: the operator that grows the *last* ``num_new_layers`` layers as one block
  (``start == base num_layers - num_new_layers``, ``block_size == num_new_layers``, as
  ``lag_ds.growth.space`` defines them) with ``duplicate`` resp. ``random`` init.  A row appears
  only if that operator is among the candidates; it costs no race.
* one row per replayed policy (SH, settle, LAG@k') with its candidate-steps.

A pick without a final loss (stopped early, or diverged) gets ``None`` regret and a note.

Example::

    >>> ops = {"k4-i8-b4-duplicate": {"num_new_layers": 4, "start": 8, "block_size": 4,
    ...                               "init": "duplicate"}}
    >>> on_top_operators(ops, base_num_layers=12)
    {'last': 'k4-i8-b4-duplicate'}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lag_ds.select.metrics import regret, relative_regret
from lag_ds.select.policies import PolicyOutcome

__all__ = ["StrategyRow", "on_top_operators", "strategy_table"]

_ON_TOP_INIT = {"duplicate": "last", "random": "random"}


@dataclass(frozen=True, kw_only=True)
class StrategyRow:
    strategy: str
    pick: str | None
    final_loss: float | None
    regret: float | None
    relative_regret: float | None
    candidate_steps: int | None
    """Training steps spent on candidates to make the choice (``None``: unknown)."""
    decided_at: int | None = None
    note: str = ""


def on_top_operators(operators: Mapping[str, Mapping[str, Any]], *,
                     base_num_layers: int) -> dict[str, str]:
    """``{"last": name, "random": name}`` for the stack-on-top operators among ``operators``
    (``selection.json`` ``extra.operators``: name -> operator fields); keys absent if missing."""
    found: dict[str, str] = {}
    for name in sorted(operators):
        op = operators[name]
        if not isinstance(op, Mapping):
            raise ValueError(f"on_top_operators: operators[{name!r}] is not an object")
        try:
            k, start, block, init = (op["num_new_layers"], op["start"], op["block_size"],
                                     op["init"])
        except KeyError as err:
            raise ValueError(f"on_top_operators: operators[{name!r}] lacks {err}") from None
        if start == base_num_layers - k and block == k and init in _ON_TOP_INIT:
            found.setdefault(_ON_TOP_INIT[init], name)
    return found


def _row(strategy: str, pick: str | None, finals: Mapping[str, float], *,
         candidate_steps: int | None, decided_at: int | None = None, note: str = "") -> StrategyRow:
    if pick is not None and pick not in finals:
        note = (note + "; " if note else "") + f"{pick} has no final loss"
    judged = pick is not None and pick in finals
    return StrategyRow(
        strategy=strategy, pick=pick,
        final_loss=finals[pick] if judged else None,
        regret=regret(finals, chosen=pick) if judged else None,
        relative_regret=relative_regret(finals, chosen=pick) if judged else None,
        candidate_steps=candidate_steps, decided_at=decided_at, note=note,
    )


def strategy_table(final_losses: Mapping[str, float], *, final_t: int, num_candidates: int,
                   lag_k: int, lag_pick: str, lag0_pick: str | None,
                   on_top: Mapping[str, str] | None = None,
                   replays: Sequence[PolicyOutcome] = ()) -> tuple[StrategyRow, ...]:
    """The rows above.  ``final_t``: steps since growing of the final losses (Oracle's cost is
    ``num_candidates * final_t``); ``on_top`` as :func:`on_top_operators` returns."""
    if not final_losses:
        raise ValueError("strategy_table: no final losses")
    finals = dict(final_losses)
    oracle = min(finals.items(), key=lambda kv: (kv[1], kv[0]))[0]
    on_top = on_top or {}
    rows = [
        _row("Oracle", oracle, finals, candidate_steps=num_candidates * final_t,
             decided_at=final_t),
        _row(f"LAG@{lag_k}", lag_pick, finals, candidate_steps=num_candidates * lag_k,
             decided_at=lag_k, note="the run's decision (selection.json)"),
        _row("Best at initialization (LAG@0)", lag0_pick, finals, candidate_steps=0,
             decided_at=0, note="" if lag0_pick else "no candidate has a point at t=0"),
    ]
    for key, label in (("last", "Stack last block on top"),
                       ("random", "Stack random block on top")):
        if key in on_top:
            rows.append(_row(label, on_top[key], finals, candidate_steps=0,
                             note="fixed operator, no race"))
    for out in replays:
        rows.append(_row(out.policy, out.pick, finals, candidate_steps=out.candidate_steps,
                         decided_at=out.decided_at, note="replayed on the curves"))
    return tuple(rows)
