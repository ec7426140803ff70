"""The journal: append, replay, torn tails, corruption; and the metrics watcher."""

import json
import os

import pytest

from lag_ds.launch import Journal, JournalRecord, MetricsWatcher


def test_append_and_replay_latest_per_candidate(tmp_path):
    j = Journal(tmp_path / "sub" / "journal.jsonl")
    assert j.replay() == {}
    j.append(JournalRecord(candidate="a", state="pending", attempt=1))
    j.append(JournalRecord(candidate="b", state="pending", attempt=1))
    j.append(JournalRecord(candidate="a", state="running", attempt=1, pid=10, pgid=10,
                           start_ticks=5, port=29500, include="localhost:0"))
    j.append(JournalRecord(candidate="a", state="failed", attempt=1, reason="exit code 1",
                           exit_code=1))
    latest = j.replay()
    assert latest["a"].state == "failed" and latest["a"].reason == "exit code 1"
    assert latest["a"].is_final and not latest["b"].is_final
    assert len(j.records()) == 4
    # one JSON object per line, newline-terminated
    lines = j.path.read_text().split("\n")
    assert lines[-1] == "" and all(json.loads(line) for line in lines[:-1])


def test_torn_last_line_is_ignored_then_cut(tmp_path):
    j = Journal(tmp_path / "journal.jsonl")
    j.append(JournalRecord(candidate="a", state="pending", attempt=1))
    with open(j.path, "a") as f:
        f.write('{"candidate": "a", "state": "runn')  # orchestrator killed mid-write
    assert j.replay()["a"].state == "pending"
    j.append(JournalRecord(candidate="a", state="finished", attempt=1))
    assert [r.state for r in j.records()] == ["pending", "finished"]
    assert j.path.read_text().count("\n") == 2


def test_a_whole_record_without_newline_was_never_acknowledged(tmp_path):
    j = Journal(tmp_path / "journal.jsonl")
    j.append(JournalRecord(candidate="a", state="pending", attempt=1))
    text = j.path.read_text()
    j.path.write_text(text + text.rstrip("\n").replace("pending", "finished"))
    assert j.replay()["a"].state == "pending"


def test_garbage_in_the_middle_is_an_error(tmp_path):
    j = Journal(tmp_path / "journal.jsonl")
    j.append(JournalRecord(candidate="a", state="pending", attempt=1))
    with open(j.path, "a") as f:
        f.write("garbage\n")
    j.append(JournalRecord(candidate="a", state="finished", attempt=1))
    with pytest.raises(ValueError, match=rf"{j.path}:2: not JSON"):
        j.replay()


def test_bad_records(tmp_path):
    with pytest.raises(ValueError, match="state must be one of"):
        JournalRecord(candidate="a", state="done", attempt=1)
    with pytest.raises(ValueError, match="needs pid/pgid"):
        JournalRecord(candidate="a", state="running", attempt=1)
    p = tmp_path / "journal.jsonl"
    p.write_text(json.dumps({"candidate": "a", "state": "pending"}) + "\n")
    with pytest.raises(ValueError, match=f"{p}:1: keys"):
        Journal(p).replay()


def test_metrics_watcher_reads_only_complete_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    w = MetricsWatcher(path)
    assert w.poll() == 0  # no file yet
    with open(path, "w") as f:
        f.write('{"step": 100, "val/loss": 3.0}\n{"step": 101, "train/lo')
    assert w.poll() == 1 and w.last_step == 100 and w.last_val_loss == 3.0
    assert w.poll() == 0
    with open(path, "a") as f:
        f.write('ss": 2.9}\n{"step": 102, "train/loss": NaN}\n')
    assert w.poll() == 2 and w.last_step == 102
    assert w.non_finite == (102, "train/loss")
    assert (w.first_step, w.num_records) == (100, 3)


def test_metrics_watcher_follows_a_resumed_trainer_rewriting_its_file(tmp_path):
    # The trainer truncates the steps after its checkpoint and appends again -- possibly past
    # our old offset before the next poll.  Reading on from the old offset would land mid-line.
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "train/loss": 3.0 - s / 100}) + "\n" for s in range(4)]
    path.write_text("".join(lines))
    w = MetricsWatcher(path)
    assert w.poll() == 4 and w.last_step == 3
    resumed = lines[:2] + [json.dumps({"step": s, "train/loss": 2.0, "note": "x" * 40}) + "\n"
                           for s in range(2, 6)]
    path.write_text("".join(resumed))
    assert w.poll() == 6 and (w.first_step, w.last_step, w.num_records) == (0, 5, 6)
    assert w.records_seen == 10  # the progress counter only grows


def test_metrics_watcher_rejects_garbage_and_rereads_replaced_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "val/loss/span": Infinity}\n')
    w = MetricsWatcher(path)
    w.poll()
    assert w.non_finite == (1, "val/loss/span")
    path.write_text("")
    assert w.poll() == 0 and w.non_finite is None  # truncated/replaced: state starts over
    path.write_text('{"step": 1}\nnope\n')
    with pytest.raises(ValueError, match=f"{path}:2: not a JSON object"):
        w.poll()
    os.unlink(path)
