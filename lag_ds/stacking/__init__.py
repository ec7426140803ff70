"""Stage drivers: one LAG growth stage (``run_lag``); adaptive stacking iterates it per stage."""

from lag_ds.stacking.config import LagRunConfig

__all__ = ["LagRunConfig"]
