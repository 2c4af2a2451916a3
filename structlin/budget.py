"""Exact parameter and FLOP accounting, and the split of a keep budget over the targeted layers.

`keep` is the fraction of the targeted linear parameters (weights and biases) that remains. Sizes (ranks,
widths, kept rows) come in multiples of a tile quantum: 64, or 8 for layers narrower than 512. The budget is
charged after rounding: the plan never spends more than keep × (targeted params) unless a layer has no
structured form at all (then it stays dense and the report says so).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import StructlinError, TargetError


def tile_quantum(in_features: int, out_features: int) -> int:
    """Multiple that ranks / widths / kept rows are rounded to (tensor-core friendly)."""
    return 64 if min(in_features, out_features) >= 512 else 8


def dense_params(in_features: int, out_features: int, bias: bool) -> int:
    return in_features * out_features + out_features * bool(bias)


def dense_flops(in_features: int, out_features: int, tokens: int = 1) -> int:
    return 2 * tokens * in_features * out_features


@dataclass
class Plan:
    """Per-layer spec (None = stays dense) and what the budget was and what it bought."""

    specs: dict = field(default_factory=dict)
    reasons: dict = field(default_factory=dict)  # name -> why it stays dense
    budget: int = 0        # keep × targeted params
    used: int = 0          # params of the plan after rounding
    targeted: int = 0      # dense params of the targeted layers


def _ladders(shapes, method, opts, plan: Plan) -> tuple[dict, dict]:
    """Per layer, its size ladder (candidate specs, then None = stay dense) and the params of each rung;
    also counts the targeted params into `plan` and notes layers with no structured form."""
    ladders, cost = {}, {}
    for name, (k, n, b) in shapes.items():
        try:
            cands = list(method.candidates(k, n, b, opts))
        except StructlinError as e:
            raise TargetError(f"module '{name}' ({n}×{k}): {e}") from None
        ladders[name] = cands + [None]
        cost[name] = [method.spec_params(s) for s in cands] + [dense_params(k, n, b)]
        plan.targeted += cost[name][-1]
        if not cands:
            plan.reasons[name] = "no structured form is smaller than dense"
    return ladders, cost


def allocate_uniform(shapes: dict[str, tuple[int, int, bool]], method, opts, keep: float) -> Plan:
    """Give every layer the same share `keep` of its own params, then fill the remaining budget.

    Each layer starts at the largest size not above its share (or the smallest size there is). Then, while
    budget remains, the layer furthest below its share (relative to its size) moves up one size step; the
    last step of every ladder is "stay dense". The result never exceeds keep × targeted params, except
    where a layer's smallest structured form already exceeds its share.
    """
    plan = Plan()
    ladders, cost = _ladders(shapes, method, opts, plan)
    share = {name: keep * cost[name][-1] for name in shapes}
    pos = {}
    for name in shapes:
        fits = [i for i, c in enumerate(cost[name]) if c <= share[name] + 1e-9]
        pos[name] = fits[-1] if fits else 0
    plan.budget = int(keep * plan.targeted + 1e-9)
    used = sum(cost[n][pos[n]] for n in shapes)
    while True:
        best, best_gap = None, None
        for name in shapes:
            i = pos[name]
            if i + 1 >= len(cost[name]) or used - cost[name][i] + cost[name][i + 1] > plan.budget:
                continue
            gap = (share[name] - cost[name][i]) / cost[name][-1]
            if best is None or gap > best_gap:
                best, best_gap = name, gap
        if best is None:
            break
        used += cost[best][pos[best] + 1] - cost[best][pos[best]]
        pos[best] += 1
    for name in shapes:
        plan.specs[name] = ladders[name][pos[name]]
        if plan.specs[name] is None and name not in plan.reasons:
            plan.reasons[name] = "budget leaves it dense"
    plan.used = used
    return plan


def allocate_spectral(shapes: dict[str, tuple[int, int, bool]], method, opts, keep: float,
                      curves: dict[str, list[float]], floor: float = 0.0) -> Plan:
    """Spend the budget where it removes the most calibration error per parameter.

    curves[name][i] is the layer's relative error (the method's objective, e.g. ‖(W − Ŵ)X‖²/‖WX‖² for
    whitened low-rank) at its i-th candidate size; staying dense has error 0. Every layer starts at its
    smallest size holding at least `floor` of its dense params; then, greedily, the size step with the
    largest error reduction per added parameter is taken while it fits in keep × targeted params. With
    error curves convex in size (singular-value tails are), the greedy choice is optimal at step
    granularity. Uses no data beyond the statistics already collected.
    """
    import heapq

    plan = Plan()
    ladders, cost = _ladders(shapes, method, opts, plan)
    err, pos = {}, {}
    for name in shapes:
        if len(curves[name]) != len(cost[name]) - 1:
            raise ValueError(f"{name}: {len(curves[name])} errors for {len(cost[name]) - 1} candidate sizes")
        err[name] = list(curves[name]) + [0.0]
        pos[name] = next(i for i, c in enumerate(cost[name]) if c >= floor * cost[name][-1])
    plan.budget = int(keep * plan.targeted + 1e-9)
    used = sum(cost[n][pos[n]] for n in shapes)

    def step(name):
        i = pos[name]
        if i + 1 < len(cost[name]):
            gain = (err[name][i] - err[name][i + 1]) / max(cost[name][i + 1] - cost[name][i], 1)
            heapq.heappush(heap, (-gain, name))

    heap: list = []
    for name in shapes:
        step(name)
    while heap:
        _, name = heapq.heappop(heap)
        i = pos[name]
        extra = cost[name][i + 1] - cost[name][i]
        if used + extra > plan.budget:
            continue  # later steps of this layer cost more still
        used += extra
        pos[name] = i + 1
        step(name)
    for name in shapes:
        plan.specs[name] = ladders[name][pos[name]]
        if plan.specs[name] is None and name not in plan.reasons:
            plan.reasons[name] = "allocation keeps it dense"
    plan.used = used
    return plan
