"""The contracts every structure implements: `Spec`, `StructuredLinear` and `Method`.

A `Spec` is a frozen dataclass that, together with the layer's parameters, fully determines the function
the layer computes (shapes, ranks, seeds, index tables...). It is what `structlin.json` stores per module;
loading rebuilds each layer from its spec and then loads the weights. Kernels or the device may change how
a layer computes, never what.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import LoadError


@dataclass(frozen=True)
class Spec:
    """Shape of a structured replacement of a dense (out_features × in_features) layer."""

    in_features: int
    out_features: int
    bias: bool

    method: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Spec":
        names = {f.name for f in dataclasses.fields(cls)}
        if set(d) != names:
            raise LoadError(f"{cls.__name__} expects fields {sorted(names)}, the file has {sorted(d)}")
        return cls(**d)


class StructuredLinear(nn.Module):
    """A structured replacement for `nn.Linear`: y = x Ŵᵀ + b for any leading dims of x.

    Subclasses define `spec_class`, build their parameters in `__init__(spec, dtype, device)` (values are
    filled by projection or by loading), and implement `forward`, `to_dense` and `flops`.
    """

    spec_class: ClassVar[type[Spec]] = Spec

    def __init__(self, spec: Spec):
        super().__init__()
        self.spec = spec
        self.in_features = spec.in_features
        self.out_features = spec.out_features

    def to_dense(self) -> torch.Tensor:
        """The (out_features, in_features) matrix this layer applies, in the layer's dtype."""
        raise NotImplementedError

    def num_params(self) -> int:
        """Stored floating-point values that define the function: parameters (bias included) and saved
        floating buffers (e.g. a frozen projection); integer index tables are not counted."""
        return sum(p.numel() for p in self.parameters())

    def flops(self, tokens: int = 1) -> int:
        """Floating-point operations (2 per multiply-add) of a forward over `tokens` rows."""
        raise NotImplementedError

    def inner(self, x: torch.Tensor) -> torch.Tensor:
        """For structures that end in a dense map, y = inner(x) @ outer_weight()ᵀ + b: the inner features
        h (…, d) — the low-rank code, the ESPACE projection, the SS1 sketch. Adapters (LoRA) act on h, so
        they merge exactly into `outer_weight`. Structures without such a split raise."""
        raise NotImplementedError(f"{type(self).__name__} ({self.spec.method}) has no inner/outer split; "
                                  "LoRA-on-structure supports lowrank, espace and ss1 (tied/table)")

    def outer(self, h: torch.Tensor) -> torch.Tensor:
        """y = h outer_weight()ᵀ + bias (see `inner`)."""
        raise NotImplementedError(f"{type(self).__name__} has no inner/outer split")

    def outer_weight(self) -> torch.Tensor:
        """The (out_features × d) weight of the final dense map (a Parameter; see `inner`)."""
        raise NotImplementedError(f"{type(self).__name__} has no inner/outer split")

    def extra_repr(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in self.spec.to_dict().items()
                           if k not in ("in_features", "out_features"))
        return f"in_features={self.in_features}, out_features={self.out_features}, {fields}"


class Method:
    """A structure's entry in the registry.

    name:      the string users pass as `CompressConfig.method`.
    Options:   dataclass of the method's own settings (validated by `config.parse_options`).
    Spec:      the frozen spec dataclass; Layer: the `StructuredLinear` subclass.
    """

    name: ClassVar[str]
    Options: ClassVar[type]
    Spec: ClassVar[type[Spec]]
    Layer: ClassVar[type[StructuredLinear]]

    def stats_needed(self, opts) -> set[str]:
        """Calibration statistics the projection uses: subset of {"gram", "absmean"}."""
        return set()

    def collect(self, model, modules, batches, opts, progress: bool = True, loss_fn=None) -> dict:
        """Calibration statistics for `modules` (name -> Stats). The default collects the input Gram and
        whatever `stats_needed` asks for in one forward pass; a method needing more overrides this."""
        from ..calibrate import collect

        return collect(model, modules, batches, self.stats_needed(opts) | {"gram"}, progress)

    def sequential(self, opts) -> bool:
        """Whether to calibrate block by block on the outputs of already-compressed blocks."""
        return bool(getattr(opts, "sequential", False))

    def candidates(self, in_features: int, out_features: int, bias: bool, opts) -> list[Spec]:
        """Specs this method can build for a layer, in increasing size, each smaller than dense."""
        raise NotImplementedError

    def rank_ladder(self, make_spec, in_features: int, out_features: int, bias: bool) -> list[Spec]:
        """`make_spec(rank)` for rank = q, 2q, … (q the tile quantum) while smaller than the dense layer."""
        from ..budget import dense_params, tile_quantum

        q, out = tile_quantum(in_features, out_features), []
        rank = q
        while rank < min(in_features, out_features):
            spec = make_spec(rank)
            if self.spec_params(spec) >= dense_params(in_features, out_features, bias):
                break
            out.append(spec)
            rank += q
        return out

    def error_curve(self, weight: torch.Tensor, stats, opts, specs: list[Spec]) -> list[float] | None:
        """Relative error of the projection at each of `specs` (increasing size), from statistics alone;
        None if the method cannot predict it (then only uniform allocation is available)."""
        return None

    def spec_params(self, spec: Spec) -> int:
        """Parameters a layer of this spec stores (without building it)."""
        raise NotImplementedError

    def spec_flops(self, spec: Spec, tokens: int = 1) -> int:
        raise NotImplementedError

    def project(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: Spec, stats, opts,
                generator: torch.Generator) -> StructuredLinear:
        """Fit a layer of `spec` to the dense (out, in) `weight` (float64 on entry), using `stats`."""
        raise NotImplementedError

    def training_hooks(self, model, layers: dict, options: dict) -> list:
        """`structlin.heal.hooks.TrainingHook`s this structure needs during training (pruning, budget
        projection, structure optimizer groups) for its `layers` (name -> layer) in `model`."""
        return []

    def build(self, spec: Spec, dtype=None, device=None) -> StructuredLinear:
        """An unfilled layer of `spec` (used when loading)."""
        return self.Layer(spec, dtype=dtype, device=device)
