"""``RUN_DIR/startup.json``: phases a job went through, saved before its first step and after it."""

from __future__ import annotations

import json
import time

from lag_ds.train.startup import FILE_NAME, StartupClock, process_start_time


def test_partial_write_then_final_write(tmp_path):
    clock = StartupClock()
    clock.mark("imports")
    clock.mark("first_validation")
    clock.write(tmp_path, final=False)  # a job killed now still leaves what it went through
    partial = json.loads((tmp_path / FILE_NAME).read_text())
    assert [m[0] for m in partial["marks"]] == ["imports", "first_validation"]
    assert not clock.written

    clock.mark("first_step")
    clock.write(tmp_path)
    final = json.loads((tmp_path / FILE_NAME).read_text())
    assert [m[0] for m in final["marks"]] == ["imports", "first_validation", "first_step"]
    seconds = [m[1] for m in final["marks"]]
    assert seconds == sorted(seconds) and seconds[0] >= 0
    clock.mark("later")
    clock.write(tmp_path)  # written once: later marks do not rewrite it
    assert json.loads((tmp_path / FILE_NAME).read_text()) == final
    assert not list(tmp_path.glob(".*.tmp"))


def test_only_the_enabled_rank_writes(tmp_path):
    clock = StartupClock(enabled=False)
    clock.mark("imports")
    clock.write(tmp_path)
    assert not (tmp_path / FILE_NAME).exists()


def test_process_start_is_in_the_past():
    start = process_start_time()
    assert time.time() - 3600 * 24 * 365 < start <= time.time()
