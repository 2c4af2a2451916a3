"""Whole-model speed: prefill and decode tokens/s of a Llama-architecture model, dense vs each structure.

    structlin bench model --preset llama-1b --methods lowrank,ss1,espace --keep 0.5   (on a CUDA GPU)

The model is built from a config with random weights (nothing downloaded): `llama-1b` is TinyLlama-1.1B's
shape (hidden 2048, MLP 5632, 22 blocks, 32 heads / 4 KV heads, vocab 32000); `llama3-8b` is Llama-3-8B's
block shape with as many blocks as `--layers` says. Structured variants replace every decoder linear
(not the head) with layers of the sizes `compress` would choose at `keep` (uniform allocation), filled
with random values: timing does not depend on the values.

What is timed (CUDA events around CUDA-graph replays; eager where a graph cannot be captured, and the
table says so):
* prefill: one forward over (batch × seq) new tokens without a cache, logits for the last token only
  (what generation needs);
* decode: one step of one new token per sequence against a static KV cache holding `--context` tokens.

"served" rows run after `structlin.serve.prepare_for_serving`: sibling fusion (q/k/v and gate/up as one
wide layer — dense: stacked weights; SS1: one sketch + one GEMM; low-rank / ESPACE: one stacked inner
GEMM), RMSNorm and SiLU·mul as single compiled kernels, causal prefill on FlashAttention. Correctness:
each fast variant's last-token logits are compared with the same weights run eagerly and unprepared on
the reference path (relative L2 error), on a float32 copy (where the two must agree to rounding) and
in bf16 (where random networks amplify rounding noise to a few per cent).

The per-layer share: the decoder linears alone (same shapes, same fusion, one CUDA graph over a block's
linears × blocks) as a share of the prefill time; `ideal` = the rest of the model + the dense linear time
× the FLOPs ratio — what a structure could reach if its linears ran at dense efficiency.
"""
from __future__ import annotations

import copy
import inspect
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .graphs import capture

PRESETS = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=32000),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}
DEFAULT_OPTIONS = {"lowrank": {"variant": "svd"}, "ss1": {"r": 2}, "espace": {"calibrator": "mse"}}


def build_model(preset: str, layers: int | None = None, device="cuda", dtype=torch.bfloat16, seed: int = 0):
    import transformers

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    kw = dict(PRESETS[preset])
    if layers:
        kw["num_hidden_layers"] = layers
    cfg = transformers.LlamaConfig(max_position_embeddings=8192, attn_implementation="sdpa", **kw)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg).to(dtype)
    fill_random(model, gen)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@torch.no_grad()
def fill_random(module: nn.Module, gen: torch.Generator) -> None:
    """Every floating parameter/buffer: N(0, 1/fan_in) for matrices, 1 for norm weights, 0 for biases;
    rotary buffers are left alone."""
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if not t.is_floating_point() or "rotary" in name or "inv_freq" in name:
            continue
        if t.dim() >= 2:
            fan_in = t.shape[0] if name.endswith(".P") else t.shape[-1]
            t.copy_((torch.randn(t.shape, generator=gen) / math.sqrt(fan_in)).to(t))
        elif "norm" in name:
            t.fill_(1.0)
        else:
            t.zero_()


@torch.no_grad()
def structure_random(model: nn.Module, method: str, keep: float, options: dict | None = None, seed: int = 1):
    """Replace the decoder linears by `method` layers of the sizes `compress` picks at `keep` (uniform),
    with random values. Returns (targeted params, params kept, dense linear FLOPs/token, structured)."""
    from .. import methods, targeting
    from ..budget import allocate_uniform
    from ..config import parse_options
    from ..modules import linear_shape, set_submodule

    m = methods.get(method)
    opts = parse_options(m.Options, options or DEFAULT_OPTIONS.get(method, {}), method)
    targets = targeting.select(model)
    shapes = {n: linear_shape(mod) for n, mod in targets.items()}
    plan = allocate_uniform(shapes, m, opts, keep)
    gen = torch.Generator().manual_seed(seed)
    dense_flops = struct_flops = 0
    for name, mod in targets.items():
        k, n, _ = shapes[name]
        dense_flops += 2 * k * n
        spec = plan.specs[name]
        if spec is None:
            struct_flops += 2 * k * n
            continue
        w = mod.weight
        layer = m.build(spec, dtype=w.dtype, device=w.device)
        fill_random(layer, gen)
        if hasattr(layer, "refresh"):
            layer.refresh()
        layer.eval()
        set_submodule(model, name, layer)
        struct_flops += m.spec_flops(spec)
    return plan.targeted, plan.used, dense_flops, struct_flops


# ------------------------------------------------------------------------------------------- timing

def _logits_kw(model) -> dict:
    params = inspect.signature(model.forward).parameters
    if "logits_to_keep" in params:
        return {"logits_to_keep": 1}
    if "num_logits_to_keep" in params:
        return {"num_logits_to_keep": 1}
    return {}


class Runner:
    """fn() captured in a CUDA graph when possible (else run eagerly); `mode` says which."""

    def __init__(self, fn, use_graph: bool):
        self.fn, self.mode, self.graph = fn, "eager", None
        if use_graph and torch.cuda.is_available():
            try:
                self.graph, self.out = capture(fn, warm=2)
                self.mode = "graph"
            except Exception as e:  # noqa: BLE001 — report and fall back to eager
                self.mode = f"eager ({type(e).__name__})"
                torch.cuda.synchronize()

    def __call__(self):
        if self.graph is not None:
            self.graph.replay()
            return self.out
        return self.fn()


def time_ms(run, warmup: int = 3, iters: int = 10, reps: int = 5) -> float:
    """Median over `reps` of the mean time of `iters` back-to-back calls (CUDA events; wall clock on CPU)."""
    for _ in range(warmup):
        run()
    out = []
    for _ in range(reps):
        if torch.cuda.is_available():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(iters):
                run()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / iters)
        else:
            t = time.perf_counter()
            for _ in range(iters):
                run()
            out.append((time.perf_counter() - t) * 1e3 / iters)
    return statistics.median(out)


@torch.no_grad()
def prefill_runner(model, batch: int, seq: int, device, use_graph: bool, seed: int = 0):
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device,
                        generator=torch.Generator(device=device).manual_seed(seed))
    kw = _logits_kw(model)
    return Runner(lambda: model(input_ids=ids, use_cache=False, **kw).logits, use_graph), ids


@torch.no_grad()
def decode_runner(model, batch: int, context: int, device, use_graph: bool):
    from transformers import StaticCache

    params = inspect.signature(StaticCache.__init__).parameters
    if "max_batch_size" in params or "batch_size" in params:   # transformers 4.x
        key = "max_batch_size" if "max_batch_size" in params else "batch_size"
        cache = StaticCache(config=model.config, **{key: batch}, max_cache_len=context + 8, device=device,
                            dtype=next(model.parameters()).dtype)
    else:
        cache = StaticCache(config=model.config, max_cache_len=context + 8)
    prompt = torch.randint(0, model.config.vocab_size, (batch, context), device=device)
    kw = _logits_kw(model)
    model(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(context, device=device),
          use_cache=True, **kw)
    tok = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
    pos = torch.tensor([context], device=device)
    # newer transformers count the cache length in a tensor per layer: rewind it so every timed step
    # writes position `context` (a device op, so it is part of the captured graph)
    counters = [lay.cumulative_length for lay in getattr(cache, "layers", [])
                if isinstance(getattr(lay, "cumulative_length", None), torch.Tensor)]

    def step():
        for c in counters:
            c.fill_(context)
        return model(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True, **kw).logits

    return Runner(step, use_graph)


@torch.no_grad()
def linear_share_runner(model, tokens: int, device, use_graph: bool):
    """All decoder linears of the model on random (tokens × K) inputs, siblings fed the same tensor."""
    blocks = model.model.layers
    dt = next(model.parameters()).dtype
    h = model.config.hidden_size
    xs = {"h": torch.randn(tokens, h, device=device, dtype=dt),
          "o": torch.randn(tokens, model.config.num_attention_heads * (h // model.config.num_attention_heads),
                           device=device, dtype=dt),
          "i": torch.randn(tokens, model.config.intermediate_size, device=device, dtype=dt)}

    def run():
        for blk in blocks:
            a, m = blk.self_attn, blk.mlp
            a.q_proj(xs["h"]), a.k_proj(xs["h"]), a.v_proj(xs["h"]), a.o_proj(xs["o"])
            m.gate_proj(xs["h"]), m.up_proj(xs["h"]), m.down_proj(xs["i"])

    return Runner(run, use_graph)


@dataclass
class Row:
    variant: str
    params_linear: int
    flops_ratio: float
    prefill: dict = field(default_factory=dict)     # "B×S" -> tokens/s
    decode: dict = field(default_factory=dict)      # "B" -> tokens/s
    modes: dict = field(default_factory=dict)       # what -> graph / eager (reason)
    linear_ms: float = 0.0                          # decoder linears at the share shape
    total_ms: float = 0.0                           # model prefill at the share shape
    rel_err: float | None = None                    # vs the same weights, eager, unfused
    rel_err_eager: float | None = None              # the prepared model run eagerly, vs the same reference
    rel_err_fp32: float | None = None               # the same check on a float32 copy (rounding noise ≈ 0)


def _ref_logits(model, device):
    """Last-token logits of the same weights, eager, unprepared, and layers with several paths on their
    plainest one (SS1: the merged dense weight through cuBLAS, independent of the sketch kernels)."""
    forced = [m for m in model.modules() if hasattr(m, "force_path")]
    for m in forced:
        m.force_path = "dense"
    run, _ = prefill_runner(model, 1, 128, device, use_graph=False, seed=7)
    out = run().float().clone()
    for m in forced:
        m.force_path = None
    return out


@torch.no_grad()
def fp32_check(model, fuse: bool, device, use_graph: bool) -> float:
    """Relative L2 error of the last-token logits of the fast path (prepared, CUDA graph) against the
    reference path (eager, unprepared, plainest layer paths), both on a float32 copy: random bf16
    networks amplify rounding noise to a few per cent, float32 shows whether the two compute the same."""
    m32 = copy.deepcopy(model).float()
    ref = _ref_logits(m32, device)
    if fuse:
        from ..serve import prepare_for_serving

        prepare_for_serving(m32, {"input_ids": torch.randint(0, m32.config.vocab_size, (1, 8), device=device)},
                            unpadded=True)
    run, _ = prefill_runner(m32, 1, 128, device, use_graph, seed=7)
    got = run().float()
    del m32, run
    return float((got - ref).norm() / ref.norm())


def bench_variant(model, label, prefills, decodes, context, share_shape, device, use_graph, fuse: bool,
                  flops_ratio: float, params_linear: int, timing: dict | None = None) -> Row:
    timing = timing or {}
    row = Row(label, params_linear, flops_ratio)
    row.rel_err_fp32 = fp32_check(model, fuse, device, use_graph)
    ref_logits = _ref_logits(model, device)
    if fuse:
        from ..serve import prepare_for_serving

        ex = {"input_ids": torch.randint(0, model.config.vocab_size, (1, 8), device=device)}
        row.modes["served"] = str({k: (len(v) if isinstance(v, list) else v)
                                   for k, v in prepare_for_serving(model, ex, unpadded=True).items()})
    if fuse:
        eager, _ = prefill_runner(model, 1, 128, device, use_graph=False, seed=7)
        got = eager().float()
        row.rel_err_eager = float((got - ref_logits).norm() / ref_logits.norm())
    fast, _ = prefill_runner(model, 1, 128, device, use_graph, seed=7)
    got = fast().float()
    row.rel_err = float((got - ref_logits).norm() / ref_logits.norm())
    del fast
    for b, s in prefills:
        run, _ = prefill_runner(model, b, s, device, use_graph)
        ms = time_ms(run, **timing)
        row.prefill[f"{b}x{s}"] = b * s / ms * 1e3
        row.modes[f"prefill {b}x{s}"] = run.mode
        if (b, s) == share_shape:
            row.total_ms = ms
        del run
    for b in decodes:
        run = decode_runner(model, b, context, device, use_graph)
        ms = time_ms(run, **{"iters": 20, **timing})
        row.decode[str(b)] = b / ms * 1e3
        row.modes[f"decode {b}"] = run.mode
        del run
    lin = linear_share_runner(model, share_shape[0] * share_shape[1], device, use_graph)
    row.linear_ms = time_ms(lin, **timing)
    del lin
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return row


def run_model_bench(preset="llama-1b", layers=None, methods=("lowrank", "ss1", "espace"), keep=0.5,
                    prefills=((1, 512), (1, 2048), (4, 2048), (8, 512)), decodes=(1, 16), context=512,
                    share_shape=(1, 2048), device=None, dtype=torch.bfloat16, use_graph=True, fuse=True,
                    out: Path | None = None, options: dict | None = None, log=print,
                    timing: dict | None = None) -> list[Row]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    base = build_model(preset, layers, device, dtype)
    rows = []
    n_lin = sum(p.numel() for n, p in base.named_parameters() if "proj" in n)
    variants = [("dense", None, False)] + ([("dense", None, True)] if fuse else [])
    for m in methods:
        variants += [(m, m, False)] + ([(m, m, True)] if fuse else [])
    for name, method, fused in variants:
        model = copy.deepcopy(base)
        ratio, params = 1.0, n_lin
        if method is not None:
            targeted, used, df, sf = structure_random(model, method, keep, (options or {}).get(method))
            ratio, params = sf / df, used
            model.requires_grad_(False)
        label = name + (" (served)" if fused else "")
        t = time.perf_counter()
        row = bench_variant(model, label, prefills, decodes, context, share_shape, device, use_graph, fused,
                            ratio, params, timing)
        rows.append(row)
        log(f"{label:18s} params {params / 1e6:7.1f}M flops×{ratio:.2f} prefill "
            + " ".join(f"{k}:{v:,.0f}" for k, v in row.prefill.items()) + " decode "
            + " ".join(f"B{k}:{v:,.0f}" for k, v in row.decode.items())
            + f" err {row.rel_err if row.rel_err is None else round(row.rel_err, 5)} ({time.perf_counter() - t:.0f}s)")
        del model
    if out is not None:
        write_report(rows, out, preset, layers, keep, context, share_shape, dtype, device, base)
    return rows


def write_report(rows, out: Path, preset, layers, keep, context, share_shape, dtype, device, base) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    meta = {"preset": preset, "layers": base.config.num_hidden_layers, "keep": keep, "context": context,
            "dtype": str(dtype), "device": dev, "torch": torch.__version__, "share_shape": share_shape,
            "config": {k: getattr(base.config, k, v) for k, v in PRESETS[preset].items()}}
    (out / "model.json").write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1))
    (out / "model.md").write_text(render(rows, meta))
    try:
        plot(rows, out / "model.png", meta)
    except ImportError:  # a GPU box without matplotlib: render later with `render_json`
        pass


def render_json(path: Path) -> None:
    """Re-write model.md and model.png next to a model.json (e.g. one fetched from a GPU machine)."""
    path = Path(path)
    d = json.loads(path.read_text())
    rows = [Row(**r) for r in d["rows"]]
    (path.parent / "model.md").write_text(render(rows, d["meta"]))
    plot(rows, path.parent / "model.png", d["meta"])


def _baseline(rows, r):
    """The dense row prepared the same way as `r` (plain or served)."""
    want = "dense (served)" if r.variant.endswith("(served)") else "dense"
    return next((d for d in rows if d.variant == want), rows[0])


def render(rows, meta) -> str:
    dense = next(r for r in rows if r.variant == "dense")
    pk, dk = list(dense.prefill), list(dense.decode)
    lines = [f"# Whole-model speed: {meta['preset']} ({meta['layers']} blocks), keep {meta['keep']} of the linear params",
             "", f"Device {meta['device']}, {meta['dtype']}, torch {meta['torch']}; random weights; config "
             f"`{meta['config']}`. Prefill: tokens/s of one forward over batch × seq new tokens (last-token logits); "
             f"decode: tokens/s of one step with a static KV cache of {meta['context']} tokens. CUDA graphs unless "
             "a mode says eager. Speed-ups (×) are against the plain dense model measured in the same run; for "
             "served rows the second factor is against the dense model served the same way (fusion, compiled "
             "pointwise kernels, FlashAttention prefill) — the like-for-like comparison.", "",
             "| variant | linear params | linear FLOPs | " + " | ".join(f"prefill {k}" for k in pk) + " | "
             + " | ".join(f"decode B={k}" for k in dk) + " | logits rel. err fp32 / bf16 |",
             "|---|---|---|" + "---|" * (len(pk) + len(dk)) + "---|"]
    for r in rows:
        base = _baseline(rows, r)

        def cell(v, d, b):
            return f"{v:,.0f} ({v / d:.2f}×" + ("" if base is dense else f"; {v / b:.2f}×") + ")"
        cells = [cell(r.prefill[k], dense.prefill[k], base.prefill[k]) for k in pk]
        cells += [cell(r.decode[k], dense.decode[k], base.decode[k]) for k in dk]
        err = "—" if r.rel_err is None else f"{r.rel_err:.1e}"
        if r.rel_err_fp32 is not None:
            err = f"{r.rel_err_fp32:.1e} / " + err
        lines.append(f"| {r.variant} | {r.params_linear / 1e6:.1f}M | {r.flops_ratio:.2f} | " + " | ".join(cells)
                     + f" | {err} |")
    b, s = meta["share_shape"]
    lines += ["", f"## Where the time goes (prefill {b}×{s})", "",
              "| variant | model ms | decoder linears ms | linear share | rest ms | ideal ms (dense rest + dense linears × FLOPs ratio, same preparation) | measured / ideal |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        base = _baseline(rows, r)
        rest = r.total_ms - r.linear_ms
        ideal = (base.total_ms - base.linear_ms) + base.linear_ms * r.flops_ratio
        lines.append(f"| {r.variant} | {r.total_ms:.2f} | {r.linear_ms:.2f} | {r.linear_ms / r.total_ms:.0%} | "
                     f"{rest:.2f} | {ideal:.2f} | {r.total_ms / ideal:.2f} |")
    modes = {m for r in rows for m in r.modes.values()}
    lines += ["", "Modes used: " + ", ".join(sorted(modes)) + "."]
    return "\n".join(lines) + "\n"


def plot(rows, path: Path, meta) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    dense = next(r for r in rows if r.variant == "dense")
    keys = [("prefill", k) for k in dense.prefill] + [("decode", k) for k in dense.decode]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        vals = [getattr(r, kind)[k] / getattr(dense, kind)[k] for kind, k in keys]
        ax.bar([j + i * width for j in range(len(keys))], vals, width, label=r.variant)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
    ax.set_xticklabels([f"{kind} {k}" for kind, k in keys], fontsize=8)
    ax.set_ylabel("tokens/s ÷ dense")
    ax.set_title(f"{meta['preset']} on {meta['device']}, keep {meta['keep']}, {meta['dtype']}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
