"""GBLR during training: the exact budget projection, the structure optimizer group, σ annealing.

**Budget.** A layer's cost is c(w) = Σ_k s·(n_in,k + n_out,k) over the components whose two rounded
boxes are non-empty, n = round(w·dim/q)·q (q = the layer's rounding quantum in elements: 1, or the export
tile for snap-aware training). After every optimizer step
the widths are projected onto {cost ≤ B} by the soft-threshold

    w ← clamp(w − λ·s·dim, 0, 1)

— the Euclidean projection onto the budget half-space intersected with the box [0, 1] (KKT), with λ ≥ 0
found by bisection (64 halvings in float64). With `integer=True` (default) λ is the smallest value whose
*rounded* cost is ≤ B, so what the forward computes is within budget; with `integer=False` the continuous
cost lands on B exactly. Modes:

* ``budget="layer"``: every layer its own B (its spec's budget), one λ per layer.
* ``budget="network"``: one B = Σ spec budgets over the layers, one λ for all of them, so training moves
  compute between layers; a layer whose cost would fall below ``floor``·(its own budget) gets its own
  λ_l < λ that holds it at the floor (the KKT multiplier of the floor constraint).

Locations are wrapped to [0, 1) after each step (boxes are cyclic).

**Optimizer.** Widths and locations get their own AdamW groups: betas (0, 0.999) (no momentum, as in the
reference), weight decay 0, own learning rates (`structure_lr`, `location_lr`).

Use it through `structlin.heal.hooks_for(model, {"gblr": {...}})` (the HF Trainer callback and `heal` call
the hooks), or with the plain loop `train_plain` below.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from .hooks import TrainingHook, hooks_for, run_after_backward, run_after_optimizer_step

ITERS = 64


def _flatten(layers):
    """Per width: value, rank s, side length, quantum, layer index (float64/long tensors on the CPU)."""
    w, s, dim, q, idx, partner = [], [], [], [], [], []
    off = 0
    for i, layer in enumerate(layers):
        K, N = layer.dims()
        C = layer.spec.components
        w.append(layer.widths.detach().double().cpu().reshape(-1))
        s.append(torch.full((2 * C,), float(layer.spec.rank), dtype=torch.float64))
        dim.append(torch.tensor([float(K)] * C + [float(N)] * C, dtype=torch.float64))
        q.append(torch.full((2 * C,), float(layer.quantum), dtype=torch.float64))
        idx.append(torch.full((2 * C,), i, dtype=torch.long))
        partner.append(off + (torch.arange(2 * C) + C) % (2 * C))
        off += 2 * C
    return torch.cat(w), torch.cat(s), torch.cat(dim), torch.cat(q), torch.cat(idx), torch.cat(partner)


class Problem:
    """The projection problem on flat width vectors; `cost(lam)` is per layer, lam per layer (L,)."""

    def __init__(self, w, s, dim, q, idx, partner, L, integer=True):
        self.w, self.s, self.dim, self.q, self.idx, self.partner, self.L = w, s, dim, q, idx, partner, L
        self.c = s * dim
        self.integer = integer

    def widths(self, lam_layer: torch.Tensor) -> torch.Tensor:
        return (self.w - lam_layer[self.idx] * self.c).clamp(0.0, 1.0)

    def elems(self, v: torch.Tensor) -> torch.Tensor:
        if self.integer:
            return torch.minimum(torch.round(v.clamp(0, 1) * (self.dim / self.q)) * self.q, self.dim)
        return v.clamp(0, 1) * self.dim

    def cost_of(self, v: torch.Tensor) -> torch.Tensor:
        """Per layer. Integer mode charges what the forward runs: components with both rounded boxes
        non-empty (a component with one empty side computes nothing and is dropped at export)."""
        e = self.elems(v)
        if self.integer:
            e = e * ((e > 0) & (e[self.partner] > 0))
        return torch.zeros(self.L, dtype=torch.float64).index_add_(0, self.idx, self.s * e)

    def cost(self, lam_layer: torch.Tensor) -> torch.Tensor:
        return self.cost_of(self.widths(lam_layer))

    def bounds(self) -> tuple[float, float]:
        """λ at which every width is 1 (lo) and every width is 0 (hi)."""
        lo = float(((self.w - 1.0) / self.c).min()) - 1e-12
        hi = float((self.w / self.c).max()) + 1e-12
        return min(lo, 0.0), max(hi, 0.0)

    def per_layer(self, target: torch.Tensor, at_least: bool) -> torch.Tensor:
        """Per layer: the smallest λ ≥ lo with cost ≤ target (at_least=False), or the largest λ with
        cost ≥ target (at_least=True), by vectorized bisection."""
        lo_b, hi_b = self.bounds()
        lo = torch.full((self.L,), lo_b, dtype=torch.float64)
        hi = torch.full((self.L,), hi_b, dtype=torch.float64)
        for _ in range(ITERS):
            mid = 0.5 * (lo + hi)
            c = self.cost(mid)
            if at_least:
                ok = c >= target
                lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
            else:
                ok = c <= target
                hi, lo = torch.where(ok, mid, hi), torch.where(ok, lo, mid)
        return lo if at_least else hi


def project_widths(problem: Problem, budgets: torch.Tensor, mode: str = "layer",
                   floors: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(new flat widths, λ per layer). `budgets` (L,) per layer ("layer") or a 1-element total ("network")."""
    L = problem.L
    zero = torch.zeros(L, dtype=torch.float64)
    if mode == "layer":
        over = problem.cost(zero) > budgets
        lam = torch.where(over, problem.per_layer(budgets, at_least=False).clamp_min(0.0), zero)
        return problem.widths(lam), lam
    if mode != "network":
        raise ConfigError(f"gblr budget mode must be 'layer' or 'network', got {mode!r}")
    total = float(budgets.sum())
    if floors is not None and float(floors.sum()) > total + 1e-9:
        raise ConfigError(f"gblr network budget {total:.0f} is smaller than the sum of the per-layer floors "
                          f"{float(floors.sum()):.0f}; lower the floor")
    lam_floor = (problem.per_layer(floors, at_least=True) if floors is not None
                 else torch.full((L,), math.inf, dtype=torch.float64))

    def total_at(lam: float) -> float:
        return float(problem.cost(torch.clamp(lam_floor, max=lam)).sum())

    if total_at(0.0) <= total:
        lam = torch.clamp(lam_floor, max=0.0)
        return problem.widths(lam), lam
    lo, hi = 0.0, problem.bounds()[1]
    if total_at(hi) > total:
        raise ConfigError(f"gblr network budget {total:.0f} cannot be met: the floors alone cost "
                          f"{total_at(hi):.0f}; lower the floor")
    for _ in range(ITERS):
        mid = 0.5 * (lo + hi)
        if total_at(mid) <= total:
            hi = mid
        else:
            lo = mid
    lam = torch.clamp(lam_floor, max=hi)
    return problem.widths(lam), lam


@torch.no_grad()
def project_layers(layers: dict, budget: str = "layer", floor: float = 0.25, integer: bool = True,
                   budgets: dict | None = None) -> dict[str, int]:
    """Project the widths of training-form GBLR `layers` (name -> layer) onto the budget in place and wrap
    their locations. `budgets` overrides the per-layer budgets (default: each spec's). Returns each
    layer's cost after projection (multiply-adds per token, as the forward rounds)."""
    names = list(layers)
    mods = [layers[n] for n in names]
    if not mods:
        return {}
    prob = Problem(*_flatten(mods), len(mods), integer)
    b = torch.tensor([float((budgets or {}).get(n, m.spec.budget)) for n, m in zip(names, mods)],
                     dtype=torch.float64)
    floors = floor * b if budget == "network" and floor > 0 else None
    new, lam = project_widths(prob, b, budget, floors)
    # Stored in float32: a width the bisection left just under a rounding boundary may round up after the
    # cast; nudge λ up (per offending layer) until the float32 widths are within budget too.
    limit = b if budget == "layer" else None
    for attempt in range(40):
        new32 = new.float().double()
        costs = prob.cost_of(new32)
        if budget == "layer":
            bad = costs > limit + 1e-6
        else:
            bad = torch.zeros_like(costs, dtype=torch.bool) if costs.sum() <= b.sum() + 1e-6 else lam > 0
        if not bool(bad.any()):
            break
        step = (1e-9 * 2 ** attempt) / prob.c.min()
        lam = torch.where(bad, lam + step, lam)
        new = prob.widths(lam)
    off = 0
    for m in mods:
        C = m.spec.components
        m.widths.copy_(new[off:off + 2 * C].reshape(2, C).to(m.widths))
        m.locations.sub_(torch.floor(m.locations))
        off += 2 * C
    return {n: m.cost() for n, m in zip(names, mods)}


class GBLRHook(TrainingHook):
    """Budget projection after every optimizer step, the structure optimizer groups and σ annealing.

    structure_lr / location_lr: AdamW lr of widths / locations (betas (0, 0.999), no weight decay);
    budget "layer" | "network", floor: per-layer floor as a fraction of each layer's own budget (network);
    integer: charge the rounded cost (default) or the continuous one; train_structure=False freezes
    widths and locations (factors only). σ: linear from sigma_init to sigma_final between steps
    anneal_start and anneal_end (0 = no Gaussian, i.e. σ = ∞). snap_tile / snap_at: from step snap_at on,
    widths and locations round to multiples of snap_tile elements (snap-aware training before export)."""

    OPTIONS = ("structure_lr", "location_lr", "budget", "floor", "integer", "train_structure", "sigma_init",
               "sigma_final", "anneal_start", "anneal_end", "snap_tile", "snap_at")

    def __init__(self, layers: dict, structure_lr: float = 1e-3, location_lr: float | None = None,
                 budget: str = "layer", floor: float = 0.25, integer: bool = True, train_structure: bool = True,
                 sigma_init: float = 0.0, sigma_final: float = 0.0, anneal_start: int = 0, anneal_end: int = 0,
                 snap_tile: int = 0, snap_at: int | None = None):
        if budget not in ("layer", "network"):
            raise ConfigError(f"gblr hook option budget must be 'layer' or 'network', got {budget!r}")
        if not 0 <= floor <= 1:
            raise ConfigError(f"gblr hook option floor must be in [0, 1] (a fraction of each layer's budget), "
                              f"got {floor!r}")
        for name, v in (("structure_lr", structure_lr), ("location_lr", location_lr), ("sigma_init", sigma_init),
                        ("sigma_final", sigma_final)):
            if v is not None and (not isinstance(v, (int, float)) or v < 0):
                raise ConfigError(f"gblr hook option {name} must be a number >= 0, got {v!r}")
        if anneal_end < anneal_start:
            raise ConfigError(f"gblr hook: anneal_end {anneal_end} is before anneal_start {anneal_start}")
        if snap_at is not None and snap_tile < 1:
            raise ConfigError("gblr hook: snap_at needs snap_tile >= 1 (the export tile)")
        self.layers = dict(layers)
        self.structure_lr = float(structure_lr)
        self.location_lr = float(structure_lr if location_lr is None else location_lr)
        self.budget, self.floor, self.integer = budget, float(floor), bool(integer)
        self.train_structure = bool(train_structure)
        self.sigma_init, self.sigma_final = float(sigma_init), float(sigma_final)
        self.anneal_start, self.anneal_end = int(anneal_start), int(anneal_end)
        self.snap_tile, self.snap_at = int(snap_tile), snap_at
        self.budgets = {n: m.spec.budget for n, m in self.layers.items()}
        self.last_costs: dict[str, int] = {}
        self.sigma_at(0)

    def param_groups(self, model: nn.Module) -> list[dict]:
        if not self.train_structure or not self.layers:
            return []
        widths = [m.widths for m in self.layers.values()]
        locs = [m.locations for m in self.layers.values()]
        return [{"params": widths, "lr": self.structure_lr, "betas": (0.0, 0.999), "weight_decay": 0.0},
                {"params": locs, "lr": self.location_lr, "betas": (0.0, 0.999), "weight_decay": 0.0}]

    def frozen(self, model: nn.Module) -> set[str]:
        if self.train_structure:
            return set()
        return {f"{n}.{p}" for n in self.layers for p in ("widths", "locations")}

    def sigma_at(self, step: int) -> None:
        if self.sigma_init <= 0 and self.sigma_final <= 0:
            return
        a, b = self.sigma_init or math.inf, self.sigma_final or math.inf
        if step <= self.anneal_start:
            sig = a
        elif step >= self.anneal_end:
            sig = b
        else:
            t = (step - self.anneal_start) / max(1, self.anneal_end - self.anneal_start)
            sig = a + t * (b - a) if math.isfinite(a) and math.isfinite(b) else (b if t >= 1 else a)
        for m in self.layers.values():
            m.sigma.fill_(sig)

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        if self.snap_at is not None and step + 1 >= self.snap_at:
            for m in self.layers.values():
                m.quantum = self.snap_tile
        self.last_costs = project_layers(self.layers, self.budget, self.floor, self.integer, self.budgets)
        self.sigma_at(step + 1)

    def state_dict(self):
        return {"quantum": {n: m.quantum for n, m in self.layers.items()}}

    def load_state_dict(self, state):
        for n, q in state.get("quantum", {}).items():
            if n in self.layers:
                self.layers[n].quantum = int(q)


def make_hooks(model: nn.Module, **options) -> list[TrainingHook]:
    """The GBLR hook for every training-form GBLR layer of `model` (options: see `GBLRHook`)."""
    return hooks_for(model, {"gblr": options})


def train_plain(model: nn.Module, batches, *, steps: int, lr: float = 1e-4, loss_fn=None,
                hook_options: dict | None = None, grad_accum: int = 1, train: str = "structured",
                clip: float = 1.0, progress: bool = False) -> list[float]:
    """A plain training loop with the structures' hooks: AdamW (`make_optimizer`) with the GBLR groups,
    projection after every step. `batches`: a list of model-kwarg dicts (or input_ids tensors) cycled in
    order; `loss_fn(model, batch) -> loss` (default: the model's own LM loss with labels = input_ids).
    Returns the loss of every optimizer step."""
    from .optim import make_optimizer

    if steps < 0 or grad_accum < 1:
        raise ConfigError(f"train_plain: steps must be >= 0 and grad_accum >= 1, got {steps}, {grad_accum}")
    hooks = hooks_for(model, {"gblr": dict(hook_options or {})})
    opt = make_optimizer(model, hooks, lr=lr, train=train)
    params = [p for g in opt.param_groups for p in g["params"]]
    batches = list(batches)
    if not batches:
        raise ConfigError("train_plain: no training batches")

    def default_loss(m, b):
        b = {"input_ids": b} if torch.is_tensor(b) else dict(b)
        return m(**b, labels=b["input_ids"]).loss

    loss_fn = loss_fn or default_loss
    model.train()
    losses = []
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="train (gblr hooks)")
    i = 0
    for step in it:
        total = 0.0
        for _ in range(grad_accum):
            loss = loss_fn(model, batches[i % len(batches)]) / grad_accum
            loss.backward()
            total += float(loss)
            i += 1
        run_after_backward(hooks, model, step)
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        run_after_optimizer_step(hooks, model, step)
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    model.eval()
    return losses
