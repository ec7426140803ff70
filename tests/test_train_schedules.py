"""LR schedules (paper BERT constant, paper UL2 cosine) and strict configs."""

from __future__ import annotations

import math

import pytest

from lag_ds.config import apply_overrides, load_dataclass
from lag_ds.train.config import ScheduleConfig, TrainConfig
from lag_ds.train.schedules import lr_at


def test_constant_with_linear_warmup():
    s = ScheduleConfig(kind="constant", warmup_steps=10)
    assert lr_at(s, peak_lr=1e-4, step=0) == pytest.approx(1e-5)
    assert lr_at(s, peak_lr=1e-4, step=9) == pytest.approx(1e-4)
    assert lr_at(s, peak_lr=1e-4, step=500_000) == 1e-4


def test_paper_ul2_cosine():
    s = ScheduleConfig(kind="cosine", warmup_steps=10_000, decay_steps=400_000, final_lr=1e-3)
    assert lr_at(s, peak_lr=1e-2, step=4_999) == pytest.approx(5e-3)
    assert lr_at(s, peak_lr=1e-2, step=10_000) == pytest.approx(1e-2)
    assert lr_at(s, peak_lr=1e-2, step=400_000) == pytest.approx(1e-3)
    mid = 10_000 + 195_000
    assert lr_at(s, peak_lr=1e-2, step=mid) == pytest.approx(5.5e-3)
    at_growth = lr_at(s, peak_lr=1e-2, step=300_000)
    expected = 1e-3 + 0.5 * 9e-3 * (1 + math.cos(math.pi * 290_000 / 390_000))
    assert at_growth == pytest.approx(expected)
    assert lr_at(s, peak_lr=1e-2, step=450_000) == pytest.approx(1e-3)  # floor after decay


def test_schedule_validation():
    with pytest.raises(ValueError, match="decay_steps"):
        ScheduleConfig(kind="cosine", warmup_steps=10, decay_steps=5)
    with pytest.raises(ValueError, match="schedule.kind"):
        ScheduleConfig(kind="linear")


def test_config_unknown_keys_and_overrides():
    with pytest.raises(ValueError, match="unknown key.*'trian_steps'"):
        load_dataclass(TrainConfig, {"trian_steps": 3}, source="x.yaml")
    with pytest.raises(ValueError, match="unknown key"):
        load_dataclass(TrainConfig, {"optim": {"learning_rate": 3}}, source="x.yaml")
    cfg = apply_overrides(TrainConfig(), ["optim.lr=3e-4", "train_steps=7", "data.vocab_size=600"])
    assert (cfg.optim.lr, cfg.train_steps, cfg.data.vocab_size) == (3e-4, 7, 600)
    with pytest.raises(ValueError, match="unknown key 'optim.nope'"):
        apply_overrides(cfg, ["optim.nope=1"])
    with pytest.raises(ValueError, match="global_batch_size"):
        TrainConfig(global_batch_size=10, micro_batch_size=4)
