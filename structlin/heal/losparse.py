"""The LoSparse pruner: PLATON importance, row aggregation, global (or per-layer) ranking and the cubic
schedule, as a `TrainingHook` (see `structlin.heal.hooks`).

Per entry θ of S (the kept rows of every LoSparse layer) and optimizer step t (after `optimizer.step()`,
gradients still present — the reference's order):

    s_t   = |θ · ∂L/∂θ|                                (PLATON sensitivity; "magnitude": |θ| at masking)
    at t % ΔT == 0 (t > 0), the window that ends folds in:
          s̄   = mean of s over the window's steps
          Ī  ← β₁ Ī + (1 − β₁) s̄
          Ū  ← β₂ Ū + (1 − β₂) |s̄ − Ī|                  (only for 0 < β₂ < 1; β₂ = 1 turns it off)
    score = Ī · Ū  (0 < β₂ < 1)   or   Ī  (β₂ = 1)     (before the first fold: the current window's mean)
    row score = mean / sum / max of the row's entry scores.

With β₂ = 1 and mean/sum aggregation everything above is linear, so only per-row sums are kept (k floats
per layer instead of three k × K tensors); uncertainty or max need per-entry state.

The cubic schedule of the kept fraction ρ of S's entries (T = total_steps, t_i, t_f in steps, r_f final,
t = step + 1 = optimizer steps completed, so the last call of a run, t = T, masks at r_f):

    t ≤ t_i                 ρ = ρ₀ (1),   no masking
    t_i < t ≤ T − t_f       ρ = r_f + (ρ₀ − r_f)(1 − (t − t_i)/(T − t_i − t_f))³,  mask when t % ΔT == 0
    t > T − t_f             ρ = r_f,      mask every step

Ranking ``"global"`` (the paper): rows of all layers compete for ρ·(entries of every full S), the budget
counted in entries (a row of a wider layer costs more). ``"layer"``: every layer keeps its own fraction.
r_f comes from the layers' specs (`target`, set by `compress` from `keep`) unless ``final_keep`` is given.
Kept-row counts are multiples of the layer's tile quantum (64, or 8 below 512 features).

Differences from the released pruner, on purpose: a pruned row never comes back (the kept fraction only
falls, so the reference's regrowth between masking steps changed little) — pruned rows are masked in the
forward (no gradient) and re-zeroed after every step, and once an optimizer is attached
(`attach_optimizer`, done by `finetune_classifier`, `StructlinCallback` and compat `Pruner(optimizer=)`)
their storage and optimizer state are dropped at once (row-gated S). Without one, `finalize(model)` drops
them at the end.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ..budget import tile_quantum
from ..errors import ConfigError
from .hooks import TrainingHook

SCORES = ("platon", "magnitude")
AGGREGATES = ("mean", "sum", "max")
RANKINGS = ("global", "layer")


def schedule_progress(step: int, total_steps: int, t_i: int, t_f: int) -> float:
    """The cubic factor c(t)³ ∈ [0, 1]: 1 up to t_i, (1 − (t − t_i)/(T − t_i − t_f))³, 0 after T − t_f."""
    if step <= t_i:
        return 1.0
    if step > total_steps - t_f:
        return 0.0
    return (1.0 - (step - t_i) / (total_steps - t_i - t_f)) ** 3


def kept_fraction(step: int, total_steps: int, t_i: int, t_f: int, final: float, delta_t: int,
                  initial: float = 1.0) -> tuple[float, bool]:
    """(ρ(t), whether to mask at step t) of the cubic schedule (module docstring)."""
    if step <= t_i:
        return initial, False
    if step > total_steps - t_f:
        return final, True
    return final + (initial - final) * schedule_progress(step, total_steps, t_i, t_f), step % delta_t == 0


def _snap(n: float, q: int) -> int:
    return int(math.floor(n / q + 1e-9)) * q


class _LayerState:
    def __init__(self, name, layer, entrywise: bool, final_keep):
        s = layer.spec
        self.name, self.layer = name, layer
        self.full = s.lines            # rows of the full S (N, or K for columns)
        self.len = s.line_len          # entries per row
        self.q = tile_quantum(s.in_features, s.out_features)
        if final_keep is None:
            self.target = s.target
        else:
            self.target = min(_snap(final_keep * self.full + 0.5 * self.q, self.q), self.full)
        self.entrywise = entrywise
        self.reset()

    def reset(self):
        self.win, self.ema_i, self.ema_u = None, None, None
        self.count = 0       # steps in the current window
        self.folds = 0       # windows folded into the EMA

    def slice(self, pos: torch.Tensor):
        for a in ("win", "ema_i", "ema_u"):
            t = getattr(self, a)
            if t is not None:
                setattr(self, a, t.index_select(0, pos.to(t.device)))


class LoSparsePruner(TrainingHook):
    """PLATON / magnitude row pruning of every LoSparse layer in `layers` (name -> LoSparseLinear).

    total_steps: T, optimizer steps of the whole run. initial_warmup (t_i) / final_warmup (t_f): steps
    without pruning at the start / at the final fraction at the end. delta_t: ΔT. final_keep: r_f
    (None: each layer's spec target). initial_keep: ρ₀. beta1, beta2: EMA coefficients (beta2 = 1: no
    uncertainty). score: "platon" | "magnitude". aggregate: "mean" | "sum" | "max" over a row. ranking:
    "global" | "layer". compact: drop pruned rows' storage as soon as an optimizer is attached.

    Use after `optimizer.step()`: `pruner.step(model, step)` (step counts optimizer steps from 0), or let
    `finetune_classifier` / `StructlinCallback` call it.
    """

    def __init__(self, layers: dict, total_steps: int, initial_warmup: int = 0, final_warmup: int = 0,
                 delta_t: int = 10, final_keep: float | None = None, initial_keep: float = 1.0,
                 beta1: float = 0.85, beta2: float = 1.0, score: str = "platon", aggregate: str = "mean",
                 ranking: str = "global", compact: bool = True, optimizer=None):
        from ..methods.losparse import LoSparseLinear

        def need(cond, msg):
            if not cond:
                raise ConfigError(f"losparse pruner: {msg}")

        for k, v in (("total_steps", total_steps), ("initial_warmup", initial_warmup),
                     ("final_warmup", final_warmup), ("delta_t", delta_t)):
            need(isinstance(v, int) and not isinstance(v, bool), f"{k} must be an integer, got {v!r}")
        need(total_steps >= 1, f"total_steps must be >= 1, got {total_steps}")
        need(initial_warmup >= 0 and final_warmup >= 0,
             f"initial_warmup and final_warmup must be >= 0, got {initial_warmup}, {final_warmup}")
        need(initial_warmup + final_warmup < total_steps,
             f"initial_warmup + final_warmup ({initial_warmup} + {final_warmup}) must be below total_steps "
             f"({total_steps}), or the schedule has no pruning phase")
        need(delta_t >= 1, f"delta_t must be >= 1, got {delta_t}")
        need(final_keep is None or (isinstance(final_keep, (int, float)) and 0 <= final_keep <= 1),
             f"final_keep (r_f) must be a fraction in [0, 1] or None (from the specs), got {final_keep!r}")
        need(0 < initial_keep <= 1, f"initial_keep must lie in (0, 1], got {initial_keep!r}")
        need(0 <= beta1 < 1, f"beta1 must lie in [0, 1), got {beta1!r}")
        need(0 < beta2 <= 1, f"beta2 must lie in (0, 1] (1 = no uncertainty term), got {beta2!r}")
        need(score in SCORES, f"score must be one of {list(SCORES)}, got {score!r}")
        need(aggregate in AGGREGATES, f"aggregate must be one of {list(AGGREGATES)}, got {aggregate!r}")
        need(ranking in RANKINGS, f"ranking must be one of {list(RANKINGS)}, got {ranking!r}")
        bad = [n for n, m in layers.items() if not isinstance(m, LoSparseLinear)]
        need(not bad, f"not LoSparse layers: {bad[:4]}")
        need(len(layers) > 0, "no LoSparse layer to prune")
        self.total_steps, self.t_i, self.t_f, self.delta_t = total_steps, initial_warmup, final_warmup, delta_t
        self.final_keep, self.initial_keep = final_keep, float(initial_keep)
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.score, self.aggregate, self.ranking, self.compact = score, aggregate, ranking, bool(compact)
        self.uncertainty = score == "platon" and beta2 < 1
        entrywise = self.uncertainty or aggregate == "max"
        self.states = {n: _LayerState(n, m, entrywise, final_keep) for n, m in layers.items()}
        self.optimizer = optimizer
        self.last = None  # (step, ρ, score cut) of the last masking

    # ------------------------------------------------------------------ protocol
    def attach_optimizer(self, optimizer) -> None:
        """The optimizer training the layers: pruned rows then leave its state too, at once."""
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # unwrap accelerate's wrapper

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        self.step(model, step)

    @torch.no_grad()
    def step(self, model: nn.Module | None, step: int, optimizer=None):
        """Update the scores with this step's gradients, then mask (and drop) rows if the schedule says so.
        Returns (ρ(t), the global score cut or None)."""
        if optimizer is not None:
            self.attach_optimizer(optimizer)
        if self.score == "platon":
            for st in self.states.values():
                self._accumulate(st, step)
        t = step + 1  # completed optimizer steps: the last call (t = T) is at r_f
        rho, do_mask = kept_fraction(t, self.total_steps, self.t_i, self.t_f, self.final_rho(),
                                     self.delta_t, self.initial_keep)
        do_mask = do_mask or (t >= self.total_steps and t > self.t_i)
        cut = None
        if do_mask:
            cut = self.prune_to(schedule_progress(t, self.total_steps, self.t_i, self.t_f))
            self.last = (step, rho, cut)
        for st in self.states.values():
            st.layer.zero_pruned()
        return rho, cut

    def finalize(self, model: nn.Module | None = None) -> None:
        """Drop every pruned row's storage (call before export when no optimizer was attached)."""
        for st in self.states.values():
            pos = st.layer.compact(self.optimizer)
            st.slice(pos)

    # ------------------------------------------------------------------ scores
    def _entry_scores(self, st) -> torch.Tensor | None:
        layer = st.layer
        g = layer.sparse_param.grad
        if g is None:
            return None
        theta = layer.sparse_lines().float()
        return (theta * layer.sparse_lines(g).float()).abs()

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Per-row sum (or mean) of a (k × len) tensor, for the linear (per-row state) path."""
        return t.sum(1) if self.aggregate == "sum" else t.mean(1)

    def _accumulate(self, st, step: int) -> None:
        s = self._entry_scores(st)
        if s is None:
            return
        if not st.entrywise:
            s = self._reduce(s)
        if step % self.delta_t == 0 and st.count > 0:
            mean = st.win / st.count
            st.ema_i = (1 - self.beta1) * mean if st.ema_i is None else self.beta1 * st.ema_i + (1 - self.beta1) * mean
            if self.uncertainty:
                dev = (mean - st.ema_i).abs()
                st.ema_u = (1 - self.beta2) * dev if st.ema_u is None else self.beta2 * st.ema_u + (1 - self.beta2) * dev
            st.folds += 1
            st.win, st.count = None, 0
        st.win = s.clone() if st.win is None else st.win + s
        st.count += 1

    def row_scores(self, st) -> torch.Tensor:
        """The current score of each stored row of `st`'s layer (float32, k)."""
        k = st.layer.spec.kept
        dev = st.layer.index.device
        if self.score == "magnitude":
            e = st.layer.sparse_lines().float().abs()
        elif st.folds > 0:
            e = st.ema_i * st.ema_u if self.uncertainty else st.ema_i
        elif st.count > 0:
            e = st.win / st.count
            e = e * 0 if self.uncertainty else e  # no uncertainty yet: every score is 0
        else:
            return torch.zeros(k, device=dev)
        if e.dim() == 1:
            return e
        if self.aggregate == "max":
            return e.amax(1)
        return self._reduce(e)

    # ------------------------------------------------------------------ masking
    def final_rho(self) -> float:
        """r_f as a fraction of all full-S entries (the layers' targets as the pruner was built)."""
        full = sum(st.full * st.len for st in self.states.values())
        return sum(st.target * st.len for st in self.states.values()) / max(full, 1)

    def budget(self, progress: float) -> dict[str, int]:
        """Rows each layer may keep at schedule factor `progress` (per-layer ranking), before scores."""
        out = {}
        for n, st in self.states.items():
            start = self.initial_keep * st.full
            want = st.target + (start - st.target) * progress
            out[n] = max(st.target, min(_snap(want + 1e-6, st.q), st.full))
        return out

    def prune_to(self, progress: float):
        """Mask every layer down to the rows the schedule allows at factor `progress`; returns the global
        score cut (lowest kept row score) or None."""
        scores = {n: self.row_scores(st) for n, st in self.states.items()}
        alive = {n: st.layer.keep_mask.clone() for n, st in self.states.items()}
        for n in scores:
            scores[n] = torch.where(alive[n], scores[n], torch.full_like(scores[n], -math.inf))
        if self.ranking == "layer":
            counts = self.budget(progress)
        else:
            counts = self._global_counts(scores, alive, progress)
        cut = math.inf
        for n, st in self.states.items():
            c = min(counts[n], int(alive[n].sum()))
            order = torch.sort(scores[n], descending=True, stable=True).indices
            keep = torch.zeros_like(alive[n])
            keep[order[:c]] = True
            if c:
                cut = min(cut, float(scores[n][order[c - 1]]))
            if not torch.equal(keep, alive[n]):
                st.layer.set_mask(keep)
                if self.compact and self.optimizer is not None:
                    st.slice(st.layer.compact(self.optimizer))
            if progress == 0.0:  # final phase: what each layer keeps now is its target (global ranking moves it)
                st.layer.spec = dataclasses.replace(st.layer.spec, target=c)
        return None if cut == math.inf else cut

    def _global_counts(self, scores, alive, progress) -> dict[str, int]:
        states = list(self.states.values())
        full = sum(st.full * st.len for st in states)
        final = sum(st.target * st.len for st in states)
        budget = final + (self.initial_keep * full - final) * progress
        names = list(scores)
        flat = torch.cat([scores[n].float().cpu() for n in names])
        owner = torch.cat([torch.full((len(scores[n]),), i) for i, n in enumerate(names)])
        cost = torch.tensor([self.states[n].len for n in names], dtype=torch.float64)[owner]
        order = torch.sort(flat, descending=True, stable=True).indices
        ok = torch.isfinite(flat[order]) & (torch.cumsum(cost[order], 0) <= budget + 1e-6)
        counts = torch.bincount(owner[order][ok], minlength=len(names)).tolist()
        snapped = {n: _snap(c, self.states[n].q) for n, c in zip(names, counts)}
        left = budget - sum(snapped[n] * self.states[n].len for n in names)
        # hand the remainder out a quantum at a time, best next row first
        nxt = []
        for n in names:
            st, c = self.states[n], snapped[n]
            srt = torch.sort(scores[n].float(), descending=True).values
            if c + st.q <= int(alive[n].sum()):
                nxt.append((float(srt[c]), n))
        for _, n in sorted(nxt, reverse=True):
            st = self.states[n]
            if st.q * st.len <= left + 1e-6:
                snapped[n] += st.q
                left -= st.q * st.len
        return snapped

    # ------------------------------------------------------------------ resume
    def state_dict(self):
        return {"last": self.last, "layers": {n: {"win": st.win, "ema_i": st.ema_i, "ema_u": st.ema_u,
                                                  "count": st.count, "folds": st.folds}
                                              for n, st in self.states.items()}}

    def load_state_dict(self, state):
        self.last = state.get("last")
        for n, d in state.get("layers", {}).items():
            if n in self.states:
                st = self.states[n]
                st.win, st.ema_i, st.ema_u = d["win"], d["ema_i"], d["ema_u"]
                st.count, st.folds = d["count"], d["folds"]

    def kept_rows(self) -> dict[str, int]:
        """Rows of S each layer keeps now (mask applied)."""
        return {n: int(st.layer.keep_mask.sum()) for n, st in self.states.items()}
