"""Hugging Face `Trainer` integration: the structure's training hooks run inside `Trainer` unchanged.

    hooks = structlin.heal.hooks_for(model, {"losparse": {...}})
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[StructlinCallback(hooks)],
                      optimizers=(structlin.heal.make_optimizer(model, hooks, lr=args.learning_rate), None))

`on_pre_optimizer_step` (gradients present) runs `after_backward`; `on_optimizer_step` (after
`optimizer.step()`, before `zero_grad`) runs `after_optimizer_step`. The step passed is
`state.global_step`, which counts finished optimizer steps, i.e. the index of the current one.
"""
from __future__ import annotations

from transformers import TrainerCallback

from .hooks import run_after_backward, run_after_optimizer_step


class StructlinCallback(TrainerCallback):
    def __init__(self, hooks):
        self.hooks = list(hooks)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        run_after_backward(self.hooks, model, state.global_step)

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        for h in self.hooks:  # hooks that reshape parameters (LoSparse row-gating) update the optimizer too
            if optimizer is not None and hasattr(h, "attach_optimizer"):
                h.attach_optimizer(optimizer)
        run_after_optimizer_step(self.hooks, model, state.global_step)
