"""Which modules to compress.

Forms accepted for `targets` and `exclude` (PEFT conventions, plus ESPACE's expressions):

* ``"all-linear"``  every nn.Linear / transformers Conv1D except the output head (targets only);
* a list            each entry matches a name exactly or as a dotted suffix ("q_proj" matches
                    "model.layers.0.self_attn.q_proj");
* a regex string    full match on the dotted module name;
* an ESPACE expression ``a__AND__b__OR__c__NOT__d``: plain substring tests, AND binds tightest, one NOT
                    at most ("(a and b) or c, and not d"). Beware: "layers.1" is a substring of "layers.10".

A list given as `exclude` also drops everything inside a listed module: ``exclude=["pooler"]`` drops
"pooler.dense", ``exclude=["layers.0"]`` every linear of block 0 (an entry matches a module or any of its
parents, exactly or as a dotted suffix).

`layers` keeps only modules inside the given transformer blocks (``layer.N.``, ``layers.N.``, ``h.N.``,
``block(s).N.``). `select` returns name -> module in model order; zero matches is an error.
"""
from __future__ import annotations

import re
from typing import Callable

from torch import nn

from .errors import TargetError
from .modules import is_linear, linear_shape

_BLOCK = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)(?:\.|$)")


def block_index(name: str) -> int | None:
    """Index of the transformer block a module name lives in, or None."""
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


def espace_matcher(expr: str) -> Callable[[str], bool]:
    """Compile an ESPACE name expression into a predicate on module names."""
    if expr.count("__NOT__") > 1:
        raise TargetError(f"ESPACE expression {expr!r} has more than one __NOT__; at most one is allowed")
    pos, _, neg = expr.partition("__NOT__")

    def side(text):
        disjuncts = [[p for p in d.split("__AND__")] for d in text.split("__OR__")]
        for d in disjuncts:
            if any(p == "" for p in d) and text != "":
                raise TargetError(f"ESPACE expression {expr!r} has an empty operand next to __AND__/__OR__")
        return disjuncts

    pos_d, neg_d = side(pos), side(neg) if neg else []

    def hit(disjuncts, name):
        return any(all(p in name for p in d) for d in disjuncts)

    return lambda name: (pos == "" or hit(pos_d, name)) and not (neg_d and hit(neg_d, name))


def name_matcher(spec) -> Callable[[str], bool]:
    """Predicate for a list of names/suffixes, a regex, or an ESPACE expression."""
    if isinstance(spec, str):
        if any(op in spec for op in ("__AND__", "__OR__", "__NOT__")):
            return espace_matcher(spec)
        rx = re.compile(spec)
        return lambda name: rx.fullmatch(name) is not None
    entries = list(spec)
    return lambda name: any(name == e or name.endswith("." + e) for e in entries)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head(s): the module returned by get_output_embeddings, and any 'lm_head'."""
    heads = set()
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    for name, mod in model.named_modules():
        if (head is not None and mod is head) or name.split(".")[-1] == "lm_head":
            heads.add(name)
    return heads


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every dense linear-like module of the model, by dotted name, in model order.

    The inner factors of structured layers (e.g. a low-rank layer's `down`/`up`) are not included: a
    structured layer is compressed already.
    """
    from .methods.base import StructuredLinear

    inside = tuple(n + "." for n, m in model.named_modules() if isinstance(m, StructuredLinear))
    return {n: m for n, m in model.named_modules() if n and is_linear(m) and not n.startswith(inside or ("\0",))}


def select(model: nn.Module, targets="all-linear", exclude=None, layers=None) -> dict[str, nn.Module]:
    """The modules `targets` / `exclude` / `layers` pick out, by name, in model order."""
    candidates = linear_modules(model)
    if targets == "all-linear":
        heads = output_head_names(model)
        chosen = {n: m for n, m in candidates.items() if n not in heads}
    else:
        match = name_matcher(targets)
        chosen = {n: m for n, m in candidates.items() if match(n)}
    if exclude:
        drop = name_matcher(exclude)
        if not isinstance(exclude, str):          # a listed module excludes its children too
            own = drop

            def drop(name):
                parts = name.split(".")
                return any(own(".".join(parts[:i])) for i in range(1, len(parts) + 1))
        chosen = {n: m for n, m in chosen.items() if not drop(n)}
    if layers is not None:
        wanted = set(layers)
        chosen = {n: m for n, m in chosen.items() if block_index(n) in wanted}
    if not chosen:
        sample = list(candidates)[:12] or [n for n, _ in model.named_modules() if n][:12]
        kind = "linear modules" if candidates else "modules (the model has no nn.Linear/Conv1D)"
        raise TargetError(
            f"targets={targets!r} exclude={exclude!r} layers={layers!r} matched no module of "
            f"{type(model).__name__}; its {kind} include: {', '.join(sample)}")
    return chosen


def dry_run(model: nn.Module, cfg) -> list[dict]:
    """What `compress(model, cfg)` would touch: one row per matched module with its shape."""
    rows = []
    for name, mod in select(model, cfg.targets, cfg.exclude, cfg.layers).items():
        k, n, b = linear_shape(mod)
        rows.append({"name": name, "type": type(mod).__name__, "in_features": k, "out_features": n,
                     "bias": b, "params": k * n + n * b})
    return rows


def format_dry_run(rows: list[dict]) -> str:
    width = max(len(r["name"]) for r in rows)
    lines = [f"{'module':<{width}}  {'type':<8} {'in':>6} {'out':>6} {'params':>10}"]
    lines += [f"{r['name']:<{width}}  {r['type']:<8} {r['in_features']:>6} {r['out_features']:>6} "
              f"{r['params']:>10,}" for r in rows]
    lines.append(f"{len(rows)} modules, {sum(r['params'] for r in rows):,} params")
    return "\n".join(lines)
