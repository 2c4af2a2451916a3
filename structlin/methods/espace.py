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

Statistics beyond the input Gram need `calibrate(model, cfg, batches)`, whose result is passed to
`structlin.compress(model, cfg, stats=...)`. The plain pipeline (``calib=``) supplies only the Gram, which
serves ``mse``, ``go`` and ``output``. (`Espace.collect` is ready for a pipeline that asks the method to
collect its own statistics.)

Parameter charge: each layer stores its own P, so L·K is charged to every layer, also when q/k/v or
gate/up read one input and could share a single P.
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
    calibrator: str = choice("mse", CALIBRATORS + ("auto",), "statistic whose top eigenvectors form P")
    order: str = choice("abs", ("signed", "abs"), "rank eigenvalues of indefinite go/nl matrices by λ or |λ|")
    holdout: int = option(4, "every holdout-th calibration batch is held out to score candidates (0: none)",
                          low=0, high=1_000_000)
    refit: bool = option(True, "auto: refit the winning calibrator on all calibration tokens")
    auto_nl: bool = option(True, "auto: also try nl/nl_l2 (backward passes) when the model has a loss")


@dataclass(frozen=True)
class EspaceSpec(Spec):
    rank: int = 1          # L, the projected input dimension
    method = "espace"


class EspaceLinear(StructuredLinear):
    """y = proj_out(x P): P (K × L) is a frozen buffer (saved with the weights), proj_out an L → N
    `nn.Linear` whose weight is Bᵀ = W P (N × L) and whose bias is the dense bias.

    num_params() charges P in full (K·L) to this layer, plus N·L (+N bias): L·(K + N) (+N). Layers that
    read the same input could share one P; this per-layer count charges it to each of them.
    """

    spec_class = EspaceSpec

    def __init__(self, spec: EspaceSpec, dtype=None, device=None):
        super().__init__(spec)
        self.register_buffer("P", torch.zeros(spec.in_features, spec.rank, dtype=dtype, device=device))
        self.proj_out = nn.Linear(spec.rank, spec.out_features, bias=spec.bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(x @ self.P)

    def to_dense(self) -> torch.Tensor:
        return self.proj_out.weight @ self.P.T                       # (N × L)(L × K)

    def inner(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.P

    def outer(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj_out(h)

    def outer_weight(self) -> torch.Tensor:
        return self.proj_out.weight

    def num_params(self) -> int:
        return self.P.numel() + sum(p.numel() for p in self.parameters())

    def flops(self, tokens: int = 1) -> int:
        s = self.spec
        return 2 * tokens * s.rank * (s.in_features + s.out_features)

    def export(self) -> nn.Sequential:
        """Two plain layers any server runs: Linear(K → L, no bias, weight Pᵀ), Linear(L → N, bias)."""
        s, p = self.spec, self.P
        down = nn.Linear(s.in_features, s.rank, bias=False, dtype=p.dtype, device=p.device)
        up = nn.Linear(s.rank, s.out_features, bias=s.bias, dtype=p.dtype, device=p.device)
        with torch.no_grad():
            down.weight.copy_(p.T)
            up.load_state_dict(self.proj_out.state_dict())
        return nn.Sequential(down, up)


# ---------------------------------------------------------------------------------------------- statistics

class InputMoments:
    """Σ x xᵀ and Σ x xᵀ/‖x‖² (float64) per split (0 fit, 1 held out) of one input shared by a group."""

    def __init__(self, in_features: int, device):
        z = lambda: torch.zeros(2, in_features, in_features, dtype=torch.float64, device=device)  # noqa: E731
        self.gram, self.l2, self.tokens = z(), z(), [0, 0]
        self.batch = None          # (Σ x xᵀ, Σ x̂ x̂ᵀ, T) of the current batch, for nl
        self.eig_cache = {}        # weight-independent eigendecompositions (mse, mse_l2), shared by the group

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
    scores = {}
    for cal, order in auto_candidates(stats):
        P, Bt = fit(weight, rank, cal, order, stats, "fit")
        scores[f"{cal}/{order}"] = output_error(weight, P, Bt, hold)
    best = min(scores, key=scores.get)
    cal, order = best.split("/")
    P, Bt = fit(weight, rank, cal, order, stats, "all" if opts.refit else "fit")
    return P, Bt, {"calibrator": cal, "order": order, "heldout_error": scores}


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

    def spec_params(self, spec):
        """L·K for P (charged to this layer) + L·N for B + N for the bias."""
        return spec.rank * (spec.in_features + spec.out_features) + spec.out_features * spec.bias

    def spec_flops(self, spec, tokens=1):
        return 2 * tokens * spec.rank * (spec.in_features + spec.out_features)

    def project(self, weight, bias, spec, stats, opts, generator):
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


register(Espace())
