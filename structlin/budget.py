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
    methods: dict = field(default_factory=dict)  # name -> method of its spec (mixed allocations), None = dense
    errors: dict = field(default_factory=dict)   # name -> estimated error of the chosen size (curve units)

    @property
    def charged(self) -> float:
        """The exact fraction of the targeted params the plan keeps (after rounding)."""
        return self.used / max(self.targeted, 1)


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


def _fill_uniform(cost: dict, keep: float, budget: int) -> tuple[dict, int]:
    """Rung per unit (a layer or a shared group) for the uniform allocation, and the params used: every unit
    starts at the largest rung within its share keep × dense (or its smallest rung), then, while the budget
    allows, the unit furthest below its share (relative to its dense size) moves up one rung."""
    share = {u: keep * c[-1] for u, c in cost.items()}
    pos = {}
    for u, c in cost.items():
        fits = [i for i, x in enumerate(c) if x <= share[u] + 1e-9]
        pos[u] = fits[-1] if fits else 0
    used = sum(cost[u][pos[u]] for u in cost)
    while True:
        best, best_gap = None, None
        for u, c in cost.items():
            i = pos[u]
            if i + 1 >= len(c) or used - c[i] + c[i + 1] > budget:
                continue
            gap = (share[u] - c[i]) / c[-1]
            if best is None or gap > best_gap:
                best, best_gap = u, gap
        if best is None:
            return pos, used
        used += cost[best][pos[best] + 1] - cost[best][pos[best]]
        pos[best] += 1


def allocate_uniform(shapes: dict[str, tuple[int, int, bool]], method, opts, keep: float,
                     groups: list[list[str]] | None = None) -> Plan:
    """Give every layer the same share `keep` of its own params, then fill the remaining budget.

    Each layer starts at the largest size not above its share (or the smallest size there is). Then, while
    budget remains, the layer furthest below its share (relative to its size) moves up one size step; the
    last step of every ladder is "stay dense". The result never exceeds keep × targeted params, except
    where a layer's smallest structured form already exceeds its share.

    groups: lists of layers that share part of their structure (ESPACE's one P for q/k/v): each group is
    one unit sized by `method.group_candidates({name: shape}, opts)` (a ladder of {name: spec}), charged
    the exact sum of its members' `spec_params`, with the dense params of all members as its share base.
    """
    if groups:
        return _allocate_uniform_units(shapes, method, opts, keep, groups)
    plan = Plan()
    ladders, cost = _ladders(shapes, method, opts, plan)
    plan.budget = int(keep * plan.targeted + 1e-9)
    pos, used = _fill_uniform(cost, keep, plan.budget)
    for name in shapes:
        plan.specs[name] = ladders[name][pos[name]]
        if plan.specs[name] is None and name not in plan.reasons:
            plan.reasons[name] = "budget leaves it dense"
    plan.used = used
    return plan


def _allocate_uniform_units(shapes, method, opts, keep: float, groups: list[list[str]]) -> Plan:
    """`allocate_uniform` over units: each group one unit (its ladder of {name: spec}), every other layer
    its own unit; the same start-at-share and fill rules."""
    plan = Plan()
    grouped = {n for g in groups for n in g}
    units: dict[str, list[str]] = {}
    for g in groups:
        units[g[0]] = list(g)
    for name in shapes:
        if name not in grouped:
            units[name] = [name]
    ladders, cost = {}, {}
    for u, names in units.items():
        if len(names) > 1:
            members = {n: shapes[n] for n in names}
            try:
                rungs = list(method.group_candidates(members, opts))
            except StructlinError as e:
                raise TargetError(f"modules {names}: {e}") from None
        else:
            k, n, b = shapes[u]
            try:
                rungs = [{u: s} for s in method.candidates(k, n, b, opts)]
            except StructlinError as e:
                raise TargetError(f"module '{u}' ({n}×{k}): {e}") from None
        dense = sum(dense_params(*shapes[n]) for n in names)
        ladders[u] = rungs + [None]
        cost[u] = [sum(method.spec_params(s) for s in r.values()) for r in rungs] + [dense]
        plan.targeted += dense
        if not rungs:
            for n in names:
                plan.reasons[n] = "no structured form is smaller than dense"
    plan.budget = int(keep * plan.targeted + 1e-9)
    pos, used = _fill_uniform(cost, keep, plan.budget)
    for u, names in units.items():
        rung = ladders[u][pos[u]]
        for n in names:
            plan.specs[n] = None if rung is None else rung[n]
            if rung is None and n not in plan.reasons:
                plan.reasons[n] = "budget leaves it dense"
    plan.specs = {n: plan.specs[n] for n in shapes}
    plan.used = used
    return plan


def allocate_spectral(shapes: dict[str, tuple[int, int, bool]], method, opts, keep: float,
                      curves: dict[str, list[float]], floor: float = 0.0) -> Plan:
    """Spend the budget where it removes the most calibration error per parameter.

    curves[name][i] is the layer's relative error (the method's objective, e.g. ‖(W − Ŵ)X‖²/‖WX‖² for
    whitened low-rank) at its i-th candidate size; staying dense has error 0. Every layer starts at its
    smallest size holding at least `floor` of its dense params; then greedily along each layer's convex hull
    (`allocate_curves`). Uses no data beyond the statistics already collected.
    """
    choices = {n: choices_for(n, shapes[n], method, opts, curves[n]) for n in shapes}
    return allocate_curves(shapes, choices, keep, floor)


# ------------------------------------------------------------------------- curves, floors and mixed structures

@dataclass(frozen=True)
class Choice:
    """One way to store a layer: `method`'s `spec` (None = stay dense), its params and its estimated error
    (in the units of the allocation's curves; 0 for dense)."""

    method: str
    spec: object
    params: int
    error: float


def choices_for(name: str, shape: tuple[int, int, bool], method, opts, errors: list[float] | None) -> list[Choice]:
    """The candidate sizes of one method for one layer as `Choice`s (errors None -> nan)."""
    k, n, b = shape
    try:
        specs = list(method.candidates(k, n, b, opts))
    except StructlinError as e:
        raise TargetError(f"module '{name}' ({n}×{k}): {e}") from None
    if errors is not None and len(errors) != len(specs):
        raise ValueError(f"{name}: {len(errors)} errors for {len(specs)} candidate sizes of {method.name}")
    return [Choice(method.name, s, method.spec_params(s), float("nan") if errors is None else float(errors[i]))
            for i, s in enumerate(specs)]


def pareto(choices: list[Choice], dense: int) -> list[Choice]:
    """Choices no other choice beats in both params and error, by increasing params, ending with dense
    (error 0). Ties in params keep the lower error; ties in error keep the fewer params."""
    # errors equal to 6 significant digits count as ties, which go to the earlier choice (the first method
    # listed), so equivalent structures (e.g. ESPACE's output projection and whitened low-rank) are stable
    allc = sorted(choices, key=lambda c: (c.params, float(f"{c.error:.6g}"))) + [Choice("dense", None, dense, 0.0)]
    front: list[Choice] = []
    for c in allc:
        if c.params > dense:
            continue
        if front and float(f"{c.error:.6g}") >= float(f"{front[-1].error:.6g}"):
            continue
        if front and c.params == front[-1].params:
            front[-1] = c
            continue
        front.append(c)
    return front


def _hull(front: list[Choice], start: int) -> list[int]:
    """Indices of the lower convex hull of `front` (params, error) from index `start` to the last (dense):
    the path a greedy walks, each step with a smaller error drop per parameter than the one before."""
    hull = [start]
    for i in range(start + 1, len(front)):
        while len(hull) >= 2:
            a, b = front[hull[-2]], front[hull[-1]]
            c = front[i]
            # b lies on or above the segment a-c: drop it
            if (b.error - a.error) * (c.params - a.params) >= (c.error - a.error) * (b.params - a.params):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def _finish(plan: Plan, shapes, fronts, pos, used: int, dense_reason: str) -> Plan:
    """Write the chosen point of every layer's front into `plan`."""
    for name in shapes:
        c = fronts[name][pos[name]]
        plan.specs[name] = c.spec
        plan.methods[name] = None if c.spec is None else c.method
        if c.spec is None and name not in plan.reasons:
            plan.reasons[name] = dense_reason
    plan.used = used
    plan.errors = {n: fronts[n][pos[n]].error for n in shapes}
    return plan


def allocate_curves(shapes: dict[str, tuple[int, int, bool]], choices: dict[str, list[Choice]], keep: float,
                    floor: float = 0.0) -> Plan:
    """Split keep × targeted params over layers to minimise the summed estimated error.

    choices[name]: every candidate (any method) of that layer with its estimated error on one common scale
    (relative output error, Fisher-weighted loss increase, measured loss increase...). Per layer only the
    Pareto front counts. Every layer starts at its cheapest front point holding at least `floor` × its dense
    params (if those starts exceed the budget, at its cheapest point); then (1) greedily, the convex-hull
    step with the largest error drop per added parameter that still fits, and (2) a fill pass moving single
    layers to any larger front point that fits, best error drop per parameter first, until none fits. The
    plan never exceeds int(keep × targeted); what is left over is smaller than every remaining step.
    """
    import heapq

    plan = Plan()
    fronts, pos = {}, {}
    for name, (k, n, b) in shapes.items():
        dense = dense_params(k, n, b)
        plan.targeted += dense
        fronts[name] = pareto(choices.get(name, []), dense)
        if len(fronts[name]) == 1:
            plan.reasons[name] = "no structured form is smaller than dense"
        if any(c.error != c.error for c in fronts[name]):
            raise ValueError(f"{name}: an estimated error is nan")
    plan.budget = int(keep * plan.targeted + 1e-9)
    for name, front in fronts.items():
        need = floor * front[-1].params
        pos[name] = next(i for i, c in enumerate(front) if c.params >= need - 1e-9)
    used = sum(fronts[n][pos[n]].params for n in shapes)
    if used > plan.budget:        # floors do not fit: start everyone at their cheapest form
        pos = {n: 0 for n in shapes}
        used = sum(fronts[n][0].params for n in shapes)

    hulls = {n: _hull(fronts[n], pos[n]) for n in shapes}
    at = {n: 0 for n in shapes}   # position along the hull
    heap: list = []

    def push(name):
        h, i = hulls[name], at[name]
        if i + 1 < len(h):
            a, b = fronts[name][h[i]], fronts[name][h[i + 1]]
            heapq.heappush(heap, (-(a.error - b.error) / max(b.params - a.params, 1), name))

    for name in shapes:
        push(name)
    while heap:
        _, name = heapq.heappop(heap)
        h, i = hulls[name], at[name]
        extra = fronts[name][h[i + 1]].params - fronts[name][h[i]].params
        if used + extra > plan.budget:
            continue
        used += extra
        at[name] = i + 1
        pos[name] = h[i + 1]
        push(name)
    while True:                   # fill: any single move up the front that fits
        best, best_gain = None, 0.0
        for name, front in fronts.items():
            cur = front[pos[name]]
            for j in range(pos[name] + 1, len(front)):
                extra = front[j].params - cur.params
                if used + extra > plan.budget:
                    break
                gain = (cur.error - front[j].error) / max(extra, 1)
                if best is None or gain > best_gain:
                    best, best_gain = (name, j), gain
        if best is None:
            break
        name, j = best
        used += fronts[name][j].params - fronts[name][pos[name]].params
        pos[name] = j
    return _finish(plan, shapes, fronts, pos, used, "allocation keeps it dense")


def allocate_mixed_uniform(shapes: dict[str, tuple[int, int, bool]], choices: dict[str, list[Choice]],
                           keep: float) -> Plan:
    """Uniform sizes, mixed structures: every layer gets the same share `keep` of its own params and takes
    the choice (any method) of lowest estimated error within that share; then leftover budget moves the
    layers furthest below their share up their Pareto front, one point at a time."""
    plan = Plan()
    fronts, pos, share = {}, {}, {}
    for name, (k, n, b) in shapes.items():
        dense = dense_params(k, n, b)
        plan.targeted += dense
        fronts[name] = pareto(choices.get(name, []), dense)
        share[name] = keep * dense
        fits = [i for i, c in enumerate(fronts[name]) if c.params <= share[name] + 1e-9]
        pos[name] = fits[-1] if fits else 0   # the front is sorted by params with falling error
        if len(fronts[name]) == 1:
            plan.reasons[name] = "no structured form is smaller than dense"
    plan.budget = int(keep * plan.targeted + 1e-9)
    used = sum(fronts[n][pos[n]].params for n in shapes)
    # layers that cannot shrink (no structured form) may push the start over budget: step the others down,
    # the one furthest above its share first, until it fits or every layer is at its smallest size
    while used > plan.budget:
        down = [n for n in fronts if pos[n] > 0]
        if not down:
            break
        worst = max(down, key=lambda n: (fronts[n][pos[n]].params - share[n]) / fronts[n][-1].params)
        used -= fronts[worst][pos[worst]].params - fronts[worst][pos[worst] - 1].params
        pos[worst] -= 1
    while True:
        best, best_gap = None, None
        for name, front in fronts.items():
            i = pos[name]
            if i + 1 >= len(front) or used - front[i].params + front[i + 1].params > plan.budget:
                continue
            gap = (share[name] - front[i].params) / front[-1].params
            if best is None or gap > best_gap:
                best, best_gap = name, gap
        if best is None:
            break
        used += fronts[best][pos[best] + 1].params - fronts[best][pos[best]].params
        pos[best] += 1
    return _finish(plan, shapes, fronts, pos, used, "budget leaves it dense")
