"""The few torch.distributed facts structlin needs; everything works unchanged without a process group.

structlin runs on the existing engines: launch with `torchrun` (or `accelerate launch`), initialise the
process group as usual, give each rank its own shard of the data, and call the same functions:
calibration statistics are all-reduced in float64 (every rank then computes identical projections),
`heal` averages gradients across ranks (DDP) and only rank 0 writes files.
"""
from __future__ import annotations

import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()
