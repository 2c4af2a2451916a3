"""Low-rank layers: W ≈ U V, rank k, params k(N + K) (+ bias), two thin GEMMs.

Projections of a pretrained W (N × K), all in float64:

* ``svd``    truncated SVD of W (Frobenius-optimal in weight space).
* ``asvd``   ASVD: scale input columns by s = mean|x|^α, SVD of W diag(s), unscale.
* ``whiten`` SVD-LLM: with the calibration Gram G = E[x xᵀ] = L Lᵀ (damped Cholesky), take the truncated
             SVD of W L and map back with L⁻¹. This minimises ‖(W − Ŵ) X‖_F over rank-k Ŵ: the error
             ‖(W − Ŵ) L‖_F is exactly the square root of the sum of the discarded squared singular values.

The factors are split as U = U_k Σ_k^½ and V = Σ_k^½ V_kᵀ (balanced, so fp16 does not overflow) and
held as two plain `nn.Linear` modules (`down`: K → k, `up`: k → N), which PEFT and quantizers can target.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import choice, option
from ..errors import CalibrationError
from . import register
from .base import Method, Spec, StructuredLinear


@dataclass
class LowRankOptions:
    variant: str = choice("whiten", ("svd", "asvd", "whiten"), "projection of the pretrained weight")
    sequential: bool = option(False, "calibrate block by block on the outputs of compressed blocks")
    alpha: float = option(0.5, "ASVD exponent on mean|x|", low=0.0, high=4.0)
    damp: float = option(1e-6, "whiten: Cholesky damping, as a fraction of the mean Gram diagonal",
                         low=0.0, high=1.0)


@dataclass(frozen=True)
class LowRankSpec(Spec):
    rank: int = 1
    method = "lowrank"


class LowRankLinear(StructuredLinear):
    """y = up(down(x)) with down: K → rank (no bias), up: rank → N (bias if the dense layer had one)."""

    spec_class = LowRankSpec

    def __init__(self, spec: LowRankSpec, dtype=None, device=None):
        super().__init__(spec)
        self.down = nn.Linear(spec.in_features, spec.rank, bias=False, dtype=dtype, device=device)
        self.up = nn.Linear(spec.rank, spec.out_features, bias=spec.bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def to_dense(self) -> torch.Tensor:
        return self.up.weight @ self.down.weight

    def inner(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(x)

    def outer(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(h)

    def outer_weight(self) -> torch.Tensor:
        return self.up.weight

    def flops(self, tokens: int = 1) -> int:
        s = self.spec
        return 2 * tokens * s.rank * (s.in_features + s.out_features)


def damped_cholesky(gram: torch.Tensor, damp: float, where: str = "") -> torch.Tensor:
    """Lower Cholesky factor of gram + λ·mean(diag)·I, raising λ tenfold until it is positive definite."""
    n = gram.shape[0]
    scale = gram.diagonal().mean().clamp_min(torch.finfo(gram.dtype).tiny)
    eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
    lam = damp
    for _ in range(12):
        L, info = torch.linalg.cholesky_ex(gram + lam * scale * eye)
        if int(info) == 0:
            return L
        lam = max(lam * 10, 1e-10)
    raise CalibrationError(f"{where}: the calibration Gram matrix ({n}×{n}) is not positive definite even "
                           f"with damping {lam:g}; collect more calibration tokens")


def transform(weight, variant, stats=None, alpha=0.5, damp=1e-6, where=""):
    """(A, undo): the matrix A whose truncated SVD the variant takes — W, W·diag(s) (asvd) or W·L
    (whiten) — and the map taking a right factor V of A back to a right factor of W."""
    if variant == "svd":
        return weight, lambda v: v
    if stats is None:
        raise CalibrationError(f"{where}: lowrank variant '{variant}' needs calibration data "
                               f"(pass calib=...), or use variant 'svd'")
    if variant == "asvd":
        s = stats.absmean().to(weight).pow(alpha)
        s = s.clamp_min(s.max() * 1e-6 + torch.finfo(s.dtype).tiny)
        return weight * s, lambda v: v / s
    if variant == "whiten":
        L = damped_cholesky(stats.gram_mean().to(weight), damp, where)
        return weight @ L, lambda v: torch.linalg.solve_triangular(L, v, upper=False, left=False)  # v L⁻¹
    raise ValueError(variant)


def _split(U, S, Vh, k):
    r = S[:k].sqrt()
    return U[:, :k] * r, r[:, None] * Vh[:k]


def decompose(weight: torch.Tensor, variant: str, stats=None, alpha: float = 0.5, damp: float = 1e-6,
              where: str = ""):
    """(U, S, Vh, undo): the full SVD of the variant's matrix A (see `transform`) and A's undo map.

    The SVD does not depend on the rank, so when `stats` carries a `factors` dict (set by `compress` only when
    the caller passes a `cache`, as `structlin sweep` does) it is kept there, keyed by the variant, its
    settings and the weight's bytes, and every later keep, error curve or allocation reuses it. Without
    that opt-in nothing is kept (a 7B model's factors would be twice its size in float64)."""
    store = getattr(stats, "factors", None)
    key = None
    if store is not None:
        key = ("lowrank", variant, float(alpha), float(damp), tuple(weight.shape),
               hash(weight.detach().cpu().numpy().tobytes()))
        if key in store:
            return store[key]
    a, undo = transform(weight, variant, stats, alpha, damp, where)
    U, S, Vh = torch.linalg.svd(a, full_matrices=False)
    out = (U, S, Vh, undo)
    if store is not None:
        store[key] = out
    return out


def factorize(weight: torch.Tensor, rank: int, variant: str, stats=None, alpha: float = 0.5,
              damp: float = 1e-6, where: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(U (N×k), V (k×K)) minimising the variant's objective; `weight` is (N × K) float64."""
    U, S, Vh, undo = decompose(weight, variant, stats, alpha, damp, where)
    u, v = _split(U, S, Vh, rank)
    return u, undo(v)


class LowRank(Method):
    name = "lowrank"
    Options = LowRankOptions
    Spec = LowRankSpec
    Layer = LowRankLinear

    def stats_needed(self, opts) -> set[str]:
        return {"svd": set(), "asvd": {"absmean"}, "whiten": {"gram"}}[opts.variant]

    def candidates(self, in_features, out_features, bias, opts):
        return self.rank_ladder(lambda k: LowRankSpec(in_features, out_features, bias, k),
                                in_features, out_features, bias)

    def error_curve(self, weight, stats, opts, specs):
        """Σ_{i>k} σ_i² / Σ σ_i² of the variant's matrix: for whiten exactly the relative calibration
        output error ‖(W − Ŵ)X‖²/‖WX‖² at rank k."""
        _, S, _, _ = decompose(weight, opts.variant, stats, opts.alpha, opts.damp, getattr(stats, "name", ""))
        sv2 = S.pow(2)
        total = sv2.sum().clamp_min(torch.finfo(sv2.dtype).tiny)
        return [(sv2[s.rank:].sum() / total).item() for s in specs]

    def spec_params(self, spec):
        return spec.rank * (spec.in_features + spec.out_features) + spec.out_features * spec.bias

    def spec_flops(self, spec, tokens=1):
        return 2 * tokens * spec.rank * (spec.in_features + spec.out_features)

    def project(self, weight, bias, spec, stats, opts, generator):
        u, v = factorize(weight, spec.rank, opts.variant, stats, opts.alpha, opts.damp,
                         where=getattr(stats, "name", ""))
        layer = LowRankLinear(spec, dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            layer.down.weight.copy_(v)
            layer.up.weight.copy_(u)
            if bias is not None:
                layer.up.bias.copy_(bias)
        return layer


register(LowRank())
