"""Kernels: torch.library custom ops with torch reference implementations (the CPU path) and Triton
kernels (the CUDA path, optional). Kernels know nothing of models."""

import torch

_SMS: dict = {}


def sm_count(device: torch.device, cpu: int) -> int:
    """Streaming multiprocessors of a CUDA device (cached per device: persistent kernels size their grids
    with it on every call); `cpu` programs elsewhere (the Triton interpreter)."""
    if device.type != "cuda":
        return cpu
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SMS:
        _SMS[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SMS[i]
