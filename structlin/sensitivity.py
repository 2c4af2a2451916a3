"""How much each targeted layer matters to the loss, for budget allocation (`structlin.budget`).

Two estimates, both per layer and per candidate size:

* **Fisher-weighted output error** (`fisher_curves`, one forward+backward pass, no per-layer runs). With
  y = W x the layer output, g = ∂loss/∂y per token (of the summed token loss) and E = W − Ŵ, a second-order
  (empirical Fisher / K-FAC) expansion of the loss gives

      Δloss_l ≈ ½ E_t[(g_tᵀ E x_t)²] ≈ ½ tr(E C_x Eᵀ C_g),   C_x = E[x xᵀ] (K × K), C_g = E[g gᵀ] (N × N).

  Unlike the relative calibration output error ‖E X‖²/‖W X‖², this is on one scale for every layer (loss
  nats) and knows which output directions the rest of the network listens to. For whitened low-rank
  (W L = U Σ Vᵀ, L Lᵀ = C_x) the error at rank k is exactly ½ Σ_{i>k} σ_i² u_iᵀ C_g u_i, so a whole curve
  costs one SVD; other methods project each candidate (`weighted_error`).
* **Measured sensitivity** (`measure`): replace one layer at a time by its projection at a few sizes and
  measure the increase of the calibration loss on a few batches, running only the blocks from that
  layer's block on (block inputs are cached). Costly (layers × sizes partial forwards), so results are
  cached on disk, keyed by the model's weights, the method, its options and the batches.

Both are turned into per-layer error curves over the method's candidate sizes and fed to the same greedy
allocator as the spectral curves (`budget.allocate_curves`).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from .calibrate.collect import grad_through_embeddings, model_device, prepare_batch, progress_bar, run_model
from .errors import CalibrationError
from .modules import dense_weight, linear_shape


# ------------------------------------------------------------------------------------ output-gradient Grams

def output_grad_grams(model: nn.Module, modules: dict[str, nn.Module], batches, *, loss_fn=None,
                      progress: bool = True) -> dict[str, torch.Tensor]:
    """name -> C_g = E_t[g_t g_tᵀ] (N × N, float64) with g_t = ∂(Σ token losses)/∂y_t at each module's output.

    Runs one forward and backward per batch (parameters' .grad untouched). The loss is `loss_fn(outputs,
    batch)` (a mean over tokens is rescaled by the predicted-token count), or the model's language-modelling
    loss with labels = input_ids (padding ignored). Token-weighted; padding rows excluded. A half-precision
    model on the CPU is differentiated through a float32 copy (CPU half-precision backward is slow).
    """
    import copy

    from .methods.espace import _lm_loss_available
    from .calibrate.collect import model_dtype

    if model_device(model).type == "cpu" and model_dtype(model) in (torch.bfloat16, torch.float16):
        names = list(modules)
        copy32 = copy.deepcopy(model).float()
        return output_grad_grams(copy32, {n: copy32.get_submodule(n) for n in names}, batches,
                                 loss_fn=loss_fn, progress=progress)

    if loss_fn is None and not _lm_loss_available(model):
        raise CalibrationError(f"{type(model).__name__}.forward takes no labels: pass loss_fn=f(outputs, batch) "
                               f"-> scalar for gradient-based sensitivity")
    grams: dict[str, torch.Tensor] = {}
    tokens = {"n": 0}
    state: dict = {"outs": [], "mask": None}

    def hook(name):
        def fn(module, args, out):
            if isinstance(out, torch.Tensor) and out.requires_grad:
                state["outs"].append((name, out))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    emb_hook = grad_through_embeddings(model)
    if emb_hook is not None:
        handles.append(emb_hook)
    items = list(batches)
    it = progress_bar(items, "output gradients", progress)
    try:
        for i, batch in enumerate(it):
            inputs, mask = prepare_batch(batch, model, i)
            state["outs"] = []
            with torch.enable_grad():
                loss, scale = _summed_loss(model, inputs, batch, loss_fn)
                if not state["outs"]:
                    raise CalibrationError("no gradient reaches the target modules' outputs")
                grads = torch.autograd.grad(loss * scale, [o for _, o in state["outs"]], allow_unused=True)
            batch_rows = 0
            for (name, _), g in zip(state["outs"], grads):
                if g is None:
                    continue
                rows = g.detach().reshape(-1, g.shape[-1])
                if mask is not None and mask.numel() == rows.shape[0]:
                    rows = rows[mask.to(rows.device)]
                batch_rows = batch_rows or rows.shape[0]
                r32 = rows.to(torch.float32)
                gg = (r32.T @ r32).to(torch.float64)
                grams[name] = gg if name not in grams else grams[name].add_(gg)
            tokens["n"] += batch_rows
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in modules if n not in grams]
    if missing:
        raise CalibrationError(f"no loss gradient reached modules {missing[:6]}")
    return {n: g / tokens["n"] for n, g in grams.items()}


def _summed_loss(model, inputs, batch, loss_fn):
    """(loss, scale) with loss·scale the sum of per-token losses."""
    if loss_fn is not None:
        out = run_model(model, inputs)
        n = inputs.get("attention_mask")
        return loss_fn(out, batch), float(n.sum()) if n is not None else 1.0
    ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
    labels = ids.clone()
    if mask is not None:
        labels[mask == 0] = -100
    n = int((labels[:, 1:] != -100).sum())
    out = run_model(model, {**inputs, "labels": labels})
    return out.loss, float(n)


# ------------------------------------------------------------------------------------ measured sensitivity

class TailRunner:
    """The model's loss on fixed batches, recomputing only the transformer blocks from a given one on.

    One dense pass caches every block's output per batch; `loss(start)` then replays blocks before `start`
    from the cache (their `forward` temporarily returns the cached output) and runs the rest for real. So a
    change confined to block `start` and later costs a partial forward. `start=None` runs everything.
    """

    def __init__(self, model: nn.Module, batches, target_names, loss_fn=None):
        from .calibrate.sequential import find_blocks

        self.model, self.loss_fn = model, loss_fn
        self.batches = [prepare_batch(b, model, i) + (b,) for i, b in enumerate(batches)]
        if not self.batches:
            raise CalibrationError("sensitivity needs at least one batch")
        try:
            self.prefix, self.blocks = find_blocks(model, target_names)
        except CalibrationError:
            self.prefix, self.blocks = None, []
        self.outputs: list[list] = [[None] * len(self.blocks) for _ in self.batches]
        self._batch = 0

        def keep(i):
            def fn(module, args, out):
                self.outputs[self._batch][i] = _detach(out)
            return fn

        handles = [b.register_forward_hook(keep(i)) for i, b in enumerate(self.blocks)]
        try:
            self.base = self._run(None)
        finally:
            for h in handles:
                h.remove()

    def block_of(self, name: str) -> int | None:
        if self.prefix is None or not name.startswith(self.prefix + "."):
            return None
        return int(name[len(self.prefix) + 1:].split(".")[0])

    @torch.no_grad()
    def _run(self, start: int | None) -> float:
        total, count = 0.0, 0
        for bi, (inputs, mask, raw) in enumerate(self.batches):
            self._batch = bi
            replay = [] if start is None else self.blocks[:start]
            for i, blk in enumerate(replay):
                blk.forward = (lambda out: (lambda *a, **k: out))(self.outputs[bi][i])
            try:
                loss, n = self._loss(inputs, raw)
            finally:
                for blk in replay:
                    del blk.forward
            total += loss * n
            count += n
        return total / count

    def _loss(self, inputs, raw) -> tuple[float, float]:
        if self.loss_fn is not None:
            out = run_model(self.model, inputs)
            mask = inputs.get("attention_mask")
            return float(self.loss_fn(out, raw)), float(mask.sum()) if mask is not None else 1.0
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        labels = ids.clone()
        if mask is not None:
            labels[mask == 0] = -100
        out = run_model(self.model, {**inputs, "labels": labels})
        return float(out.loss), float((labels[:, 1:] != -100).sum())

    def loss(self, start: int | None) -> float:
        return self._run(start)


def _detach(out):
    if isinstance(out, torch.Tensor):
        return out.detach()
    if isinstance(out, tuple):
        return tuple(_detach(o) for o in out)
    return out


def fingerprint(model: nn.Module, names) -> str:
    """A short hash of the targeted weights (shape and a strided sample of values) and their names."""
    h = hashlib.sha256()
    for name in names:
        w, _ = dense_weight(model.get_submodule(name))
        flat = w.detach().reshape(-1)
        h.update(f"{name}{tuple(w.shape)}{w.dtype}".encode())
        h.update(flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _batches_key(batches) -> str:
    h = hashlib.sha256()
    for b in batches:
        t = b["input_ids"] if isinstance(b, dict) else b
        h.update(t.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    import os

    return Path(os.environ.get("STRUCTLIN_CACHE", Path.home() / ".cache" / "structlin")) / "sensitivity"


def measure(model: nn.Module, targets: dict[str, nn.Module], method, opts, stats, batches, *,
            fractions=(0.3, 0.6), seed: int = 0, loss_fn=None, cache_dir=None, progress: bool = True
            ) -> dict[str, dict]:
    """name -> {"params": [...], "delta": [...]}: the increase of the mean calibration loss when only that
    layer is replaced by `method` at the candidate sizes nearest to `fractions` of its dense params.

    Cached as JSON in `cache_dir` (default ~/.cache/structlin/sensitivity, or $STRUCTLIN_CACHE), keyed by the
    targeted weights, the method and options, the batches and the fractions; a partial cache is completed.
    """
    import dataclasses

    from .compress import layer_generator

    names = list(targets)
    key_src = json.dumps({"model": fingerprint(model, names), "method": method.name,
                          "opts": dataclasses.asdict(opts), "batches": _batches_key(batches),
                          "fractions": list(fractions), "seed": seed}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_dir / f"{method.name}-{key}.json"
    done = json.loads(path.read_text())["layers"] if path.is_file() else {}
    todo = [n for n in names if n not in done]
    if not todo:
        return {n: done[n] for n in names}
    runner = TailRunner(model, batches, names, loss_fn)
    items = progress_bar(todo, f"sensitivity ({method.name})", progress)
    from .modules import set_submodule

    for i, name in enumerate(items):
        module = targets[name]
        k, n, b = linear_shape(module)
        specs = method.candidates(k, n, b, opts)
        dense = k * n + n * b
        picked = sorted({min(range(len(specs)), key=lambda j: abs(method.spec_params(specs[j]) - f * dense))
                         for f in fractions}) if specs else []
        w, bias = dense_weight(module)
        w64 = w.detach().to(torch.float64)
        b64 = None if bias is None else bias.detach().to(torch.float64)
        start = runner.block_of(name)
        entry = {"params": [], "delta": []}
        for j in picked:
            with torch.no_grad():
                layer = method.project(w64, b64, specs[j], None if stats is None else stats[name], opts,
                                       layer_generator(seed, name))
            layer = layer.to(dtype=w.dtype, device=w.device).eval()
            set_submodule(model, name, layer)
            try:
                delta = runner.loss(start) - runner.base
            finally:
                set_submodule(model, name, module)
            entry["params"].append(method.spec_params(specs[j]))
            entry["delta"].append(delta)
        done[name] = entry
        if i % 10 == 9 or i == len(todo) - 1:
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"key": json.loads(key_src), "layers": done}))
            tmp.replace(path)
    return {n: done[n] for n in names}


# ------------------------------------------------------------------------------------ error curves

def weighted_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor,
                   cgrad: torch.Tensor | None = None) -> float:
    """tr(E C_x Eᵀ) / tr(W C_x Wᵀ) (relative squared output error) or, with C_g, ½ tr(E C_x Eᵀ C_g)."""
    E = weight - approx
    ec = E @ gram
    if cgrad is None:
        return (((ec * E).sum()) / ((weight @ gram) * weight).sum().clamp_min(1e-300)).clamp_min(0).item()
    return (0.5 * ((ec @ E.T) * cgrad).sum()).clamp_min(0).item()


def _lowrank_curve(weight, stats, opts, specs, cgrad):
    """All ranks at once for lowrank (any variant): with A = W T = U Σ Vᵀ and E_k = U_{>k} Σ_{>k} V_{>k}ᵀ T⁻¹,
    tr(E_k C Eᵀ_k C_g) = Σ_{i,j>k} σ_i σ_j M_ij Q_ji, M = Vᵀ T⁻¹ C T⁻ᵀ V, Q = Uᵀ C_g U (Q = I without C_g)."""
    from .methods.lowrank import decompose

    gram = stats.gram_mean().to(weight)
    U, S, Vh, undo = decompose(weight, opts.variant, stats, opts.alpha, opts.damp, getattr(stats, "name", ""))
    B = undo(Vh)                                   # rows v_iᵀ T⁻¹ (r × K)
    M = B @ gram @ B.T
    if cgrad is None:
        Z = torch.diag(S * S * M.diagonal())
        scale = 1.0 / ((weight @ gram) * weight).sum().clamp_min(1e-300)
    else:
        Q = U.T @ cgrad.to(weight) @ U
        Z = S[:, None] * S[None, :] * M * Q.T
        scale = 0.5
    # tail[k] = Σ_{i,j>=k} Z_ij via a reversed 2-D cumulative sum
    tail = Z.flip(0).flip(1).cumsum(0).cumsum(1).flip(0).flip(1).diagonal()
    tail = torch.cat([tail, tail.new_zeros(1)])
    return [float((tail[min(s.rank, len(tail) - 1)] * scale).clamp_min(0)) for s in specs]


FAST_CURVES = {"lowrank": _lowrank_curve}


def error_curve(method, weight: torch.Tensor, stats, opts, specs, cgrad: torch.Tensor | None = None,
                generator=None) -> list[float]:
    """The estimated error of `method` at each of `specs` (increasing size) for the (N × K) float64 `weight`:
    relative squared calibration output error, or with `cgrad` (C_g) the Fisher-weighted loss increase.
    Closed form where known (`FAST_CURVES`), else each candidate is projected, largest first (so methods
    that cache eigenvectors compute them once)."""
    if not specs:
        return []
    if stats is None or getattr(stats, "gram", None) is None:
        raise CalibrationError(f"{getattr(stats, 'name', 'a layer')}: error curves need calibration statistics")
    fast = FAST_CURVES.get(method.name)
    if fast is not None:
        return fast(weight, stats, opts, specs, cgrad)
    gram = stats.gram_mean().to(weight)
    out = {}
    for i in reversed(range(len(specs))):
        g = generator() if callable(generator) else (generator or torch.Generator().manual_seed(0))
        with torch.no_grad():
            layer = method.project(weight, None, specs[i], stats, opts, g)
            out[i] = weighted_error(weight, layer.to_dense().to(weight), gram, cgrad)
    return [out[i] for i in range(len(specs))]


# ------------------------------------------------------------------------------------ choices for allocation

MEASURE_BATCHES = 4   # calibration batches the measured sensitivity runs on


def estimate_choices(model: nn.Module, targets: dict[str, nn.Module], shapes: dict, mlist, stats_by_method: dict,
                     allocation: str, *, calib=None, cache: dict | None = None, seed: int = 0, loss_fn=None,
                     progress: bool = True, fractions=(0.3, 0.6), cache_dir=None) -> dict[str, list]:
    """name -> [budget.Choice] over every allowed method's candidate sizes, with errors on one scale:

    * "uniform" / "spectral": relative squared calibration output error ‖(W − Ŵ)X‖²/‖WX‖²;
    * "fisher": ½ tr(E C_x Eᵀ C_g), the second-order loss increase (`output_grad_grams`);
    * "measured": the relative error curves of every method, each layer's rescaled by α_l fitted (least
      squares through 0) to the loss increase measured for the first method at `fractions` of its size.

    `cache` (a dict) keeps curves and Grams across calls on the same dense model.
    """
    from .budget import choices_for
    from .compress import layer_generator

    cache = {} if cache is None else cache
    cgrad = None
    if allocation == "fisher":
        cgrad = cache.get(("cgrad",))
        if cgrad is None or any(n not in cgrad for n in targets):
            if calib is None:
                raise CalibrationError("allocation 'fisher' needs calibration data (a forward+backward pass)")
            cgrad = cache[("cgrad",)] = output_grad_grams(model, targets, calib, loss_fn=loss_fn, progress=progress)
    kind = "fisher" if allocation == "fisher" else "relative"
    curves = {}
    for m, o in mlist:
        key = ("curves", m.name, repr(o), kind)
        held = cache.setdefault(key, {})
        todo = [n for n in targets if n not in held]
        items = progress_bar(todo, f"error curves ({m.name})", progress and bool(todo))
        for name in items:
            specs = m.candidates(*shapes[name], o)
            st = None if stats_by_method.get(m.name) is None else stats_by_method[m.name][name]
            w, _ = dense_weight(targets[name])
            held[name] = error_curve(m, w.detach().to(torch.float64), st, o, specs,
                                     None if cgrad is None else cgrad[name],
                                     lambda: layer_generator(seed, name))
        curves[m.name] = held
    if allocation == "measured":
        ref, ref_opts = mlist[0]
        if calib is None:
            raise CalibrationError("allocation 'measured' needs calibration data")
        deltas = measure(model, targets, ref, ref_opts, stats_by_method.get(ref.name), list(calib)[:MEASURE_BATCHES],
                         fractions=fractions, seed=seed, loss_fn=loss_fn, cache_dir=cache_dir, progress=progress)
        scaled = {m.name: {} for m, _ in mlist}
        for name in targets:
            specs = ref.candidates(*shapes[name], ref_opts)
            at = {ref.spec_params(s): e for s, e in zip(specs, curves[ref.name][name])}
            e = [at.get(p, 0.0) for p in deltas[name]["params"]]
            d = deltas[name]["delta"]
            den = sum(x * x for x in e)
            alpha = max(sum(x * y for x, y in zip(e, d)) / den, 0.0) if den > 0 else 0.0
            alpha = max(alpha, 1e-12)
            for m, _ in mlist:
                scaled[m.name][name] = [alpha * v for v in curves[m.name][name]]
        curves = scaled
    return {name: [c for m, o in mlist for c in choices_for(name, shapes[name], m, o, curves[m.name][name])]
            for name in targets}
