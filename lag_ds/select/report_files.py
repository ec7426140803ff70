"""Write the LAG analysis: ``report.md``, ``report.json``, PNG figures and one TensorBoard run.

:func:`write_report` computes everything first (:func:`lag_ds.select.report.analyze_run`), so bad
input raises ``ValueError`` before anything is written.  Then the output directory and the
TensorBoard run are each built in a hidden temporary sibling and renamed into place; a previous
report is swapped out and removed only after the new one is complete, so a reader never sees a
half-written report (at worst, for an instant, no report).

Figures are drawn from ``report.json``'s numbers alone (matplotlib, Agg canvas, no pyplot state):
correlation with the final loss, the self-correlation heatmap, recall@{1,2,3}, regret, and the
candidates' validation curves, all against steps since growing.  The TensorBoard run
(``RUN_DIR/tb/analysis`` by default) holds the same figures as images, the report's table and
verdict as text, and the per-step correlations with the final loss and relative regret as scalars
(at global steps).

Example::

    >>> write_report("runs/ul2_lag", smoothing=11)          # doctest: +SKIP
    PosixPath('runs/ul2_lag/analysis')
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lag_ds.atomic_io import fsync_dir
from lag_ds.select.phase import DEFAULT_MARGIN, DEFAULT_THRESHOLD
from lag_ds.select.report import ReplaySpec, analyze_run

__all__ = ["markdown_report", "render_figures", "write_report"]


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.0f}"
    return str(x)


def _table_md(rep: dict[str, Any]) -> str:
    head = ("| Strategy | Pick | Final val loss | Regret | Relative regret | Candidate-steps "
            "| Decided at t | Note |\n|---|---|---|---|---|---|---|---|\n")
    if rep["table"] is None:
        rows = [{"strategy": f"LAG@{rep['k']}", "pick": rep["winner"], "decided_at": rep["k"],
                 "candidate_steps": rep["num_raced"] * rep["k"],
                 "note": "race-only: no final losses"},
                {"strategy": "Best at initialization (LAG@0)", "pick": rep["lag0_winner"],
                 "candidate_steps": 0, "decided_at": 0}]
        rows += [r for r in rep["replays"] if "error" not in r]
        rows = [{"strategy": r.get("strategy", r.get("policy")), **r} for r in rows]
    else:
        rows = rep["table"]
    lines = [f"| {r['strategy']} | {_fmt(r.get('pick'))} | {_fmt(r.get('final_loss'))} "
             f"| {_fmt(r.get('regret'))} | {_fmt(r.get('relative_regret'))} "
             f"| {_fmt(r.get('candidate_steps'))} | {_fmt(r.get('decided_at'))} "
             f"| {r.get('note', '')} |" for r in rows]
    return head + "\n".join(lines) + "\n"


def markdown_report(rep: dict[str, Any], figures: Sequence[str]) -> str:
    """``report.md`` text for an :func:`analyze_run` dict and the figure file names."""
    out = [f"# LAG analysis: {rep['run_dir']}", "",
           f"**{rep['kind']}** run; grown at step {rep['base_step']}; LAG@{rep['k']} picked "
           f"**{rep['winner']}** (LAG@0: {rep['lag0_winner']}); last evaluation at "
           f"t={rep['last_t']} steps since growing.", "", "## Verdict", "", rep["verdict"], "",
           "## Strategies", "", _table_md(rep)]
    if rep["final"]:
        f = rep["final"]
        out += [f"Final losses: raw `val/loss` at step {f['step']} (t={f['t']}) for "
                f"{len(f['losses'])} candidate(s)."]
        out += [f"- {n}: {why}" for n, why in f["left_out"].items()]
        out.append("")
    out += ["## Proposed k", ""]
    out += [f"- {p['description']}" for p in rep["k_proposals"]]
    out += ["", f"Used: **{rep['k_proposal']['rule']}** (k={rep['k_proposal']['k']}).", ""]
    errors = [r for r in rep["replays"] if "error" in r]
    if errors:
        out += ["## Replays that made no decision", ""]
        out += [f"- {r['spec']['kind']} {r['spec']['params']}: {r['error']}" for r in errors]
        out.append("")
    out += ["## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures] + [""]
    out += ["## Notes", "",
            f"- Landscape smoothing: centred moving average over "
            f"{rep['analysis_smoothing_window']} point(s); final losses are raw.",
            "- A candidate without a point at step t is left out at t; curves with NaN/inf "
            "are left out entirely.", ""]
    if rep["left_out"]:
        out += ["Left out of the landscape:", ""]
        out += [f"- {n}: {why}" for n, why in rep["left_out"].items()] + [""]
    out += ["All numbers: `report.json`.", ""]
    return "\n".join(out)


def _series(rep: dict[str, Any], key: str) -> tuple[np.ndarray, np.ndarray]:
    t = np.array([s["t"] for s in rep["steps"]], dtype=float)
    v = np.array([np.nan if s[key] is None else s[key] for s in rep["steps"]], dtype=float)
    return t, v


def _figures(rep: dict[str, Any]) -> dict[str, Figure]:
    figs: dict[str, Figure] = {}
    k = rep["k"]
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for name, c in rep["curves"].items():
        t = np.array(c["t"], dtype=float)
        v = np.array([np.nan if x is None else x for x in c["loss"]], dtype=float)
        keep = t >= 0
        ax.plot(t[keep], v[keep], lw=1, label=name if len(rep["curves"]) <= 12 else None)
    ax.axvline(k, color="k", ls="--", lw=0.8)
    ax.set(xlabel="steps since growing", ylabel="val/loss", title="Candidates (dashed: k)")
    if len(rep["curves"]) <= 12:
        ax.legend(fontsize=7)
    figs["curves"] = fig

    sc = rep["self_correlation"]
    if sc["steps"]:
        fig = Figure(figsize=(6, 5))
        ax = fig.add_subplot()
        m = np.array([[np.nan if x is None else x for x in row] for row in sc["matrix"]], float)
        s = np.array(sc["steps"], dtype=float)
        mid = (s[1:] + s[:-1]) / 2 if s.size > 1 else np.array([])
        half = (s[1] - s[0]) / 2 if s.size > 1 else 0.5
        edges = np.concatenate([[s[0] - half], mid, [s[-1] + (s[-1] - mid[-1] if mid.size
                                                                else half)]])
        im = ax.pcolormesh(edges, edges, m, vmin=-1, vmax=1, cmap="viridis")
        fig.colorbar(im, ax=ax, label="Spearman")
        ax.set(xlabel="steps since growing", ylabel="steps since growing",
               title="Self-correlation of the candidates' losses")
        figs["self_correlation"] = fig

    if rep["final"] is not None:
        fig = Figure(figsize=(7, 4))
        ax = fig.add_subplot()
        for key, label in (("spearman_final", "Spearman"), ("pearson_final", "Pearson")):
            ax.plot(*_series(rep, key), label=label)
        ax.axhline(rep["threshold"], color="grey", ls=":", lw=0.8)
        ax.axvline(k, color="k", ls="--", lw=0.8)
        ax.set(xlabel="steps since growing", ylabel="correlation", ylim=(-1.05, 1.05),
               title=f"Correlation with the final loss (t={rep['final']['t']})")
        ax.legend()
        figs["correlation_with_final"] = fig

        fig = Figure(figsize=(7, 4))
        ax = fig.add_subplot()
        t = np.array([s["t"] for s in rep["steps"]], dtype=float)
        for j, top in enumerate(("1", "2", "3")):
            r = [np.nan if s["recall"][top] is None else float(s["recall"][top]) + 0.02 * j
                 for s in rep["steps"]]
            ax.step(t, r, where="post", label=f"Recall@{top}")
        ax.set(xlabel="steps since growing", ylabel="final-best in top k", ylim=(-0.1, 1.15),
               title="Recall@k of the final-best candidate")
        ax.legend()
        figs["recall"] = fig

        fig = Figure(figsize=(7, 4))
        ax = fig.add_subplot()
        ax.plot(*_series(rep, "relative_regret"), label="relative regret")
        ax2 = ax.twinx()
        ax2.plot(*_series(rep, "regret"), color="tab:orange", lw=0.8, label="regret")
        ax.axvline(k, color="k", ls="--", lw=0.8)
        ax.set(xlabel="steps since growing", ylabel="relative regret", ylim=(-0.05, 1.05),
               title="Regret of choosing the lowest loss at t")
        ax2.set_ylabel("regret (loss)")
        figs["regret"] = fig
    return figs


def _rgb(fig: Figure) -> np.ndarray:
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def render_figures(rep: dict[str, Any], out_dir: Path) -> dict[str, np.ndarray]:
    """Save the figures as ``out_dir/<name>.png``; return ``{name: HxWx3 uint8 image}``."""
    images = {}
    for name, fig in _figures(rep).items():
        FigureCanvasAgg(fig)
        fig.savefig(out_dir / f"{name}.png", dpi=110, bbox_inches="tight")
        images[name] = _rgb(fig)
    return images


def _write_tensorboard(tb_dir: Path, rep: dict[str, Any], images: dict[str, np.ndarray]) -> None:
    from torch.utils.tensorboard import SummaryWriter  # heavy: imported only when asked for

    writer = SummaryWriter(log_dir=str(tb_dir))
    try:
        step = rep["base_step"] + rep["k"]
        for name, img in images.items():
            writer.add_image(f"analysis/{name}", img, global_step=step, dataformats="HWC")
        for s in rep["steps"]:  # per-step curves as scalars too, at global steps
            for key in ("spearman_final", "pearson_final", "relative_regret"):
                if s[key] is not None:
                    writer.add_scalar(f"analysis/{key}", s[key], rep["base_step"] + s["t"])
        writer.add_text("analysis/table", _table_md(rep), global_step=step)
        writer.add_text("analysis/verdict", rep["verdict"], global_step=step)
    finally:
        writer.close()


def _remove_stale(final: Path) -> None:
    """Remove ``.<name>.partial-<pid>-*`` / ``.old-`` siblings left by killed runs."""
    for kind in ("partial", "old"):
        for stale in final.parent.glob(f".{final.name}.{kind}-*"):
            pid = stale.name[len(f".{final.name}.{kind}-"):].split("-")[0]
            try:
                os.kill(int(pid), 0)
            except (ValueError, ProcessLookupError):
                shutil.rmtree(stale, ignore_errors=True)
            except PermissionError:
                pass  # alive, someone else's


def _publish(tmp: Path, final: Path) -> None:
    """Rename the complete ``tmp`` onto ``final``, replacing an older ``final`` if present."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _check_out(out: Path, run_dir: Path, *, option: str = "--out") -> None:
    cands = (run_dir / "candidates").resolve()
    res = out.resolve()
    if res == cands or cands in res.parents:
        raise ValueError(f"{option} {out}: inside the candidates directory {cands}; refusing to "
                         "write there")
    if option == "--out" and not res.parent.is_dir():
        raise ValueError(f"{option} {out}: parent directory {res.parent} does not exist")
    if res.exists() and not res.is_dir():
        raise ValueError(f"{option} {out}: exists and is not a directory")


def write_report(run_dir: str | Path, *, out: str | Path | None = None,
                 tb_dir: str | Path | None = None, tensorboard: bool = True, smoothing: int = 1,
                 threshold: float = DEFAULT_THRESHOLD, margin: float = DEFAULT_MARGIN,
                 horizon: int | None = None, replays: Sequence[ReplaySpec] = ()) -> Path:
    """Analyse ``run_dir`` and write the report directory (default ``RUN_DIR/analysis``) and, if
    ``tensorboard``, the TensorBoard run (default ``RUN_DIR/tb/analysis``).  Returns the report
    directory.  ``ValueError`` (nothing written) on bad input."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "analysis"
    tb = Path(tb_dir) if tb_dir is not None else run_dir / "tb" / "analysis"
    if run_dir.is_dir():
        _check_out(out, run_dir)
        if tensorboard:
            _check_out(tb, run_dir, option="--tb-dir")
    rep = analyze_run(run_dir, smoothing=smoothing, threshold=threshold, margin=margin,
                      horizon=horizon, replays=replays)
    _remove_stale(out)
    if tensorboard and tb.parent.is_dir():
        _remove_stale(tb)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    tb_tmp = tb.with_name(f".{tb.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        tmp.mkdir()
        images = render_figures(rep, tmp)
        names = [f"{n}.png" for n in images]
        rep["figures"] = names
        (tmp / "report.json").write_text(json.dumps(rep, indent=1, allow_nan=False) + "\n",
                                         encoding="utf-8")
        (tmp / "report.md").write_text(markdown_report(rep, names), encoding="utf-8")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if tensorboard:
            tb.parent.mkdir(parents=True, exist_ok=True)
            _write_tensorboard(tb_tmp, rep, images)
        _publish(tmp, out)
        if tensorboard:
            _publish(tb_tmp, tb)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(tb_tmp, ignore_errors=True)
    return out
