"""The pipeline: select -> calibrate -> allocate -> project -> replace, returning a `Report`.

`compress` knows no method by name: it asks the registry for the method's options, candidate sizes,
statistics and projection. Modules are replaced in place.
"""
from __future__ import annotations

import time
import warnings
import zlib

import torch
from torch import nn

from . import budget, methods, targeting
from .calibrate import collect, run_sequential
from .config import MIXED, CompressConfig
from .errors import CalibrationError, ConfigError
from .methods.base import Method, StructuredLinear
from .modules import dense_weight, linear_shape, set_submodule
from .report import LayerRow, Report


def layer_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator private to one layer: same seed and name -> same numbers, on every run."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def relative_errors(weight: torch.Tensor, approx: torch.Tensor, stats) -> tuple[float, float | None]:
    """(‖W − Ŵ‖/‖W‖, ‖(W − Ŵ)X‖/‖WX‖) with the second from the calibration Gram, in float64."""
    err = weight - approx
    werr = (err.norm() / weight.norm().clamp_min(1e-300)).item()
    if stats is None or stats.gram is None:
        return werr, None
    g = stats.gram_mean().to(weight)
    num = ((err @ g) * err).sum()
    den = ((weight @ g) * weight).sum().clamp_min(1e-300)
    return werr, (num.clamp_min(0) / den).sqrt().item()


def linear_flops_per_token(model: nn.Module) -> int:
    """FLOPs per token of every linear layer (structured ones by their own count)."""
    total = sum(m.flops(1) for m in model.modules() if isinstance(m, StructuredLinear))
    for m in targeting.linear_modules(model).values():
        k, n, _ = linear_shape(m)
        total += budget.dense_flops(k, n)
    return total


def model_size(model: nn.Module) -> tuple[int, int]:
    """(stored values, bytes) counting tied tensors once; structured layers' stored buffers (e.g. ESPACE's
    projection P) count as their `num_params` says."""
    tensors = {id(p): p for p in model.parameters()}
    for m in model.modules():
        if isinstance(m, StructuredLinear):
            extra = m.num_params() - sum(p.numel() for p in m.parameters())
            if extra:
                tensors.update({id(b): b for b in m.buffers(recurse=False)})
    return sum(t.numel() for t in tensors.values()), sum(t.numel() * t.element_size() for t in tensors.values())


def compress(model: nn.Module, cfg: CompressConfig, calib=None, *, stats: dict | None = None,
             loss_fn=None, progress: bool = True, cache: dict | None = None, offload: bool = False,
             exec_device=None) -> Report:
    """Replace the targeted linear layers of `model` in place with `cfg.method` structures.

    calib: an iterable of batches (an `input_ids` tensor, or a dict of model kwargs with `attention_mask`)
           used to collect input statistics; needed by data-aware projections and for the report's output
           error. stats: statistics from an earlier `calibrate.collect` on the same dense model (reused
           instead of a new pass; not allowed in sequential mode). loss_fn: `loss_fn(outputs, batch)` for
           methods whose statistics need gradients (ESPACE `nl`) on models without a built-in loss.
    offload, exec_device: sequential mode only — keep cached activations on the CPU, and run each block
           on `exec_device` (e.g. "cuda") while the model stays where it is (a model larger than the GPU).
    cache: a dict the caller keeps across calls on the same dense model (as `structlin sweep` does): the
           statistics, error curves, gradient Grams and rank-independent factorizations (lowrank's SVD) are
           computed once and reused at every keep. It holds about twice the targeted weights in float64.
    """
    if not isinstance(cfg, CompressConfig):
        raise ConfigError(f"cfg must be a structlin.CompressConfig, got {type(cfg).__name__}")
    t0 = time.perf_counter()
    mixed = cfg.method == MIXED
    mlist = [(methods.get(n), o) for n, o in cfg.method_list()]
    method, opts = mlist[0]
    targets = targeting.select(model, cfg.targets, cfg.exclude, cfg.layers)
    shapes = {n: linear_shape(m) for n, m in targets.items()}
    needs = set().union(*(m.stats_needed(o) for m, o in mlist))
    sequential = method.sequential(opts)
    if mixed and any(m.sequential(o) for m, o in mlist):
        raise ConfigError("method 'mixed' does not run in sequential mode; drop sequential=true from its methods")
    if needs and calib is None and stats is None:
        raise CalibrationError(f"method '{cfg.method}' with options {cfg.options} needs calibration data: "
                               f"pass calib=[batches of input_ids]")
    if cfg.allocation in ("fisher", "measured") and calib is None:
        raise CalibrationError(f"allocation '{cfg.allocation}' runs the model on calibration data: pass calib=...")
    if sequential and stats is not None and cfg.allocation == "uniform":
        raise ConfigError("sequential mode calibrates on the compressed model as it goes: pass calib, not stats")
    if calib is not None or stats is not None:
        needs = needs | {"gram"}  # the report's output error comes from the Gram at no extra pass
    keep_factors = cache is not None   # a caller-held cache also keeps rank-independent factorizations
    cache = {} if cache is None else cache
    if sequential or mixed or cfg.allocation != "uniform":
        calib = None if calib is None else list(calib)  # may be read more than once

    def stats_of(m, o, modules):
        """Statistics for method m: the given ones, else one pass per distinct collector (cached)."""
        if stats is not None:
            return stats
        if calib is None:
            return None
        key = ("stats", m.name, repr(o)) if type(m).collect is not Method.collect else ("stats", "default")
        held = cache.get(key)
        if held is None or any(n not in held for n in modules):
            want = needs | set().union(*(mm.stats_needed(oo) for mm, oo in mlist))
            if key[1] == "default":
                from .calibrate import collect as collect_stats

                held = collect_stats(model, modules, calib, want, progress)
            else:
                held = m.collect(model, modules, calib, o, progress=progress, loss_fn=loss_fn)
            cache[key] = held
            if keep_factors and isinstance(held, dict):
                store = cache.setdefault(("factors",), {})
                for st in held.values():
                    st.factors = store
        return held

    per_method_stats: dict = {}
    if cfg.allocation == "uniform" and not mixed:
        groups = None   # layers sharing part of their structure (ESPACE: one P for q/k/v), sized as one unit
        if hasattr(method, "input_groups") and not sequential and (stats is not None or calib is not None):
            groups = method.input_groups(stats_of(method, opts, targets), opts)
        plan = budget.allocate_uniform(shapes, method, opts, cfg.keep, groups=groups)
    else:
        from . import sensitivity

        for m, o in mlist:
            per_method_stats[m.name] = stats_of(m, o, targets)
        choices = sensitivity.estimate_choices(model, targets, shapes, mlist, per_method_stats, cfg.allocation,
                                               calib=calib, cache=cache, seed=cfg.seed, loss_fn=loss_fn,
                                               progress=progress)
        if cfg.allocation == "uniform":
            plan = budget.allocate_mixed_uniform(shapes, choices, cfg.keep)
        else:
            plan = budget.allocate_curves(shapes, choices, cfg.keep, floor=cfg.floor * cfg.keep)
        if sequential:
            stats = None  # projection still sees the compressed model's activations, block by block
            per_method_stats = {}

    params_before, _ = model_size(model)
    flops_before = linear_flops_per_token(model)
    todo = {n: targets[n] for n in targets if plan.specs[n] is not None}
    by_name = {m.name: (m, o) for m, o in mlist}
    rows: dict[str, LayerRow] = {}
    tokens = 0
    starved: list[str] = []  # layers that saw fewer calibration tokens than input features

    def replace(name: str, st) -> None:
        nonlocal tokens
        module, spec = targets[name], plan.specs[name]
        m, o = by_name[plan.methods.get(name) or method.name]
        w, b = dense_weight(module)
        w64 = w.detach().to(torch.float64)
        b64 = None if b is None else b.detach().to(torch.float64)
        with torch.no_grad():
            layer = m.project(w64, b64, spec, st, o, layer_generator(cfg.seed, name))
            werr, oerr = relative_errors(w64, layer.to_dense().to(torch.float64), st)
        layer = layer.to(dtype=w.dtype, device=w.device).train(module.training)
        layer.requires_grad_(w.requires_grad)
        set_submodule(model, name, layer)
        tokens = max(tokens, st.tokens if st is not None else 0)
        k, n, _ = shapes[name]
        if st is not None and st.tokens < k:
            starved.append(name)
        rows[name] = LayerRow(name, k, n, f"{m.name} " + spec_summary(spec),
                              budget.dense_params(*shapes[name]), m.spec_params(spec),
                              m.spec_flops(spec), werr, oerr)

    if sequential:
        calib = list(calib)

        def on_block(_, block_stats):
            for name, st in block_stats.items():
                replace(name, st)

        rest = run_sequential(model, todo, calib, needs, on_block, offload=offload, progress=progress,
                              exec_device=exec_device)
        if rest:
            late = collect(model, {n: targets[n] for n in rest}, calib, needs, progress)
            for name in rest:
                replace(name, late[name])
    else:
        for m, o in mlist:
            if m.name not in per_method_stats:
                used_by = {n: todo[n] for n in todo if (plan.methods.get(n) or method.name) == m.name}
                per_method_stats[m.name] = stats_of(m, o, used_by) if used_by else None
        for m_name, st_all in per_method_stats.items():
            if st_all is None:
                continue
            missing = [n for n in todo if (plan.methods.get(n) or method.name) == m_name and n not in st_all]
            if missing:
                raise CalibrationError(f"the given stats lack modules {missing[:6]}; collect them with the same "
                                       f"targets")
        stats = per_method_stats
        items = todo
        if progress:
            from tqdm.auto import tqdm

            items = tqdm(todo, desc=f"projecting ({cfg.method})", leave=False)
        for name in items:
            st_all = stats.get(plan.methods.get(name) or method.name)
            replace(name, None if st_all is None else st_all[name])

    for m, _ in mlist:
        if hasattr(m, "link"):  # structures whose layers share tensors (ESPACE's shared P) connect them
            m.link(model)
    for name in targets:
        if name not in rows:
            k, n, b = shapes[name]
            rows[name] = LayerRow(name, k, n, "dense", budget.dense_params(k, n, b), budget.dense_params(k, n, b),
                                  budget.dense_flops(k, n), 0.0, 0.0, note=plan.reasons.get(name, ""))
    if starved:
        warnings.warn(f"{len(starved)} layer(s) saw fewer calibration tokens ({tokens}) than input features, so "
                      f"their input Gram is rank-deficient and data-aware projection may overfit the calibration "
                      f"data (e.g. {starved[0]}); pass more calibration tokens", stacklevel=2)
        for name in starved:
            rows[name].note = "few calibration tokens"
    params_after, bytes_after = model_size(model)
    history = getattr(model, "structlin_history", [])
    history.append(cfg.to_dict())
    model.structlin_history = history
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return Report(method=cfg.method, keep=cfg.keep, rows=[rows[n] for n in targets], budget=plan.budget,
                  model_params_before=params_before, model_params_after=params_after, bytes_after=bytes_after,
                  dtype=str(dtype).replace("torch.", ""), linear_flops_before=flops_before,
                  linear_flops_after=linear_flops_per_token(model), seconds=time.perf_counter() - t0,
                  calibration_tokens=tokens)


def spec_summary(spec) -> str:
    return " ".join(f"{k}={v}" for k, v in spec.to_dict().items() if k not in ("in_features", "out_features", "bias"))
