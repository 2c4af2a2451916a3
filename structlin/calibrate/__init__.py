"""Calibration: hooks -> streaming float64 statistics of each target's input (see `Stats`)."""
from .collect import Collector, collect, prepare_batch
from .sequential import find_blocks, run_sequential
from .stats import Stats

__all__ = ["Stats", "Collector", "collect", "prepare_batch", "run_sequential", "find_blocks"]
