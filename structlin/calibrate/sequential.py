"""Block-by-block calibration: each transformer block is calibrated on the outputs of the blocks before
it *after* they were compressed, so projection sees the activations the compressed model will produce.

Peak memory is one block's statistics plus the cached block inputs (optionally offloaded to CPU): the
inputs of block 0 are captured once (the forward stops there), then each block runs on the cached inputs
twice — once to collect statistics, once (compressed) to produce the next block's inputs.

A model larger than the accelerator: keep it on the CPU and pass `exec_device="cuda"`. Each block then
moves to the accelerator for its calibration, projection and forward, and back to the CPU afterwards;
with `offload=True` the cached activations stay on the CPU too, so accelerator memory holds one block
and one batch at a time.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from ..errors import CalibrationError
from .collect import Collector, prepare_batch, progress_bar, run_model
from .stats import Stats


class _Stop(Exception):
    pass


def find_blocks(model: nn.Module, names: Iterable[str]) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks: the one whose children contain the most of `names`."""
    names = list(names)
    best, best_hits = None, 0
    for prefix, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            hits = sum(n.startswith(prefix + ".") for n in names)
            if hits > best_hits:
                best, best_hits = (prefix, mod), hits
    if best is None:
        raise CalibrationError(f"sequential calibration needs a ModuleList of transformer blocks; none of "
                               f"{type(model).__name__}'s ModuleLists contains the targets")
    return best


def _hidden(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args, kwargs, h):
    if args:
        return (h,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def run_sequential(model: nn.Module, targets: dict[str, nn.Module], batches: Iterable, needs: set[str],
                   on_block: Callable[[int, dict[str, Stats]], None], offload: bool = False,
                   progress: bool = True, exec_device=None) -> list[str]:
    """Calibrate block by block; `on_block(i, stats)` must compress block i's targets in place.

    exec_device: where each block runs (moved there and back); default: where the block lives.
    Returns the target names outside every block (the caller calibrates those on the whole model).
    """
    prefix, blocks = find_blocks(model, targets)
    cache = []  # per batch: [args, kwargs, mask]

    def capture(module, args, kwargs):
        h = _hidden(args, kwargs)
        args, kwargs = _with_hidden(args, kwargs, h.to("cpu") if offload else h)
        cache.append([args, kwargs, None])
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                inputs, mask = prepare_batch(batch, model, i)
                try:
                    run_model(model, inputs)
                except _Stop:
                    pass
                else:
                    raise CalibrationError(f"the forward never reached {prefix}.0")
                cache[-1][2] = mask
    finally:
        handle.remove()
    if not cache:
        raise CalibrationError("calibration data is empty: the iterable gave no batches")

    for b, block in enumerate(progress_bar(blocks, "sequential calibration", progress, len(blocks))):
        home = next(block.parameters()).device
        device = torch.device(exec_device) if exec_device is not None else home
        if device != home:
            block.to(device)
        mine = {f"{prefix}.{b}." + n: m for n, m in block.named_modules()
                if f"{prefix}.{b}." + n in targets}
        with torch.no_grad():
            if mine:
                with Collector(mine, needs) as col:
                    for args, kwargs, mask in cache:
                        col.start_batch(None if mask is None else mask.to(device))
                        block(*_to(args, device), **_to(kwargs, device))
                        col.end_batch()
                on_block(b, col.finish())
            for entry in cache:
                args, kwargs, _ = entry
                out = block(*_to(args, device), **_to(kwargs, device))
                h = out[0] if isinstance(out, (tuple, list)) else out
                entry[0], entry[1] = _with_hidden(args, kwargs, h.to("cpu") if offload else h.to(
                    _hidden(args, kwargs).device))
        if device != home:
            block.to(home)
    return [n for n in targets if not n.startswith(prefix + ".")]
