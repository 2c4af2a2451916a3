"""Forward hooks that feed target modules' inputs into `Stats`, excluding padding tokens.

`collect(model, modules, batches)` runs the model once over the calibration batches. A batch is an
`input_ids` tensor or a dict of model keyword arguments; its `attention_mask` (if any) selects which token
rows count. Modules reading the identical input tensor share one `Stats` (their Gram is computed once).
"""
from __future__ import annotations

import inspect
from typing import Iterable

import torch
from torch import nn

from ..errors import CalibrationError
from ..modules import linear_shape
from .stats import Stats


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


POSITIONAL = "__positional__"  # key under which a floating-point batch is passed as the model's first argument


def prepare_batch(batch, model: nn.Module, index: int = 0) -> tuple[dict, torch.Tensor | None]:
    """Validate one calibration batch; return (model kwargs on the model's device, token mask or None).

    A batch is an integer `input_ids` tensor, a floating-point tensor (the first positional input of a
    plain `nn.Module`), or a dict of model keyword arguments.
    """
    if isinstance(batch, torch.Tensor):
        takes_ids = "input_ids" in inspect.signature(model.forward).parameters
        batch = {POSITIONAL if batch.is_floating_point() and not takes_ids else "input_ids": batch}
    if not isinstance(batch, dict) or not batch:
        raise CalibrationError(f"calibration batch {index} must be an input_ids tensor or a dict of model "
                               f"inputs, got {type(batch).__name__}")
    device, dtype = model_device(model), model_dtype(model)
    out = {}
    for key, v in batch.items():
        if not isinstance(v, torch.Tensor):
            out[key] = v
            continue
        label = "the input tensor" if key == POSITIONAL else f"'{key}'"
        if v.numel() == 0:
            raise CalibrationError(f"calibration batch {index}: {label} is empty (shape {tuple(v.shape)})")
        if key in ("input_ids", "token_type_ids", "position_ids") and (v.is_floating_point() or v.is_complex()):
            raise CalibrationError(f"calibration batch {index}: '{key}' must hold integer token ids, got "
                                   f"{v.dtype}")
        if v.is_floating_point():
            if not torch.isfinite(v).all():
                raise CalibrationError(f"calibration batch {index}: {label} contains NaN or inf")
            if key != "attention_mask" and v.dtype != dtype:
                raise CalibrationError(f"calibration batch {index}: {label} is {v.dtype} but the model is "
                                       f"{dtype}; cast the inputs to the model's dtype")
        out[key] = v.to(device)
    if "input_ids" in out and isinstance(out["input_ids"], torch.Tensor) and out["input_ids"].dim() == 1:
        out["input_ids"] = out["input_ids"][None]
        if "attention_mask" in out and out["attention_mask"].dim() == 1:
            out["attention_mask"] = out["attention_mask"][None]
    mask = out.get("attention_mask")
    if mask is not None:
        mask = mask.bool().reshape(-1)
        if not mask.any():
            raise CalibrationError(f"calibration batch {index} is all padding (attention_mask has no 1s)")
    return out, mask


class Collector:
    """Context manager: while active, inputs of `modules` are accumulated into shared `Stats`."""

    def __init__(self, modules: dict[str, nn.Module], needs: set[str]):
        self.modules = modules
        self.needs = set(needs)
        self.stats_of: dict[str, Stats] = {}
        self.mask: torch.Tensor | None = None
        self._last_x = None
        self._last_stats = None
        self._handles = []

    def __enter__(self):
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_pre_hook(self._hook(name, mod)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.end_batch()

    def start_batch(self, mask: torch.Tensor | None) -> None:
        self.mask = mask
        self._last_x = self._last_stats = None

    def end_batch(self) -> None:
        self.mask = None
        self._last_x = self._last_stats = None

    def _hook(self, name, mod):
        in_features = linear_shape(mod)[0]

        def hook(module, args):
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                return
            stats = self.stats_of.get(name)
            if stats is None:
                if x is self._last_x and self._last_stats.in_features == in_features:
                    stats = self._last_stats            # same tensor as the previous module: share
                    stats.modules.append(name)
                    self.stats_of[name] = stats
                    return
                stats = self.stats_of[name] = Stats(name, in_features, self.needs)
            elif x is self._last_x and stats is self._last_stats:
                return                                  # a sibling already counted this input
            rows = x.detach().reshape(-1, x.shape[-1])
            if self.mask is not None and self.mask.numel() == rows.shape[0]:
                rows = rows[self.mask.to(rows.device)]
            stats.update(rows)
            self._last_x, self._last_stats = x, stats

        return hook

    def groups(self) -> list[Stats]:
        """The distinct Stats objects, in first-use order."""
        seen, out = set(), []
        for s in self.stats_of.values():
            if id(s) not in seen:
                seen.add(id(s))
                out.append(s)
        return out

    def finish(self) -> dict[str, Stats]:
        """All-reduce across processes (if any) and check every module was reached."""
        for s in self.groups():
            s.all_reduce()
        missing = [n for n in self.modules if n not in self.stats_of]
        if missing:
            raise CalibrationError(f"modules never called during calibration (no statistics): {missing[:8]}")
        for s in self.groups():
            s._check()
        return dict(self.stats_of)


def run_model(model: nn.Module, inputs: dict):
    """Forward without building a KV cache (calibration never decodes)."""
    if POSITIONAL in inputs:
        rest = {k: v for k, v in inputs.items() if k != POSITIONAL}
        return model(inputs[POSITIONAL], **rest)
    if "use_cache" not in inputs and "use_cache" in inspect.signature(model.forward).parameters:
        inputs = {**inputs, "use_cache": False}
    return model(**inputs)


def progress_bar(iterable, desc, enabled, total=None):
    """`iterable` under a tqdm bar when `enabled`, else unchanged."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


def grad_through_embeddings(model: nn.Module):
    """Make the input-embedding output require grad (so activations carry gradients) without touching
    the parameters; returns the hook handle, or None for models without input embeddings."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None:
        return None
    return emb.register_forward_hook(lambda m, i, o: o.requires_grad_(True) if not o.requires_grad else None)


def collect(model: nn.Module, modules: dict[str, nn.Module], batches: Iterable, needs: set[str],
            progress: bool = True) -> dict[str, Stats]:
    """Run `model` over `batches` (no grad) and return name -> Stats of each module's input."""
    n = 0
    total = len(batches) if hasattr(batches, "__len__") else None
    with Collector(modules, needs) as col, torch.no_grad():
        for i, batch in enumerate(progress_bar(batches, "calibrating", progress, total)):
            inputs, mask = prepare_batch(batch, model, i)
            col.start_batch(mask)
            run_model(model, inputs)
            col.end_batch()
            n += 1
    if n == 0:
        raise CalibrationError("calibration data is empty: the iterable gave no batches")
    return col.finish()
