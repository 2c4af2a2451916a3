"""ESPACE's layer-wise sensitivity, projection mixer and progressive selection, plus the reconstruction
analysis — automated versions of the paper's manual scripts.

* `sensitivity(model, stats, batches, ...)`: every *unit* (a layer, or a shared-P group such as q/k/v) is
  projected alone at the size nearest to `unit_keep` of its params, once per calibrator; the validation loss
  (token-weighted NLL on `batches`) is measured with only the blocks from that unit's on re-run
  (`structlin.sensitivity.TailRunner`). Results are cached as JSON, keyed by the weights, the batches, the
  unit size and the calibrator, so a rerun only computes what is missing.
* `mixer_plan(table, keep)`: the best calibrator per unit (the "projection mixer"), then units from least
  to most damaging (loss increase at their best calibrator) until the targeted params fit keep × dense;
  `apply_plan` projects exactly those units.
* `reconstruction_curves(stats, ranks)`: per layer, the relative error against L from the eigenvalues
  alone (no data pass): input MSE Σ_{i>L} λ_i(C_x) / Σ λ_i(C_x) (the `mse` calibrator's residual) and the
  best output error Σ_{i>L} σ_i² / Σ σ_i² of W C^½ (the `output` projection; for a shared group the stacked
  weight, i.e. the joint whitened fit).

Cost (SmolLM2-135M, 2 × 256 validation tokens, one CPU thread): units × calibrators partial forwards plus
one eigendecomposition per unit and calibrator; see docs/benchmarks/espace.md for the measured time.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from torch import nn

from .budget import dense_params
from .methods import espace as es
from .modules import dense_weight, linear_shape, set_submodule

DEFAULT_CALIBRATORS = ("mse/signed", "mse_l2/signed", "go/abs", "output/signed")


def units(stats: dict, share: bool = True) -> list[list[str]]:
    """The units ESPACE compresses as one: shared-P groups (with `share`) and single layers, in call order."""
    grouped = es.input_groups(stats) if share else []
    first = {g[0]: g for g in grouped}
    inside = {n for g in grouped for n in g}
    out = []
    for name in stats:
        if name in first:
            out.append(first[name])
        elif name not in inside:
            out.append([name])
    return out


def unit_specs(model: nn.Module, unit: list[str], keep: float) -> dict | None:
    """{name: spec} of the largest size of `unit` holding at most `keep` of its dense params (the smallest
    size if none does), or None if the unit has no structured form smaller than dense."""
    method = es.Espace()
    opts = method.Options()
    shapes = {n: linear_shape(model.get_submodule(n)) for n in unit}
    if len(unit) > 1:
        ladder = method.group_candidates(shapes, opts)
    else:
        ladder = [{unit[0]: s} for s in method.candidates(*shapes[unit[0]], opts)]
    if not ladder:
        return None
    dense = sum(dense_params(*shapes[n]) for n in unit)
    fits = [r for r in ladder if sum(method.spec_params(s) for s in r.values()) <= keep * dense]
    return fits[-1] if fits else ladder[0]


def project_unit(model: nn.Module, stats: dict, specs: dict, calibrator: str, share: bool = True) -> dict:
    """Projected layers {name: EspaceLinear} (in the model's dtype) of one unit with one calibrator ("cal/order"
    or "auto"); the shared ones are linked to their owner."""
    method = es.Espace()
    cal, _, order = calibrator.partition("/")
    opts = method.Options(calibrator=cal, order=order or "abs", share=share)
    layers = {}
    for name, spec in specs.items():
        module = model.get_submodule(name)
        w, b = dense_weight(module)
        with torch.no_grad():
            layer = method.project(w.detach().double(), None if b is None else b.detach().double(), spec,
                                   stats[name], opts, torch.Generator())
        layers[name] = layer.to(dtype=w.dtype, device=w.device).eval()
    for layer in layers.values():
        if not layer.spec.owns_p:
            layer.__dict__["_p_link"][0] = layers[layer.spec.p_owner]
            layer.__dict__["_p_tmp"] = None
    return layers


def _fingerprint(model, names, batches) -> str:
    from .sensitivity import _batches_key, fingerprint

    return fingerprint(model, names) + _batches_key(batches)


def sensitivity(model: nn.Module, stats: dict, batches, *, unit_keep: float = 0.4,
                calibrators=DEFAULT_CALIBRATORS, share: bool = True, cache: str | Path | None = None,
                progress: bool = True) -> dict:
    """{"base": dense validation loss, "units": {first name: {"members", "params", "dense", "loss": {cal: loss}}},
    "seconds"}: one unit at a time × each calibrator (see the module docstring). `cache`: a JSON path."""
    from .calibrate.collect import progress_bar
    from .sensitivity import TailRunner

    groups = units(stats, share)
    names = [n for g in groups for n in g]
    key = hashlib.sha256(json.dumps({"fp": _fingerprint(model, names, batches), "unit_keep": unit_keep,
                                     "share": share}).encode()).hexdigest()[:20]
    path = Path(cache) if cache is not None else None
    table = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    if table.get("key") != key:
        table = {"key": key, "unit_keep": unit_keep, "units": {}, "seconds": 0.0}
    todo = [(g, c) for g in groups for c in calibrators
            if c not in table["units"].get(g[0], {}).get("loss", {})]
    if not todo:
        return table
    t0 = time.perf_counter()
    runner = TailRunner(model, batches, names)
    table["base"] = runner.base
    originals = {n: model.get_submodule(n) for n in names}

    def save():
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(table, indent=1))
            tmp.replace(path)

    for i, (unit, cal) in enumerate(progress_bar(todo, "espace sensitivity", progress)):
        specs = unit_specs(model, unit, unit_keep)
        if specs is None:
            continue
        entry = table["units"].setdefault(unit[0], {
            "members": unit, "params": sum(es.Espace().spec_params(s) for s in specs.values()),
            "dense": sum(dense_params(*linear_shape(originals[n])) for n in unit),
            "rank": next(iter(specs.values())).rank, "loss": {}})
        layers = project_unit(model, stats, specs, cal, share)
        for n, layer in layers.items():
            set_submodule(model, n, layer)
        try:
            entry["loss"][cal] = runner.loss(runner.block_of(unit[0]))
        finally:
            for n in layers:
                set_submodule(model, n, originals[n])
        if i % 20 == 19:
            table["seconds"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            save()
    table["seconds"] += time.perf_counter() - t0
    save()
    return table


def mixer_plan(table: dict, keep: float, targeted: int | None = None) -> dict:
    """{"units": {first name: calibrator}, "kept": params of the targeted layers after, "budget",
    "order": [(first name, calibrator, loss increase)]}: best calibrator per unit, then units from least
    to most damaging until kept ≤ keep × targeted (targeted: dense params of all targeted layers; default
    the units of the table)."""
    base = table["base"]
    ranked = []
    for first, e in table["units"].items():
        if not e["loss"]:
            continue
        cal = min(e["loss"], key=e["loss"].get)
        ranked.append((e["loss"][cal] - base, first, cal))
    ranked.sort()
    targeted = targeted if targeted is not None else sum(e["dense"] for e in table["units"].values())
    budget = int(keep * targeted + 1e-9)
    kept, chosen, order = targeted, {}, []
    for delta, first, cal in ranked:
        if kept <= budget:
            break
        e = table["units"][first]
        kept -= e["dense"] - e["params"]
        chosen[first] = cal
        order.append((first, cal, delta))
    return {"units": chosen, "kept": kept, "budget": budget, "order": order}


def apply_plan(model: nn.Module, stats: dict, table: dict, plan: dict, share: bool = True) -> int:
    """Project the plan's units into `model` (in place); returns the number of layers replaced."""
    n = 0
    for first, cal in plan["units"].items():
        unit = table["units"][first]["members"]
        specs = unit_specs(model, unit, table["unit_keep"])
        for name, layer in project_unit(model, stats, specs, cal, share).items():
            set_submodule(model, name, layer)
            n += 1
    es.link_shared(model)
    return n


# ------------------------------------------------------------------------------ reconstruction analysis

def reconstruction_curves(stats: dict, ranks=None, share: bool = True) -> dict:
    """{first name of a unit: {"members", "ranks", "input_mse", "output"}}: relative squared errors at each L
    from the eigenvalues of the calibration statistics and the dense weights (no data pass)."""
    out = {}
    for unit in units(stats, share):
        st = stats[unit[0]]
        C = st.mean("gram")
        lam = torch.linalg.eigvalsh(C).flip(0).clamp_min(0)
        W = es.group_weights(st)
        Ws = torch.cat([W[n] for n in unit])
        from .methods.lowrank import damped_cholesky

        R = damped_cholesky(C, 1e-10, unit[0])
        sig2 = torch.linalg.eigvalsh(R.T @ Ws.T @ Ws @ R).flip(0).clamp_min(0)
        k = C.shape[0]
        rs = list(ranks) if ranks is not None else list(range(0, k + 1, max(1, k // 32)))
        rs = [r for r in rs if r <= k]
        out[unit[0]] = {
            "members": unit, "ranks": rs,
            "input_mse": [(lam[r:].sum() / lam.sum()).item() for r in rs],
            "output": [(sig2[r:].sum() / sig2.sum()).item() for r in rs]}
    return out
