"""Layer selection by measured sensitivity: which blocks (or layers) to compress, and which to keep dense.

`rank` replaces one unit at a time — a transformer block (all its targeted linears) or a single linear — by
its projection onto the method at a fixed size, measures the mean validation loss on a few batches (only the
blocks from that unit's block on are rerun, via `sensitivity.TailRunner`), restores the dense unit, and
returns the units sorted from least to most sensitive (loss increase). `choose` walks that ranking and
compresses the least sensitive units until the targeted parameters fall to a keep budget; `compress_ranked`
applies the choice with `structlin.compress`. This automates the SS1 paper's recipe ("compress one layer at a
time on a calibration set, keep the worst dense").

    ranking = rank(model, "ss1", {"r": 4}, calib, val, unit="block")
    names = choose(ranking, keep=0.5)            # layers to compress
    compress_ranked(model, ranking, keep=0.5, calib=calib)

The ranking is a plain dict (JSON-serialisable): method, options, layer_keep, unit, base_loss and `units`
(list of {"unit", "names", "dense_params", "params", "delta"}), least sensitive first.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from . import budget, methods, targeting
from .calibrate import collect
from .config import CompressConfig
from .errors import ConfigError
from .modules import dense_weight, linear_shape, set_submodule


def rank(model: nn.Module, method: str, options: dict | None, calib, val, *, unit: str = "block",
         targets="all-linear", exclude=None, layer_keep: float | None = None, seed: int = 0, loss_fn=None,
         progress: bool = True) -> dict:
    """Measure the validation-loss increase of compressing each unit alone (see the module docstring).

    calib: batches for the input statistics (data-aware projections); val: batches the loss is measured on.
    layer_keep: the per-layer size (fraction of its dense params) the method is projected at; default 1/r for
    SS1 with `r` set, else 0.5. loss_fn(outputs, batch): for models without a language-modelling loss.
    """
    from .compress import layer_generator
    from .sensitivity import TailRunner

    if unit not in ("block", "layer"):
        raise ConfigError(f"rank: unit must be 'block' or 'layer', got {unit!r}")
    options = dict(options or {})
    m = methods.get(method)
    opts = CompressConfig(method=method, keep=0.5, options=options).method_list()[0][1]  # validates options
    if layer_keep is None:
        layer_keep = 1.0 / options["r"] if method == "ss1" and options.get("r") else 0.5
    chosen = targeting.select(model, targets, exclude)
    shapes = {n: linear_shape(mod) for n, mod in chosen.items()}
    specs = {}
    for name, (k, n, b) in shapes.items():
        cands = m.candidates(k, n, b, opts)
        fits = [c for c in cands if m.spec_params(c) <= layer_keep * budget.dense_params(k, n, b) * 1.01 + n + k]
        specs[name] = (fits[-1] if fits else cands[0]) if cands else None
    stats = collect(model, chosen, list(calib), {"gram"} | m.stats_needed(opts), progress) if calib is not None \
        else None
    runner = TailRunner(model, list(val), list(chosen), loss_fn)
    groups: dict[str, list[str]] = {}
    for name in chosen:
        if specs.get(name) is None:
            continue
        b = runner.block_of(name)
        key = name if unit == "layer" or b is None else f"{runner.prefix}.{b}"
        groups.setdefault(key, []).append(name)
    from .calibrate.collect import progress_bar

    units = []
    for key, names in progress_bar(list(groups.items()), f"sensitivity ({method})", progress):
        saved = {}
        params = dense = 0
        for name in names:
            module = chosen[name]
            w, b = dense_weight(module)
            spec = specs[name]
            with torch.no_grad():
                layer = m.project(w.detach().to(torch.float64), None if b is None else b.detach().to(torch.float64),
                                  spec, None if stats is None else stats[name], opts, layer_generator(seed, name))
            layer = layer.to(dtype=w.dtype, device=w.device).eval()
            saved[name] = module
            set_submodule(model, name, layer)
            params += m.spec_params(spec)
            dense += budget.dense_params(*shapes[name])
        starts = [runner.block_of(n) for n in names]
        start = None if any(s is None for s in starts) else min(starts)
        try:
            delta = runner.loss(start) - runner.base
        finally:
            for name, module in saved.items():
                set_submodule(model, name, module)
        units.append({"unit": key, "names": names, "dense_params": dense, "params": params, "delta": delta})
    units.sort(key=lambda u: u["delta"])
    return {"method": method, "options": options, "layer_keep": layer_keep, "unit": unit,
            "base_loss": runner.base, "targeted_params": sum(budget.dense_params(*s) for s in shapes.values()),
            "units": units}


def choose(ranking: dict, keep: float) -> list[str]:
    """Layer names to compress: the least sensitive units first, until the targeted params (dense units count
    fully, compressed ones at their projected size) are at most `keep` of their dense total. A unit whose
    loss decreased counts as least sensitive; if every unit is compressed and keep is still not reached,
    all are returned."""
    if not 0 < keep <= 1:
        raise ConfigError(f"choose: keep must be in (0, 1], got {keep}")
    total = sum(u["dense_params"] for u in ranking["units"])
    now = total
    names: list[str] = []
    for u in ranking["units"]:
        if now <= keep * total:
            break
        names += u["names"]
        now -= u["dense_params"] - u["params"]
    return names


def compress_ranked(model: nn.Module, ranking: dict, keep: float, calib=None, **kw):
    """`structlin.compress` the layers `choose(ranking, keep)` picks, with the ranking's method and options,
    each at the ranking's per-layer size. Returns the Report."""
    from .compress import compress

    names = choose(ranking, keep)
    if not names:
        raise ConfigError(f"keep={keep} needs no layer compressed (every unit dense is already within budget)")
    units = [u for u in ranking["units"] if set(u["names"]) <= set(names)]
    frac = sum(u["params"] for u in units) / max(1, sum(u["dense_params"] for u in units))
    # each chosen layer at the ranked size: a keep just above that fraction (SS1 with r set has one size)
    cfg = CompressConfig(method=ranking["method"], keep=min(1.0, frac + 1e-6), targets=names,
                         options=ranking["options"])
    return compress(model, cfg, calib=calib, **kw)


def to_markdown(ranking: dict, title: str = "") -> str:
    lines = [f"# Sensitivity ranking{': ' + title if title else ''}", "",
             f"Method `{ranking['method']}` options {json.dumps(ranking['options'])}, each {ranking['unit']} "
             f"compressed alone at {ranking['layer_keep']:.3f} of its params; validation loss "
             f"{ranking['base_loss']:.4f} dense. Least sensitive first.", "",
             "| rank | unit | layers | params (dense → compressed) | Δ loss |", "|---:|---|---:|---|---:|"]
    for i, u in enumerate(ranking["units"]):
        lines.append(f"| {i + 1} | {u['unit']} | {len(u['names'])} | {u['dense_params']:,} → {u['params']:,} | "
                     f"{u['delta']:+.4f} |")
    return "\n".join(lines) + "\n"


def plot(ranking: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units = ranking["units"]
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(units) + 1.5))
    ax.barh(range(len(units)), [u["delta"] for u in units], color="tab:blue")
    ax.set_yticks(range(len(units)), [u["unit"] for u in units], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("validation loss increase when compressed alone")
    ax.set_title(f"{ranking['method']} {json.dumps(ranking['options'])}: sensitivity per {ranking['unit']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(ranking: dict, out_dir, title: str = "") -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sensitivity.json").write_text(json.dumps(ranking, indent=1))
    (out / "sensitivity.md").write_text(to_markdown(ranking, title))
    plot(ranking, out / "sensitivity.png")
    return out


def load(path) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "sensitivity.json"
    try:
        r = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read a sensitivity ranking from {path}: {e}") from None
    if not isinstance(r, dict) or "units" not in r or "method" not in r:
        raise ConfigError(f"{path} is not a structlin sensitivity ranking (no 'units'/'method')")
    return r
