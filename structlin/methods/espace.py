"""ESPACE activation projection: y ≈ (x P) Bᵀ + b with P (K × L) orthonormal and frozen, B = PᵀW (L × N).

Notation: x ∈ R^K is one token of the layer input, W the (N × K) PyTorch weight, y = x Wᵀ + b. ESPACE keeps
W's action only on an L-dimensional input subspace: Ŵ = W P Pᵀ, stored as P and Bᵀ = W P (N × L). Cost
L·(K + N) parameters and 2·L·(K + N) FLOPs per token instead of K·N; it pays off for L < K·N/(K + N).

P holds the top-L eigenvectors of one of these K × K calibrators (no mean subtraction, float64,
token-weighted, padding excluded; C_x = E[x xᵀ], C_W = WᵀW / N, g = ∂loss/∂x at this layer's input):

* ``mse``     C_x                                        minimises E‖x − PPᵀx‖² (residual = Σ discarded λ)
* ``mse_l2``  E[x xᵀ / ‖x‖²]                             the same on unit-normalised tokens
* ``go``      C_W C_x + C_x C_W                          linear term of E‖W(x − PPᵀx)‖² (a bound)
* ``go_l2``   the same with unit tokens and unit weight rows
* ``nl``      Σ_b T_b (C_x^b C_g^b + C_g^b C_x^b) / Σ_b T_b   (per-batch products; needs backward passes)
* ``nl_l2``   the same with unit x and g
* ``output``  the output-side projection: U = top-L eigenvectors of C_y = W C_x Wᵀ (N × N), Ŵ = U Uᵀ W.
              It is the exact minimiser of E‖(W − Ŵ)x‖² over rank-L Ŵ (as whitened SVD), and deploys in the
              same form: P = orth(Wᵀ U), Bᵀ = Ŵ P, since Ŵ's rows lie in span(P).

go/nl matrices are indefinite: ``order`` keeps eigenvalues by signed value or by |λ|. ``calibrator="auto"``
fits every candidate (calibrator × order) on the fit batches and scores it on the *exact* output error
‖(W − Ŵ) X‖² / ‖W X‖² over held-out calibration batches (every ``holdout``-th batch), then (``refit``)
refits the winner on all tokens.

Statistics: `calibrate(model, cfg, batches)` (held-out split, nl with a loss), passed as
`structlin.compress(model, cfg, stats=...)`; `compress(..., calib=batches)` collects the same statistics
through `Espace.collect` (forward only unless the calibrator is nl/nl_l2, or auto with a loss and auto_nl).
Statistics from the generic `structlin.calibrate.collect` (Gram only) serve ``mse``, ``go`` and ``output``
without sharing.

Shared P (``share=True``, the default with statistics from `calibrate`/`Espace.collect`): layers that read
the same input tensor (q/k/v, gate/up) form one group with one P (K × L) and one B_j per member. The budget
treats a group as one unit of L·(K + Σ N_j) (+ biases) parameters (`Espace.group_candidates`), so P is
charged once: the group owner's spec has ``owns_p=True`` and stores P, the others (``owns_p=False``) read the
owner's P (``p_owner``). For a group, ``go``/``go_l2`` use the stacked weight, ``nl``/``nl_l2`` the sum of
the members' matrices, and ``output`` becomes the *joint whitened* fit: P spans C^-½·(top-L eigenvectors of
C^½ (Σ_j W_jᵀ W_j) C^½) — the exact minimiser of Σ_j ‖(W_j − Ŵ_j) X‖² with one shared P — and every B_j is
the least-squares fit B_jᵀ = W_j C P (Pᵀ C P)⁻¹. ``joint_rel`` does the same with each W_j scaled to unit
‖W_j X‖ (minimises the sum of relative errors). `auto` scores all of these per group on held-out batches by
Σ_j (relative output error of member j)².

Training forms: by default healing trains B (`proj_out`) with P frozen (a buffer); `set_training_form(model,
"W")` trains the full (N × K) W instead, computing (x P)(W P)ᵀ (ESPACE parity), and `set_training_form(model,
"B")` folds it back to B = P-projected W.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from ..calibrate.collect import grad_through_embeddings, model_device, prepare_batch, progress_bar, run_model
from ..calibrate.stats import Stats
from ..config import choice, option
from ..errors import CalibrationError, ConfigError
from ..modules import linear_shape
from . import register
from .base import Method, Spec, StructuredLinear

INPUT_CALIBRATORS = ("mse", "mse_l2", "go", "go_l2", "nl", "nl_l2")
CALIBRATORS = INPUT_CALIBRATORS + ("output",)
FIT, HOLD = 0, 1


@dataclass
class EspaceOptions:
    calibrator: str = choice("mse", CALIBRATORS + ("joint_rel", "auto"), "statistic whose top eigenvectors form "
                             "P (joint_rel: for a shared group, the joint fit on unit-‖W_j X‖ members; else output)")
    order: str = choice("abs", ("signed", "abs"), "rank eigenvalues of indefinite go/nl matrices by λ or |λ|")
    holdout: int = option(4, "every holdout-th calibration batch is held out to score candidates (0: none)",
                          low=0, high=1_000_000)
    refit: bool = option(True, "auto: refit the winning calibrator on all calibration tokens")
    auto_nl: bool = option(True, "auto: also try nl/nl_l2 (backward passes) when the model has a loss")
    share: bool = option(True, "layers reading the same input (q/k/v, gate/up) share one P, charged once "
                         "(needs statistics from espace.calibrate or the pipeline's own collection)")


@dataclass(frozen=True)
class EspaceSpec(Spec):
    rank: int = 1          # L, the projected input dimension
    p_owner: str = ""      # shared P: name of the group's module that stores P ("" = a private P)
    owns_p: bool = True    # this layer stores (and is charged for) P
    method = "espace"

    @classmethod
    def from_dict(cls, d: dict) -> "EspaceSpec":
        return super().from_dict({"p_owner": "", "owns_p": True, **d})   # files from before shared P


class EspaceLinear(StructuredLinear):
    """y = proj_out(x P): P (K × L) is a frozen buffer (saved with the weights), proj_out an L → N
    `nn.Linear` whose weight is Bᵀ (N × L) and whose bias is the dense bias.

    num_params() charges P (K·L) to the layer that stores it, plus N·L (+N bias). A layer of a shared group
    with ``owns_p=False`` has no P of its own: it reads the owner's (`link_shared` connects them after
    `compress` and after loading), so the group stores L·(K + Σ N_j) (+ biases).
    """

    spec_class = EspaceSpec

    def __init__(self, spec: EspaceSpec, dtype=None, device=None):
        super().__init__(spec)
        if spec.owns_p:
            self.register_buffer("P", torch.zeros(spec.in_features, spec.rank, dtype=dtype, device=device))
        else:       # a plain list: not a submodule (no double state_dict), followed by deepcopy and pickling
            self.__dict__["_p_link"] = [None]
            self.__dict__["_p_tmp"] = None      # the group's P until linked (during compress)
        self.proj_out = nn.Linear(spec.rank, spec.out_features, bias=spec.bias, dtype=dtype, device=device)

    def __getattr__(self, name):
        if name == "P" and "_p_link" in self.__dict__:
            owner = self.__dict__["_p_link"][0]
            if owner is not None:
                return owner.P
            if self.__dict__.get("_p_tmp") is not None:
                return self.__dict__["_p_tmp"]
            raise CalibrationError(f"ESPACE layer shares the P of '{self.spec.p_owner}' but is not linked to it; "
                                   f"call structlin.methods.espace.link_shared(model)")
        return super().__getattr__(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(x @ self.P.to(x.dtype))

    def to_dense(self) -> torch.Tensor:
        w = self.proj_out.weight
        return w @ self.P.T.to(w)                                    # (N × L)(L × K)

    def inner(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.P.to(x.dtype)

    def outer(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj_out(h)

    def outer_weight(self) -> torch.Tensor:
        return self.proj_out.weight

    def num_params(self) -> int:
        return self.spec.owns_p * self.P.numel() + sum(p.numel() for p in self.parameters())

    def flops(self, tokens: int = 1) -> int:
        s = self.spec
        return 2 * tokens * s.rank * (s.in_features + s.out_features)

    def orthonormality_error(self) -> float:
        """max |PᵀP − I| of the stored P (in its storage dtype, evaluated in float64)."""
        P = self.P.detach().double()
        return (P.T @ P - torch.eye(P.shape[1], dtype=P.dtype, device=P.device)).abs().max().item()

    def export(self, dtype: torch.dtype | None = None) -> nn.Sequential:
        """Two plain layers any server runs: Linear(K → L, no bias, weight Pᵀ), Linear(L → N, bias).

        With `dtype` (e.g. torch.bfloat16) both are cast. The cast P_c is no longer orthonormal (|P_cᵀP_c − I|
        ~ 4e-3 in bf16), and re-orthonormalising it by QR does not survive the cast of Q (same error again),
        so the export compensates instead: B is refitted to the P that is stored, Bᵀ = Ŵ P_c (P_cᵀ P_c)⁻¹ in
        float64 — the least-squares B for that P (with an exactly orthonormal P it is Ŵ P, the ESPACE B). The
        pair then reproduces Ŵ up to the rounding of B and the tilt of span(P_c), not the full rounding of P.
        """
        s, p = self.spec, self.P.detach()
        out_dtype = dtype or p.dtype
        down = nn.Linear(s.in_features, s.rank, bias=False, dtype=out_dtype, device=p.device)
        up = nn.Linear(s.rank, s.out_features, bias=s.bias, dtype=out_dtype, device=p.device)
        with torch.no_grad():
            if dtype is None or dtype == p.dtype:
                down.weight.copy_(p.T)
                up.load_state_dict(self.proj_out.state_dict())
            else:
                w_hat = self.to_dense().double()
                pc = p.to(dtype).double()                    # the P that is stored
                bt = torch.linalg.solve(pc.T @ pc, pc.T @ w_hat.T).T
                down.weight.copy_(pc.T.to(dtype))
                up.weight.copy_(bt.to(dtype))
                if s.bias:
                    up.bias.copy_(self.proj_out.bias.detach().to(dtype))
        return nn.Sequential(down, up)


def link_shared(model: nn.Module) -> int:
    """Connect every ESPACE layer that shares a P (``owns_p=False``) to its group's owner module in `model`;
    returns how many were linked. `compress` and `from_pretrained` call it."""
    n = 0
    for name, m in model.named_modules():
        if not isinstance(m, EspaceLinear) or m.spec.owns_p:
            continue
        try:
            owner = model.get_submodule(m.spec.p_owner)
        except AttributeError:
            owner = None
        if not isinstance(owner, EspaceLinear) or not owner.spec.owns_p or owner.P.shape != (m.in_features,
                                                                                           m.spec.rank):
            raise CalibrationError(f"ESPACE layer '{name}' shares the P of '{m.spec.p_owner}', which is not an "
                                   f"ESPACE layer storing a {m.in_features}×{m.spec.rank} P in this model")
        tmp = m.__dict__.get("_p_tmp")
        if tmp is not None and not torch.allclose(tmp.double(), owner.P.detach().double(), atol=2e-2):
            raise CalibrationError(f"ESPACE layer '{name}' was fitted with a different P than '{m.spec.p_owner}'")
        m.__dict__["_p_link"][0] = owner
        m.__dict__["_p_tmp"] = None
        n += 1
    return n


class _FullW(nn.Module):
    """Parametrisation of proj_out.weight by the full (N × K) W: weight = W P (ESPACE's training form)."""

    def __init__(self, layer: EspaceLinear):
        super().__init__()
        self.layer = [layer]        # not a submodule (the layer owns this parametrisation)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w @ self.layer[0].P.to(w.dtype)

    def right_inverse(self, bt: torch.Tensor) -> torch.Tensor:
        return bt @ self.layer[0].P.T.to(bt.dtype)           # W = Ŵ: the same function, W P = Bᵀ


def set_training_form(model: nn.Module, form: str) -> int:
    """form "W": every ESPACE layer trains the full W (N × K, initialised to Ŵ = Bᵀ Pᵀ) with P frozen, as ESPACE
    does; "B" (the default form): fold W back into Bᵀ = W P and train B. Returns the number of layers changed.
    Call it before `heal` (its optimizer picks up the current parameters) and fold back before saving."""
    from torch.nn.utils import parametrize

    if form not in ("W", "B"):
        raise ConfigError(f"ESPACE training form must be 'W' (full weight, ESPACE parity) or 'B', got {form!r}")
    n = 0
    for m in model.modules():
        if not isinstance(m, EspaceLinear):
            continue
        has = parametrize.is_parametrized(m.proj_out, "weight")
        if form == "W" and not has:
            parametrize.register_parametrization(m.proj_out, "weight", _FullW(m), unsafe=True)
            n += 1
        elif form == "B" and has:
            parametrize.remove_parametrizations(m.proj_out, "weight", leave_parametrized=True)
            n += 1
    return n


# ---------------------------------------------------------------------------------------------- statistics

class InputMoments:
    """Σ x xᵀ and Σ x xᵀ/‖x‖² (float64) per split (0 fit, 1 held out) of one input shared by a group."""

    def __init__(self, in_features: int, device):
        z = lambda: torch.zeros(2, in_features, in_features, dtype=torch.float64, device=device)  # noqa: E731
        self.gram, self.l2, self.tokens = z(), z(), [0, 0]
        self.batch = None          # (Σ x xᵀ, Σ x̂ x̂ᵀ, T) of the current batch, for nl
        self.eig_cache = {}        # weight-independent eigendecompositions (mse, mse_l2), shared by the group
        self.members: dict[str, nn.Module] = {}   # name -> the (dense) module reading this input
        self.stats: dict[str, "EspaceStats"] = {}  # name -> its statistics
        self.group_fits = {}       # shared-P fits of the group, keyed by (rank, calibrator, order, split, weights)

    def update(self, rows: torch.Tensor, split: int, keep_batch: bool) -> None:
        x = rows.to(torch.float64)
        xn = x / x.norm(dim=1, keepdim=True).clamp_min(1e-300)
        g, gl = x.T @ x, xn.T @ xn
        self.gram[split] += g
        self.l2[split] += gl
        self.tokens[split] += x.shape[0]
        if keep_batch:
            if self.batch is None:
                self.batch = [g, gl, x.shape[0]]
            else:                   # the module ran twice in one batch
                self.batch = [self.batch[0] + g, self.batch[1] + gl, self.batch[2] + x.shape[0]]


class _SharedCache(dict):
    """A module's eigendecomposition cache; keys without a weight (mse, mse_l2) go to the group's cache."""

    def __init__(self, shared: dict):
        super().__init__()
        self.shared = shared

    def get(self, key, default=None):
        return (self.shared if key[-1] is None else super()).get(key, default)

    def __setitem__(self, key, value):
        if key[-1] is None:
            self.shared[key] = value
        else:
            super().__setitem__(key, value)

    def clear(self):
        self.shared.clear()
        super().clear()


class EspaceStats(Stats):
    """Statistics of one module: shared input moments (per split) and its own nl sums (per split).

    `gram` / `tokens` (what the rest of structlin reads) cover all splits. `mean(kind, split)` gives
    E[x xᵀ] ("gram"), E[x xᵀ/‖x‖²] ("l2"), or the token-weighted nl averages ("nl", "nl_l2"); split is
    "fit", "hold" or "all".
    """

    def __init__(self, name: str, in_features: int, moments: InputMoments, with_nl: bool):
        super().__init__(name, in_features, {"gram"})
        self.moments = moments
        k = in_features
        dev = moments.gram.device
        self.nl = torch.zeros(2, k, k, dtype=torch.float64, device=dev) if with_nl else None
        self.nl_l2 = torch.zeros_like(self.nl) if with_nl else None
        self.nl_tokens = [0, 0]
        self.eig_cache = _SharedCache(moments.eig_cache)

    def add_grad(self, grad_rows: torch.Tensor, split: int) -> None:
        """Add one batch's symmetrised products (Σx xᵀ Σg gᵀ + Σg gᵀ Σx xᵀ)/T_b, plain and unit-normalised."""
        gx, gxl, t = self.moments.batch
        g = grad_rows.to(torch.float64)
        gn = g / g.norm(dim=1, keepdim=True).clamp_min(1e-300)
        gg, ggl = g.T @ g, gn.T @ gn
        self.nl[split] += (gx @ gg + gg @ gx) / t
        self.nl_l2[split] += (gxl @ ggl + ggl @ gxl) / t
        self.nl_tokens[split] += t

    def finalize(self) -> None:
        self.gram = self.moments.gram.sum(0)
        self.tokens = sum(self.moments.tokens)

    def has(self, kind: str) -> bool:
        return kind in ("gram", "l2") or (self.nl is not None and sum(self.nl_tokens) > 0)

    def mean(self, kind: str, split: str = "all") -> torch.Tensor:
        if kind in ("gram", "l2"):
            s, t = getattr(self.moments, kind), self.moments.tokens
        else:
            if not self.has(kind):
                raise CalibrationError(f"{self.name}: no gradient statistics; calibrate with an nl calibrator")
            s, t = getattr(self, kind), self.nl_tokens
        if split == "all":
            s, t = s.sum(0), sum(t)
        else:
            i = {"fit": FIT, "hold": HOLD}[split]
            s, t = s[i], t[i]
        if t == 0:
            raise CalibrationError(f"{self.name}: no calibration tokens in split '{split}'"
                                   + (" (give at least `holdout` batches, or set holdout=0)" if split == "hold" else ""))
        return s / t

    def to_numpy(self, eigen: bool = True) -> dict:
        """The statistics as numpy arrays (float64) for plotting: "gram", "l2" (and "nl", "nl_l2" when
        collected) over all calibration tokens, "tokens", and with `eigen` each matrix's eigenvalues in
        descending order ("eig_gram", ...)."""
        out = {"tokens": self.tokens}
        for kind in ("gram", "l2", "nl", "nl_l2"):
            if kind in ("nl", "nl_l2") and not self.has(kind):
                continue
            m = self.mean(kind)
            out[kind] = m.cpu().numpy()
            if eigen:
                out["eig_" + kind] = torch.linalg.eigvalsh((m + m.T) / 2).flip(0).cpu().numpy()
        return out

    def all_reduce(self) -> None:   # moments are reduced once per group by `calibrate`
        import torch.distributed as dist

        if self.nl is not None and dist.is_available() and dist.is_initialized():
            for v in (self.nl, self.nl_l2):
                dist.all_reduce(v)
            self.nl_tokens = _reduce_counts(self.nl_tokens, self.nl.device)


def _reduce_counts(counts: list[int], device) -> list[int]:
    import torch.distributed as dist

    t = torch.tensor(counts, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return [int(v) for v in t.tolist()]


def _needs_grad(opts) -> bool:
    return opts.calibrator in ("nl", "nl_l2") or (opts.calibrator == "auto" and opts.auto_nl)


def _lm_loss_available(model: nn.Module) -> bool:
    return "labels" in inspect.signature(model.forward).parameters


def calibrate(model: nn.Module, cfg, batches, *, loss_fn=None, progress: bool = True) -> dict[str, EspaceStats]:
    """name -> EspaceStats for every module `cfg` targets; pass the result to `compress(..., stats=...)`.

    Batch i is held out for scoring when opts.holdout > 0 and i % holdout == holdout − 1. nl statistics run
    a backward pass per batch: with `loss_fn(outputs, batch) -> scalar` if given, else the model's own
    language-modelling loss (labels = input_ids, padding ignored). nl without either is refused.
    """
    from ..targeting import select

    if cfg.method != "espace":
        raise ConfigError(f"espace.calibrate needs a config with method='espace', got {cfg.method!r}")
    modules = select(model, cfg.targets, cfg.exclude, cfg.layers)
    return collect(model, modules, batches, cfg.method_options(), loss_fn=loss_fn, progress=progress)


def collect(model: nn.Module, modules: dict[str, nn.Module], batches, opts, *, loss_fn=None,
            progress: bool = True) -> dict[str, EspaceStats]:
    """`calibrate` on an explicit name -> module dict (what `Espace.collect` offers the pipeline)."""
    grad = _needs_grad(opts)
    if grad and loss_fn is None and not _lm_loss_available(model):
        if opts.calibrator == "auto":
            grad = False    # auto simply skips nl on a model without a loss
        else:
            raise CalibrationError(
                f"calibrator '{opts.calibrator}' needs backward passes of a loss, but {type(model).__name__}."
                f"forward takes no `labels` (no language-modelling loss); pass loss_fn=f(outputs, batch) -> "
                f"scalar loss to structlin.compress, or choose mse/mse_l2/go/go_l2/output")
    device = model_device(model)
    stats: dict[str, EspaceStats] = {}
    groups: list[InputMoments] = []
    state = {"split": FIT, "mask": None, "last_x": None, "last": None, "scale": 1.0, "views": []}

    def pre_hook(name, in_features):
        def hook(module, args):
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                return None
            mask = state["mask"]

            def rows_of(t):             # token rows (T × K), padding removed
                r = t.detach().reshape(-1, t.shape[-1])
                return r if mask is None or mask.numel() != r.shape[0] else r[mask.to(r.device)]

            st = stats.get(name)
            shared = x is state["last_x"] and state["last"].in_features == in_features
            if st is None:
                if shared:
                    mom = state["last"].moments
                    state["last"].modules.append(name)
                    st = EspaceStats(name, in_features, mom, grad)
                    st.modules = state["last"].modules
                else:
                    mom = InputMoments(in_features, device)
                    groups.append(mom)
                    st = EspaceStats(name, in_features, mom, grad)
                stats[name] = st
                st.moments.members[name] = module
                st.moments.stats[name] = st
            if not (shared and st.moments is state["last"].moments):
                rows = rows_of(x)
                if not torch.isfinite(rows).all():
                    raise CalibrationError(f"non-finite activations reach module '{name}' during calibration")
                st.moments.update(rows, state["split"], keep_batch=grad)
            state["last_x"], state["last"] = x, st
            if not grad or not torch.is_grad_enabled():
                return None
            if not x.requires_grad:
                return None
            xv = x.view_as(x)                     # own autograd node: this module's share of ∂loss/∂x
            state["views"].append((st, xv, rows_of))
            return (xv,) + tuple(args[1:])
        return hook

    handles = [m.register_forward_pre_hook(pre_hook(n, linear_shape(m)[0])) for n, m in modules.items()]
    emb_hook = grad_through_embeddings(model) if grad else None
    if emb_hook is not None:
        handles.append(emb_hook)
    items = list(batches)
    if not items:
        raise CalibrationError("calibration data is empty: the iterable gave no batches")
    it = progress_bar(items, "calibrating (espace)", progress)
    try:
        for i, batch in enumerate(it):
            inputs, mask = prepare_batch(batch, model, i)
            state.update(split=HOLD if opts.holdout and i % opts.holdout == opts.holdout - 1 else FIT,
                         mask=mask, last_x=None, last=None, scale=1.0)
            for mom in groups:
                mom.batch = None
            if not grad:
                with torch.no_grad():
                    run_model(model, inputs)
                continue
            state["views"] = []
            with torch.enable_grad():
                loss = _loss(model, inputs, batch, loss_fn, state)
                if not state["views"] or not loss.requires_grad:
                    raise CalibrationError("no gradient reaches the target modules' inputs: the loss does not "
                                           "depend on them, or the model has no input embeddings to track")
                grads = torch.autograd.grad(loss, [v for _, v, _ in state["views"]], allow_unused=True)
            for (st, _, rows_of), g in zip(state["views"], grads):
                if g is not None:        # no parameter .grad is touched
                    st.add_grad(rows_of(g) * state["scale"], state["split"])
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in modules if n not in stats]
    if missing:
        raise CalibrationError(f"modules never called during calibration (no statistics): {missing[:8]}")
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        for mom in groups:
            dist.all_reduce(mom.gram)
            dist.all_reduce(mom.l2)
            mom.tokens = _reduce_counts(mom.tokens, mom.gram.device)
        for st in stats.values():
            st.all_reduce()
    for st in stats.values():
        st.finalize()
        st._check()
    return stats


def _loss(model, inputs, batch, loss_fn, state):
    if loss_fn is not None:
        out = run_model(model, inputs)
        return loss_fn(out, batch)
    ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
    if ids is None:
        raise CalibrationError("the built-in language-modelling loss needs input_ids in each batch; pass loss_fn")
    labels = ids.clone()
    if mask is not None:
        labels[mask == 0] = -100
    n = int((labels[:, 1:] != -100).sum())
    if n == 0:
        raise CalibrationError("a calibration batch has no token to predict (all padding, or length 1)")
    state["scale"] = float(n)       # the mean loss's gradient × n = the per-token loss gradient
    out = run_model(model, {**inputs, "labels": labels})
    if getattr(out, "loss", None) is None:
        raise CalibrationError(f"{type(model).__name__} returned no loss for labels; pass loss_fn")
    return out.loss


# ---------------------------------------------------------------------------------------------- projection

def calibrator_matrix(calibrator: str, weight: torch.Tensor, stats, split: str = "all") -> torch.Tensor:
    """The K × K symmetric matrix whose top eigenvectors form P (float64)."""
    if calibrator == "mse":
        return _gram(stats, split)
    if isinstance(stats, EspaceStats):
        if calibrator == "mse_l2":
            return stats.mean("l2", split)
        if calibrator in ("nl", "nl_l2"):
            return stats.mean(calibrator, split)
    if calibrator == "go":
        cw, cx = weight.T @ weight / weight.shape[0], _gram(stats, split)
    elif calibrator == "go_l2" and isinstance(stats, EspaceStats):
        wn = weight / weight.norm(dim=1, keepdim=True).clamp_min(1e-300)
        cw, cx = wn.T @ wn / weight.shape[0], stats.mean("l2", split)
    else:
        raise CalibrationError(f"calibrator '{calibrator}' needs statistics from structlin.methods.espace."
                               f"calibrate(model, cfg, batches), passed as compress(model, cfg, stats=...); "
                               f"the plain pipeline only collects the input Gram (mse, go, output)")
    cx = cx.to(weight)
    return cw @ cx + cx @ cw


def _gram(stats, split: str) -> torch.Tensor:
    if stats is None:
        raise CalibrationError("espace needs calibration data: pass calib=[batches] (or stats=...)")
    if isinstance(stats, EspaceStats):
        return stats.mean("gram", split)
    if split != "all":
        raise CalibrationError("held-out scoring needs statistics from structlin.methods.espace.calibrate")
    return stats.gram_mean()


def top_eigvecs(S: torch.Tensor, rank: int, order: str = "signed", where: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(P (K × L) orthonormal, λ (L,)): eigenvectors of symmetric S with the largest λ (or |λ|), checked."""
    S = (S + S.T) / 2
    lam, vec = torch.linalg.eigh(S)
    idx = torch.argsort(lam.abs() if order == "abs" else lam, descending=True)[:rank]
    P, lam = vec[:, idx], lam[idx]
    eye = torch.eye(rank, dtype=S.dtype, device=S.device)
    scale = S.abs().max().clamp_min(1e-300)
    if not (torch.isfinite(P).all() and (P.T @ P - eye).abs().max() < 1e-8
            and (P.T @ S @ P - torch.diag(lam)).abs().max() <= 1e-8 * scale):
        raise CalibrationError(f"{where}: eigendecomposition failed its orthonormality/diagonalisation check "
                               f"(non-finite or degenerate calibration statistics)")
    return P, lam


def _cached_eigs(stats, key, matrix, rank: int, order: str, where: str):
    """top_eigvecs(matrix(), rank, order), memoised on `stats` (keyed by calibrator, split, order and the
    weight's bytes): top columns only, so later calls with a rank up to the cached one cost nothing."""
    cache = getattr(stats, "eig_cache", None)
    if cache is not None:
        hit = cache.get(key)
        if hit is not None and hit[0].shape[1] >= rank:
            return hit[0][:, :rank], hit[1][:rank]
    P, lam = top_eigvecs(matrix(), rank, order, where)
    if cache is not None:
        cache[key] = (P, lam)
    return P, lam


def _weight_key(weight: torch.Tensor) -> int:
    return hash(weight.detach().cpu().numpy().tobytes())


def fit(weight: torch.Tensor, rank: int, calibrator: str, order: str, stats, split: str = "all"
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(P (K × L), Bᵀ (N × L)) with Ŵ = Bᵀ Pᵀ for one calibrator, all float64."""
    where = getattr(stats, "name", "")
    calibrator = "output" if calibrator == "joint_rel" else calibrator      # one layer: the same fit
    wkey = None if calibrator in ("mse", "mse_l2") else _weight_key(weight)
    if calibrator == "output":
        cx = _gram(stats, split).to(weight)
        n, k = weight.shape
        if n <= k:       # PCA of the layer output: top eigenvectors of C_y = W C_x Wᵀ (N × N)
            U, _ = _cached_eigs(stats, ("output", split, wkey), lambda: weight @ cx @ weight.T, rank, "signed", where)
        else:            # same U from the K × K side: with C_x = R Rᵀ, Y = W R, U = Y V Λ^-½ for Yᵀ Y = V Λ Vᵀ
            from .lowrank import damped_cholesky

            Y = weight @ damped_cholesky(cx, 1e-10, where)
            V, lam = _cached_eigs(stats, ("output", split, wkey), lambda: Y.T @ Y, rank, "signed", where)
            U, _ = torch.linalg.qr(Y @ (V / lam.clamp_min(1e-300).sqrt()))
        w_hat = U @ (U.T @ weight)
        P, _ = torch.linalg.qr(weight.T @ U)                                # span(P) ⊇ rows of Ŵ
        return P, w_hat @ P
    S = lambda: calibrator_matrix(calibrator, weight, stats, split).to(weight)  # noqa: E731
    P, _ = _cached_eigs(stats, (calibrator, split, order, wkey), S, rank, order, where)
    return P, weight @ P


def output_error(weight: torch.Tensor, P: torch.Tensor, Bt: torch.Tensor, gram: torch.Tensor) -> float:
    """Exact relative output error ‖(W − Ŵ)X‖ / ‖W X‖ = sqrt(tr(E G Eᵀ) / tr(W G Wᵀ)), E = W − Ŵ, G = E[x xᵀ]."""
    E = weight - Bt @ P.T
    return (((E @ gram) * E).sum().clamp_min(0) / ((weight @ gram) * weight).sum().clamp_min(1e-300)).sqrt().item()


def auto_candidates(stats) -> list[tuple[str, str]]:
    out = [("mse", "signed"), ("go", "signed"), ("go", "abs"), ("output", "signed")]
    if isinstance(stats, EspaceStats):
        out[1:1] = [("mse_l2", "signed")]
        out += [("go_l2", "signed"), ("go_l2", "abs")]
        if stats.has("nl"):
            out += [(c, o) for c in ("nl", "nl_l2") for o in ("signed", "abs")]
    return out


def select(weight, rank, stats, opts) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """auto: fit each candidate on the fit split, score the exact output error on the held-out split."""
    if not isinstance(stats, EspaceStats):
        raise CalibrationError("calibrator 'auto' scores candidates on held-out batches: calibrate with "
                               "structlin.methods.espace.calibrate(model, cfg, batches) and pass stats=...")
    hold = stats.mean("gram", "hold").to(weight)
    return _pick(auto_candidates(stats), lambda cal, order, split: fit(weight, rank, cal, order, stats, split),
                 lambda P, Bt: output_error(weight, P, Bt, hold), opts)


def _pick(candidates, fit_on, score, opts):
    """(P, B…, choice): every (calibrator, order) candidate fitted on the fit split and scored on the held-out
    one; the best refitted on all batches (opts.refit) or kept as fitted."""
    scores = {}
    for cal, order in candidates:
        scores[f"{cal}/{order}"] = score(*fit_on(cal, order, "fit"))
    cal, order = min(scores, key=scores.get).split("/")
    P, B = fit_on(cal, order, "all" if opts.refit else "fit")
    return P, B, {"calibrator": cal, "order": order, "heldout_error": scores}


# ---------------------------------------------------------------------------------------------- shared P

GROUP_CALIBRATORS = INPUT_CALIBRATORS + ("output", "joint_rel")


def input_groups(stats, opts=None) -> list[list[str]]:
    """Names of the targeted modules that read one input tensor (two or more), in call order, from
    statistics collected by `calibrate` / `Espace.collect`; [] for other statistics or share=False."""
    if stats is None or (opts is not None and not getattr(opts, "share", True)):
        return []
    seen, out = set(), []
    for st in stats.values():
        mom = getattr(st, "moments", None)
        if not isinstance(st, EspaceStats) or id(mom) in seen:
            continue
        seen.add(id(mom))
        names = [n for n in mom.members if n in stats]
        if len(names) > 1:
            out.append(names)
    return out


def group_weights(stats: "EspaceStats") -> dict[str, torch.Tensor]:
    """name -> float64 weight of every module of `stats`'s input group (the dense modules calibrated)."""
    from ..modules import dense_weight

    out = {}
    for n, m in stats.moments.members.items():
        if isinstance(m, StructuredLinear):
            raise CalibrationError(f"{n}: shared-P fitting needs the dense weights the statistics were collected "
                                   f"on, but the module is already compressed; calibrate again")
        out[n] = dense_weight(m)[0].detach().to(torch.float64)
    return out


def _ls_b(weight: torch.Tensor, P: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Bᵀ = W C P (Pᵀ C P)⁻¹ (N × L): the B minimising ‖(W − Bᵀ Pᵀ) X‖² for a fixed P."""
    G = P.T @ C @ P
    G = G + 1e-12 * G.diagonal().mean().clamp_min(1e-300) * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    return torch.linalg.solve(G, P.T @ C @ weight.T).T


def group_fit(weights: dict[str, torch.Tensor], rank: int, calibrator: str, order: str, stats, split: str = "all"
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(P (K × L), {name: Bᵀ (N_j × L)}) with one P shared by the group `weights` (float64, same K).

    mse/mse_l2: the input calibrators (B_j = W_j P); go/go_l2: the calibrator of the stacked weight;
    nl/nl_l2: the sum of the members' matrices; output: the joint whitened fit (module docstring) and
    joint_rel the same on members scaled to unit ‖W_j X‖, both with least-squares B_j."""
    names = list(weights)
    where = f"{names[0]} (+{len(names) - 1} sharing its input)"
    key = (rank, calibrator, order, split, hash(tuple(_weight_key(weights[n]) for n in names)))
    hit = stats.moments.group_fits.get(key)
    if hit is not None:
        return hit
    if calibrator in ("mse", "mse_l2"):
        P, _ = fit(weights[names[0]][:1], rank, calibrator, order, stats, split)   # weight-independent P
        out = P, {n: w @ P for n, w in weights.items()}
    elif calibrator in ("go", "go_l2", "nl", "nl_l2"):
        if calibrator in ("nl", "nl_l2"):
            S = sum(stats.moments.stats[n].mean(calibrator, split) for n in names)
        else:
            S = calibrator_matrix(calibrator, torch.cat([weights[n] for n in names]), stats, split)
        P, _ = top_eigvecs(S, rank, order, where)
        out = P, {n: w @ P for n, w in weights.items()}
    elif calibrator in ("output", "joint_rel"):
        from .lowrank import damped_cholesky

        C = _gram(stats, split).to(weights[names[0]])
        R = damped_cholesky(C, 1e-10, where)                         # C ≈ R Rᵀ, R lower
        M = 0
        for n in names:
            Y = weights[n] @ R                                       # W_j C^½ up to a rotation
            if calibrator == "joint_rel":
                Y = Y / Y.norm().clamp_min(1e-300)
            M = M + Y.T @ Y
        V, _ = top_eigvecs(M, rank, "signed", where)                 # top of Rᵀ (Σ W_jᵀ W_j) R
        P, _ = torch.linalg.qr(torch.linalg.solve_triangular(R.T, V, upper=True))   # span R⁻ᵀ V
        out = P, {n: _ls_b(w, P, C) for n, w in weights.items()}
    else:
        raise ConfigError(f"calibrator {calibrator!r} has no shared-P form; valid: {GROUP_CALIBRATORS}")
    stats.moments.group_fits[key] = out
    return out


def group_candidates(stats) -> list[tuple[str, str]]:
    out = [("mse", "signed"), ("mse_l2", "signed"), ("go", "signed"), ("go", "abs"), ("go_l2", "abs"),
           ("output", "signed"), ("joint_rel", "signed")]
    if all(st.has("nl") for st in stats.moments.stats.values()):
        out += [(c, o) for c in ("nl", "nl_l2") for o in ("signed", "abs")]
    return out


def group_score(weights, P, Bts, hold) -> float:
    """Σ_j (relative held-out output error of member j)²."""
    return sum(output_error(w, P, Bts[n], hold) ** 2 for n, w in weights.items())


def group_select(weights, rank, stats, opts) -> tuple[torch.Tensor, dict, dict]:
    """auto for a shared group: every group candidate fitted on the fit split, scored on the held-out one."""
    hold = stats.mean("gram", "hold").to(weights[next(iter(weights))])
    return _pick(group_candidates(stats),
                 lambda cal, order, split: group_fit(weights, rank, cal, order, stats, split),
                 lambda P, Bts: group_score(weights, P, Bts, hold), opts)


class Espace(Method):
    name = "espace"
    Options = EspaceOptions
    Spec = EspaceSpec
    Layer = EspaceLinear

    def stats_needed(self, opts) -> set[str]:
        return {"gram"}

    def collect(self, model, modules, batches, opts, progress=True, loss_fn=None):
        """All statistics the calibrators need (a pipeline hook: see the module docstring)."""
        return collect(model, modules, batches, opts, loss_fn=loss_fn, progress=progress)

    def candidates(self, in_features, out_features, bias, opts):
        return self.rank_ladder(lambda k: EspaceSpec(in_features, out_features, bias, k),
                                in_features, out_features, bias)

    def input_groups(self, stats, opts) -> list[list[str]]:
        """Groups of targeted modules that share one P (`compress` allocates each as one unit)."""
        return input_groups(stats, opts)

    def group_candidates(self, members: dict[str, tuple[int, int, bool]], opts) -> list[dict]:
        """Sizes of a shared-P group, increasing: {name: spec} per rank L = q, 2q, … (q the tile quantum of
        K × Σ N_j) while the group's L·(K + Σ N_j) (+ biases) stays below its dense params. The first
        member stores P."""
        from ..budget import dense_params, tile_quantum

        names = list(members)
        k = members[names[0]][0]
        if any(members[n][0] != k for n in names):
            raise ConfigError(f"shared-P group {names} mixes input sizes {[members[n][0] for n in names]}")
        n_sum = sum(members[n][1] for n in names)
        dense = sum(dense_params(*members[n]) for n in names)
        q, out, rank = tile_quantum(k, n_sum), [], None
        rank = q
        while rank < min(k, n_sum):
            specs = {n: EspaceSpec(k, members[n][1], members[n][2], rank, p_owner=names[0], owns_p=i == 0)
                     for i, n in enumerate(names)}
            if sum(self.spec_params(sp) for sp in specs.values()) >= dense:
                break
            out.append(specs)
            rank += q
        return out

    def link(self, model) -> None:
        """After compress / loading: shared-P layers read their owner's P."""
        link_shared(model)

    def spec_params(self, spec):
        """L·K for P (if this layer stores it) + L·N for B + N for the bias."""
        return spec.rank * (spec.in_features * spec.owns_p + spec.out_features) + spec.out_features * spec.bias

    def spec_flops(self, spec, tokens=1):
        return 2 * tokens * spec.rank * (spec.in_features + spec.out_features)

    def project(self, weight, bias, spec, stats, opts, generator):
        if spec.p_owner:
            return self._project_shared(weight, bias, spec, stats, opts)
        if opts.calibrator == "auto":
            P, Bt, choice_ = select(weight, spec.rank, stats, opts)
        else:
            P, Bt = fit(weight, spec.rank, opts.calibrator, opts.order, stats)
            choice_ = {"calibrator": opts.calibrator, "order": opts.order}
        layer = EspaceLinear(spec, dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            layer.P.copy_(P)
            layer.proj_out.weight.copy_(Bt)
            if bias is not None:
                layer.proj_out.bias.copy_(bias)
        layer.espace_choice = choice_       # what was fitted (not saved; the function is P and B)
        return layer


    def _project_shared(self, weight, bias, spec, stats, opts):
        """One member of a shared-P group: the group is fitted once (cached on the statistics)."""
        if not isinstance(stats, EspaceStats) or stats.name not in stats.moments.members:
            raise CalibrationError(f"ESPACE spec shares the P of '{spec.p_owner}': it needs the group's statistics "
                                   f"from structlin.methods.espace.calibrate (or the pipeline's collection)")
        weights = group_weights(stats)
        weights[stats.name] = weight
        if opts.calibrator == "auto":
            key = ("auto", spec.rank, opts.refit, hash(tuple(_weight_key(w) for w in weights.values())))
            hit = stats.moments.group_fits.get(key)
            if hit is None:
                hit = stats.moments.group_fits[key] = group_select(weights, spec.rank, stats, opts)
            P, Bts, choice_ = hit
        else:
            P, Bts = group_fit(weights, spec.rank, opts.calibrator, opts.order, stats)
            choice_ = {"calibrator": opts.calibrator, "order": opts.order}
        layer = EspaceLinear(spec, dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            if spec.owns_p:
                layer.P.copy_(P)
            else:
                layer.__dict__["_p_tmp"] = P
            layer.proj_out.weight.copy_(Bts[stats.name])
            if bias is not None:
                layer.proj_out.bias.copy_(bias)
        layer.espace_choice = dict(choice_, group=list(weights))
        return layer


register(Espace())
