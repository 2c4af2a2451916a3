"""Sibling fusion for serving: layers that read the same input (q/k/v, gate/up) run as one wider layer.

`fuse_siblings(model, example)` runs one forward on `example`, groups the linear layers (dense or
structured) that received the *same input tensor*, and replaces each member by a `SiblingSlice` of a
shared `SiblingGroup`:

* dense `nn.Linear`s, and SS1 layers of the tied scheme with equal (in_features, r, bk, quantum):
  the stacked weights form one layer — one GEMM (SS1: one sketch + one GEMM, or one decode kernel) for
  the whole group, and each member reads its column slice of the output;
* low-rank and ESPACE layers: the inner maps are stacked (one K → Σk GEMM for the low-rank codes or the
  projections), then each member applies its own outer map to its slice.

The first member called with an input computes the group's result; the others reuse it (matched by the
input's storage, shape and version), so the eager forward, CUDA-graph capture and replays all run one
wide kernel where there were several. This is an inference transform: parameters are copied into the
stacked form, the state-dict names change, and the model is meant for serving, not for saving or
training (fuse after loading). `unfuse` is not provided: keep the unfused model if you need it.
"""
from __future__ import annotations

import torch
from torch import nn

from .methods import StructuredLinear
from .modules import set_submodule
from .targeting import linear_modules


def _kind(layer: nn.Module) -> str | None:
    from .methods.espace import EspaceLinear
    from .methods.lowrank import LowRankLinear
    from .methods.ss1 import SS1Linear

    if type(layer) is nn.Linear:
        return "dense"
    if type(layer) is SS1Linear and layer.spec.scheme == "tied":
        s = layer.spec
        return f"ss1:{s.in_features}:{s.r}:{s.bk}:{s.quantum}"
    if type(layer) is LowRankLinear:
        return "lowrank"
    if type(layer) is EspaceLinear:
        return "espace"
    return None


class SiblingGroup(nn.Module):
    """The shared computation of a group of sibling layers (see the module docstring)."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        kind = _kind(layers[0])
        self.kind = kind
        self.sizes: list[int] = []
        with torch.no_grad():
            if kind == "dense":
                w = torch.cat([m.weight for m in layers])
                b = None
                if any(m.bias is not None for m in layers):
                    b = torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features, dtype=w.dtype,
                                                                                 device=w.device) for m in layers])
                self.stacked = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype, device=w.device)
                self.stacked.weight.copy_(w)
                if b is not None:
                    self.stacked.bias.copy_(b)
                self.sizes = [m.out_features for m in layers]
                self.outers = None
            elif kind.startswith("ss1"):
                import dataclasses

                from .methods.ss1 import SS1Linear

                s0 = layers[0].spec
                bias = any(m.bias is not None for m in layers)
                spec = dataclasses.replace(s0, out_features=sum(m.out_features for m in layers), bias=bias)
                w0 = layers[0].weight
                self.stacked = SS1Linear(spec, dtype=w0.dtype, device=w0.device)
                self.stacked.weight.copy_(torch.cat([m.weight for m in layers]))
                if bias:
                    self.stacked.bias.copy_(torch.cat([m.bias if m.bias is not None else torch.zeros(
                        m.out_features, dtype=w0.dtype, device=w0.device) for m in layers]))
                self.sizes = [m.out_features for m in layers]
                self.outers = None
            else:
                inner_w = torch.cat([m.down.weight if kind == "lowrank" else m.P.T for m in layers])
                self.stacked = nn.Linear(inner_w.shape[1], inner_w.shape[0], bias=False, dtype=inner_w.dtype,
                                         device=inner_w.device)
                self.stacked.weight.copy_(inner_w)
                self.sizes = [m.spec.rank for m in layers]
                self.outers = nn.ModuleList([m.up if kind == "lowrank" else m.proj_out for m in layers])
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self._key = None
        self._out = None
        self._served = 0

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.data_ptr(), tuple(x.shape), x.dtype, x._version)
        if key != self._key or self._served >= len(self.sizes):
            self._out, self._key, self._served = self.stacked(x), key, 0
        self._served += 1
        out = self._out
        if self._served == len(self.sizes):
            self._key, self._out = None, None
        return out

    def member(self, i: int, x: torch.Tensor) -> torch.Tensor:
        out = self.shared(x)
        part = out[..., self.offsets[i]:self.offsets[i] + self.sizes[i]]
        return part if self.outers is None else self.outers[i](part)


class SiblingSlice(nn.Module):
    """Member `index` of a `SiblingGroup`: y = the member's output, computed with the group."""

    def __init__(self, group: SiblingGroup, index: int, in_features: int, out_features: int):
        super().__init__()
        self.group = group
        self.index = index
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.member(self.index, x)

    def extra_repr(self) -> str:
        return f"{self.group.kind} sibling {self.index} of {len(self.group.sizes)}"


@torch.no_grad()
def find_siblings(model: nn.Module, example: dict) -> list[list[str]]:
    """Groups (≥ 2) of linear layers that receive the same input tensor in a forward on `example`."""
    seen: dict[str, int] = {}
    alive: list[torch.Tensor] = []   # inputs kept alive so that no two distinct inputs share an id
    handles = []
    layers = {**linear_modules(model),   # dense layers, not the inner factors of structured ones
              **{n: m for n, m in model.named_modules() if isinstance(m, StructuredLinear)}}
    for name, mod in layers.items():
        def record(m, args, name=name):
            if name not in seen:          # returns None: the arguments are unchanged
                alive.append(args[0])
                seen[name] = id(args[0])
        handles.append(mod.register_forward_pre_hook(record))
    try:
        model(**example)
    finally:
        for h in handles:
            h.remove()
    by_input: dict[int, list[str]] = {}
    for name, key in seen.items():
        by_input.setdefault(key, []).append(name)
    return [names for names in by_input.values() if len(names) > 1]


def fuse_siblings(model: nn.Module, example: dict) -> list[tuple[str, list[str]]]:
    """Fuse every group of same-input siblings whose members have the same kind; returns
    [(kind, member names)] of what was fused. Groups of mixed kinds are left alone."""
    fused = []
    for names in find_siblings(model, example):
        layers = [model.get_submodule(n) for n in names]
        kinds = {_kind(m) for m in layers}
        if len(kinds) != 1 or None in kinds:
            continue
        group = SiblingGroup(layers)
        for i, (n, m) in enumerate(zip(names, layers)):
            set_submodule(model, n, SiblingSlice(group, i, m.in_features, m.out_features))
        fused.append((group.kind, names))
    return fused


__all__ = ["fuse_siblings", "find_siblings", "SiblingGroup", "SiblingSlice"]
