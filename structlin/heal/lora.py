"""LoRA on structured layers, merged exactly without losing the structure.

Every structure that ends in a dense map, y = h Wₒᵀ + b with h = inner(x) (the low-rank code, the ESPACE
projection Pᵀx, the SS1 sketch xS), takes an adapter on h:

    y = base(x) + (α / r) · (h Aᵀ) Bᵀ,      A (r × d), B (N × r), B = 0 at start

so `merge_lora` folds it into the structure exactly: Wₒ ← Wₒ + (α / r) B A. The merged model has the
same specs, parameter count and kernels as before. (An adapter on x itself could not be merged without
densifying the layer; this is why structlin adapts h.)

With the `peft` package, the same is available where a structure's final map *is* an `nn.Linear`:
`LowRankLinear.up` and `EspaceLinear.proj_out` are plain `nn.Linear`s, so
`peft.LoraConfig(target_modules=["up", "proj_out"])` wraps them and `merge_and_unload()` folds the
adapter into them, keeping the structure. SS1 keeps its weight inside its fused kernels, so it takes
structlin's adapter.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ..methods import StructuredLinear
from ..modules import set_submodule


class LoRAStructured(nn.Module):
    """A structured layer plus a LoRA adapter on its inner features (see the module docstring)."""

    def __init__(self, base: StructuredLinear, rank: int = 8, alpha: float | None = None, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be ≥ 1, got {rank}")
        w = base.outer_weight()          # raises a clear error for structures without the split
        self.base = base
        self.rank, self.alpha = rank, float(2 * rank if alpha is None else alpha)
        self.scaling = self.alpha / rank
        d, n = w.shape[1], w.shape[0]
        self.lora_A = nn.Linear(d, rank, bias=False, dtype=w.dtype, device=w.device)
        self.lora_B = nn.Linear(rank, n, bias=False, dtype=w.dtype, device=w.device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=5 ** 0.5)
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base.inner(x)
        return self.base.outer(h) + self.scaling * self.lora_B(self.lora_A(self.dropout(h)))

    @torch.no_grad()
    def merged(self) -> StructuredLinear:
        """The base layer with the adapter folded into its outer weight (in place)."""
        w = self.base.outer_weight()
        delta = (self.lora_B.weight.double() @ self.lora_A.weight.double()) * self.scaling
        w.copy_((w.double() + delta).to(w.dtype))
        if hasattr(self.base, "clear_merged"):
            self.base.clear_merged()
        return self.base


def add_lora(model: nn.Module, rank: int = 8, alpha: float | None = None, targets=None,
             dropout: float = 0.0, freeze_base: bool = True) -> dict[str, LoRAStructured]:
    """Wrap structured layers of `model` with LoRA adapters; returns {name: adapter}.

    targets: None (every structured layer), a regex matched in full against the module name, or a list of
    names / name suffixes. With `freeze_base`, everything except the adapters stops requiring grad.
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, StructuredLinear)}
    if targets is None:
        chosen = list(layers)
    elif isinstance(targets, str):
        chosen = [n for n in layers if re.fullmatch(targets, n)]
    else:
        chosen = [n for n in layers if any(n == t or n.endswith("." + t) for t in targets)]
    if not chosen:
        raise ValueError(f"add_lora: no structured layer matches targets={targets!r}; structured layers: "
                         f"{sorted(layers)[:6]}{' …' if len(layers) > 6 else ''}")
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    out = {}
    for n in chosen:
        try:
            adapter = LoRAStructured(layers[n], rank, alpha, dropout)
        except NotImplementedError as e:
            raise ValueError(f"add_lora: {n}: {e}") from None
        set_submodule(model, n, adapter)
        out[n] = adapter
    return out


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA adapter into its structured layer and put the layer back; returns how many."""
    names = [n for n, m in model.named_modules() if isinstance(m, LoRAStructured)]
    for n in names:
        set_submodule(model, n, model.get_submodule(n).merged())
    return len(names)
