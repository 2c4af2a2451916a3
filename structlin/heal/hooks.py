"""Training hooks: how a structure takes part in healing / fine-tuning without user glue.

A method that needs to act during training (the LoSparse pruner masks rows of S, GBLR projects its
structure onto the FLOP budget and trains widths/locations in their own optimizer group) returns
`TrainingHook`s from `Method.training_hooks(model, layers, opts)`. `hooks_for(model)` gathers them for
every structure present in a model; `heal`, `finetune_classifier` and the HF `Trainer` callback
(`StructlinCallback`) all drive the same hooks at the same points:

    loss.backward()
    hook.after_backward(model, step)        # gradients present, before the optimizer (e.g. importance)
    optimizer.step()
    hook.after_optimizer_step(model, step)  # gradients still present, before zero_grad (mask, project)
    optimizer.zero_grad()

`step` counts optimizer steps from 0. A hook may also add parameter groups (e.g. structure parameters
with their own learning rate and no momentum) and name parameters to freeze. Hook state that must
survive a resume is returned by `state_dict()` and restored by `load_state_dict()`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class TrainingHook:
    """Base class: every method is a no-op; override what the structure needs."""

    def param_groups(self, model: nn.Module) -> list[dict]:
        """Extra optimizer groups ({"params": [...], "lr": ..., ...}); their parameters are removed from
        the default group. They go to the same AdamW, so a group may set its own "lr", "betas" (e.g.
        (0.0, 0.999) for no momentum) and "weight_decay"."""
        return []

    def frozen(self, model: nn.Module) -> set[str]:
        """Qualified names of parameters that must not train."""
        return set()

    def after_backward(self, model: nn.Module, step: int) -> None:
        pass

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def structured_layers(model: nn.Module) -> dict[str, nn.Module]:
    from ..methods import StructuredLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, StructuredLinear)}


def hooks_for(model: nn.Module, options: dict[str, dict] | None = None) -> list[TrainingHook]:
    """The training hooks of every structure in `model`, grouped by method. `options` maps a method name
    to keyword options for its hooks (e.g. {"losparse": {"final_keep": 0.1, "total_steps": 1000}})."""
    from ..methods import for_layer

    by_method: dict[str, tuple[Any, dict[str, nn.Module]]] = {}
    for name, layer in structured_layers(model).items():
        m = for_layer(layer)
        by_method.setdefault(m.name, (m, {}))[1][name] = layer
    hooks: list[TrainingHook] = []
    for mname, (m, layers) in sorted(by_method.items()):
        hooks += m.training_hooks(model, layers, dict((options or {}).get(mname, {})))
    return hooks


def run_after_backward(hooks, model, step):
    for h in hooks:
        h.after_backward(model, step)


@torch.no_grad()
def run_after_optimizer_step(hooks, model, step):
    for h in hooks:
        h.after_optimizer_step(model, step)
