"""Helpers for the dense modules structlin replaces: `nn.Linear` and transformers' `Conv1D`.

`Conv1D` (GPT-2 style) stores its weight as (in, out) and computes x @ W + b; everything in structlin
works with the PyTorch convention W (out, in), y = x Wᵀ + b, so `dense_weight` transposes it.
"""
from __future__ import annotations

import torch
from torch import nn


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers missing or moved: no Conv1D to match
        return None
    return Conv1D


def is_linear(module: nn.Module) -> bool:
    """True for a dense linear layer structlin can replace (nn.Linear or transformers Conv1D)."""
    if isinstance(module, nn.Linear):
        return True
    conv1d = _conv1d_class()
    return conv1d is not None and isinstance(module, conv1d)


def linear_shape(module: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, has_bias) of a linear-like module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, module.bias is not None
    w = module.weight  # Conv1D: (in, out)
    return w.shape[0], w.shape[1], getattr(module, "bias", None) is not None


def dense_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W, b) with W of shape (out, in), as views of the module's own tensors (no copy)."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    return module.weight.t(), getattr(module, "bias", None)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the module called `name` (dotted path) inside `model`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
