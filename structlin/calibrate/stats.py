"""Streaming calibration statistics of a layer's input, accumulated in float64.

For inputs x ∈ R^K over T (non-padding) tokens: gram = Σ x xᵀ, abs_sum = Σ |x|, tokens = T. Means are
token-weighted over all batches (a batch of 3 tokens counts 3×, not 1×). Layers that read the very same
input tensor (q/k/v, gate/up) share one `Stats`, listed in `modules`.
"""
from __future__ import annotations

import torch

from ..errors import CalibrationError


class Stats:
    """Input statistics of one group of modules reading the same activations."""

    def __init__(self, name: str, in_features: int, needs: set[str]):
        self.name = name                 # first module that read this input
        self.modules = [name]            # every module reading it
        self.in_features = in_features
        self.needs = set(needs)
        self.tokens = 0
        self.gram: torch.Tensor | None = None      # (K, K) float64, Σ x xᵀ
        self.abs_sum: torch.Tensor | None = None   # (K,) float64, Σ |x|

    def update(self, x: torch.Tensor) -> None:
        """Add rows of x (T × K) to the statistics."""
        if x.shape[-1] != self.in_features:
            raise CalibrationError(f"{self.name}: input has {x.shape[-1]} features, expected {self.in_features}")
        if x.shape[0] == 0:
            return
        if not torch.isfinite(x).all():
            raise CalibrationError(f"non-finite (NaN or inf) activations reach module '{self.name}' during "
                                   f"calibration; check the calibration data and the model's dtype")
        if "gram" in self.needs:
            for chunk in x.split(self.CHUNK):
                g = self._gram(chunk)
                if self.gram is None:
                    self.gram = g
                else:
                    self.gram.add_(g)
        if "absmean" in self.needs:
            a = x.to(torch.float64).abs().sum(0)
            self.abs_sum = a if self.abs_sum is None else self.abs_sum.add_(a)
        self.tokens += x.shape[0]

    CHUNK = 2048  # rows per partial Gram

    @staticmethod
    def _gram(x: torch.Tensor) -> torch.Tensor:
        """xᵀx in float64. Half-precision rows (bf16/fp16) have products exact in float32, so their
        partial sums over <= CHUNK rows run in float32 (relative error ~1e-6, far below the inputs' own
        rounding) and are accumulated in float64; float32/float64 rows are multiplied in float64."""
        if x.dtype in (torch.bfloat16, torch.float16):
            x32 = x.to(torch.float32)
            return (x32.T @ x32).to(torch.float64)
        x64 = x.to(torch.float64)
        return x64.T @ x64

    def _check(self):
        if self.tokens == 0:
            raise CalibrationError(f"module '{self.name}' saw no calibration tokens (all padding, or never "
                                   f"called by the model's forward)")

    def gram_mean(self) -> torch.Tensor:
        """E[x xᵀ] (K × K, float64)."""
        self._check()
        if self.gram is None:
            raise CalibrationError(f"{self.name}: the input Gram was not collected")
        return self.gram / self.tokens

    def absmean(self) -> torch.Tensor:
        """E[|x|] per input feature (K, float64)."""
        self._check()
        if self.abs_sum is None:
            raise CalibrationError(f"{self.name}: mean |x| was not collected")
        return self.abs_sum / self.tokens

    def all_reduce(self) -> None:
        """Sum the statistics over a torch.distributed process group, if one is initialised."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        held = [v for v in (self.gram, self.abs_sum) if v is not None]
        device = held[0].device if held else torch.device("cpu")
        tokens = torch.tensor([float(self.tokens)], dtype=torch.float64, device=device)
        for v in held + [tokens]:
            dist.all_reduce(v)
        self.tokens = int(tokens.item())
