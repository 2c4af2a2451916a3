"""The optimizer a healing run uses: AdamW over the trainable parameters, plus any groups the
structures' hooks ask for (e.g. GBLR widths/locations: own learning rate, no momentum)."""
from __future__ import annotations

import torch
from torch import nn


def trainable_parameters(model: nn.Module, hooks=(), train: str = "structured") -> dict[str, nn.Parameter]:
    """Parameters to train. `train`: "structured" (structured layers and norms), "all", or "none"
    (only what the hooks' groups add). Parameters a hook freezes are excluded."""
    from ..methods import StructuredLinear

    if train not in ("structured", "all", "none"):
        raise ValueError(f"train must be 'structured', 'all' or 'none', got {train!r}")
    frozen = set().union(*(h.frozen(model) for h in hooks)) if hooks else set()
    chosen: dict[str, nn.Parameter] = {}
    if train == "all":
        chosen = dict(model.named_parameters())
    elif train == "structured":
        for mname, mod in model.named_modules():
            if isinstance(mod, StructuredLinear) or "norm" in type(mod).__name__.lower() \
                    or "norm" in mname.rsplit(".", 1)[-1].lower():
                for pname, p in mod.named_parameters(prefix=mname):
                    chosen[pname] = p
    return {n: p for n, p in chosen.items() if n not in frozen}


def make_optimizer(model: nn.Module, hooks=(), lr: float = 1e-4, weight_decay: float = 0.0,
                   train: str = "structured", betas=(0.9, 0.999)) -> torch.optim.Optimizer:
    """AdamW over `trainable_parameters`, with the hooks' extra groups split off. Sets
    `requires_grad` accordingly (what is not trained is frozen). Extra groups may set their own lr,
    betas and weight_decay (AdamW reads them per group)."""
    params = trainable_parameters(model, hooks, train)
    extra = [g for h in hooks for g in h.param_groups(model)]
    in_extra = {id(p) for g in extra for p in g["params"]}
    for p in model.parameters():
        p.requires_grad_(False)
    main = [p for p in params.values() if id(p) not in in_extra]
    for p in main:
        p.requires_grad_(True)
    for g in extra:
        for p in g["params"]:
            p.requires_grad_(True)
    if not main and not extra:
        raise ValueError("nothing to train: no parameter is selected (train="
                         f"{train!r}) and no structure adds a parameter group")
    groups = ([{"params": main}] if main else []) + extra
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, betas=betas)
