"""`structlin sweep`: every method × allocation × keep on one model, against params and FLOPs.

For a causal LM, quality is held-out perplexity (first `eval_tokens` tokens of `eval_text`, windows of
`seq_len`); for an encoder (a model without a language-modelling head), accuracy of a ridge-regression probe
on mean-pooled features, fitted per model on the Pang & Lee train split and scored on its test split.
Each method's calibration statistics, error curves and gradient Grams are computed once and reused for every
keep (`compress(..., cache=)`). Writes `<name>.md`, `<name>.json`, `<name>_params.png`, `<name>_flops.png`.
"""
from __future__ import annotations

import copy
import json
import math
import platform
import time
from pathlib import Path

import torch

from .config import MIXED


def _is_causal_lm(model) -> bool:
    return hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None


# ------------------------------------------------------------------------------------------------ quality

class PerplexityEval:
    higher_is_better = False
    metric = "perplexity"

    def __init__(self, tok, text: str, tokens: int, seq_len: int):
        from . import data

        self.text, self.windows = text, data.token_windows(data.text(text), tok, tokens, seq_len)
        self.what = f"perplexity on the first {self.windows.numel():,} tokens of {text}, windows of {seq_len}"

    def __call__(self, model) -> float:
        from .eval import perplexity

        return perplexity(model, self.windows, text=self.text).ppl


class ProbeEval:
    """Accuracy of a ridge probe (one-hot targets, λ = 1e-3·mean diag) on mean-pooled encoder features."""

    higher_is_better = True
    metric = "accuracy"

    def __init__(self, tok, dataset: str = "pang-lee", max_len: int = 64, n_train: int = 2000, n_test: int = 800):
        from . import data

        train, self.labels = data.labelled(dataset, "train")
        test, _ = data.labelled(dataset, "test")
        self.train, self.test = train[:n_train], test[:n_test]
        self.tok, self.max_len = tok, max_len
        self.what = (f"accuracy of a ridge probe on mean-pooled features, {dataset} ({len(self.train)} train / "
                     f"{len(self.test)} test sentences, max {max_len} tokens)")

    def batches(self, rows, bs: int = 64):
        for i in range(0, len(rows), bs):
            enc = self.tok([t for t, _ in rows[i:i + bs]], padding=True, truncation=True, max_length=self.max_len,
                           return_tensors="pt")
            yield dict(enc), torch.tensor([y for _, y in rows[i:i + bs]])

    def calib(self, n: int) -> list[dict]:
        return [b for b, _ in self.batches(self.train[: n * 16], 16)]

    @torch.no_grad()
    def features(self, model, rows):
        from .calibrate.collect import model_device

        dev, feats, ys = model_device(model), [], []
        for b, y in self.batches(rows):
            b = {k: v.to(dev) for k, v in b.items()}
            h = model(**b).last_hidden_state.float()
            m = b["attention_mask"].unsqueeze(-1).float()
            feats.append(((h * m).sum(1) / m.sum(1)).cpu().double())
            ys.append(y)
        return torch.cat(feats), torch.cat(ys)

    def __call__(self, model) -> float:
        x, y = self.features(model, self.train)
        xt, yt = self.features(model, self.test)
        mu = x.mean(0)
        x, xt = torch.cat([x - mu, torch.ones(len(x), 1, dtype=x.dtype)], 1), torch.cat([xt - mu, torch.ones(len(xt), 1, dtype=x.dtype)], 1)
        g = x.T @ x
        lam = 1e-3 * g.diagonal().mean()
        w = torch.linalg.solve(g + lam * torch.eye(len(g), dtype=g.dtype), x.T @ torch.nn.functional.one_hot(y).double())
        return (xt @ w).argmax(1).eq(yt).double().mean().item()


# ------------------------------------------------------------------------------------------------ latency

def measure_latency(model, seq_len: int, iters: int = 20) -> float | None:
    """Median forward time (ms) of one (1 × seq_len) batch on CUDA, timed with CUDA events; None on CPU."""
    from .calibrate.collect import model_device

    dev = model_device(model)
    if dev.type != "cuda":
        return None
    vocab = getattr(getattr(model, "config", None), "vocab_size", 1000)
    ids = torch.randint(0, vocab, (1, seq_len), device=dev, generator=torch.Generator(device=dev).manual_seed(0))
    times = []
    with torch.no_grad():
        for i in range(iters + 5):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            model(input_ids=ids, use_cache=False) if _is_causal_lm(model) else model(input_ids=ids)
            b.record()
            torch.cuda.synchronize()
            if i >= 5:
                times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


# ------------------------------------------------------------------------------------------------ the sweep

def run_sweep(model_name: str, methods: list[str], keeps: list[float], *, options: dict | None = None,
              allocations=("uniform", "fisher"), mixed: bool = True, mixed_allocations=None, floor: float = 0.0,
              calib_text: str = "austen-calib", calib_n: int = 32, seq_len: int = 512,
              eval_text: str = "pride-and-prejudice", eval_tokens: int = 8192, dtype: str = "auto",
              device: str | None = None, latency: bool = False, out: Path = Path("docs/benchmarks"),
              name: str = "sweep", progress: bool = True, log=print) -> list[dict]:
    """Compress `model_name` with every method × allocation × keep (and the mixed structure per allocation),
    evaluate each, and write the table and plots. Returns the rows (dicts)."""
    import structlin as sl

    from .cli import _load
    from .demo import pick_dtype

    t_start = time.perf_counter()
    options = dict(options or {})
    dt = pick_dtype(dtype) if dtype == "auto" else getattr(torch, dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto" and device == "cuda":
        dt = torch.bfloat16
    dense, tok = _load(model_name, str(dt).replace("torch.", ""))
    if tok is None:
        raise sl.ConfigError(f"{model_name} has no tokenizer: save it with save_pretrained(..., tokenizer=) or use "
                             f"an asset name ('smollm2', 'minilm')")
    dense = dense.to(device).eval()
    causal = _is_causal_lm(dense)
    if causal:
        evaluate = PerplexityEval(tok, eval_text, eval_tokens, seq_len)
        from . import data

        calib = data.texts(calib_text, tok, n=calib_n, seq_len=seq_len)
    else:
        evaluate = ProbeEval(tok)
        calib = evaluate.calib(calib_n)
        bad = [a for a in allocations if a in ("fisher", "measured")]
        if bad:
            log(f"note: allocation(s) {bad} need a loss; the encoder sweep runs {[a for a in allocations if a not in bad]}")
            allocations = tuple(a for a in allocations if a not in bad) or ("uniform",)
    if latency and device != "cuda":
        log("latency skipped: no CUDA device (the sweep runs on the CPU)")
        latency = False

    mixed_allocations = tuple(mixed_allocations or allocations)
    runs = []
    for k in keeps:              # keep-major: an interrupted sweep has complete comparisons at the first keeps
        runs += [(m, a, k) for m in methods for a in allocations]
        if mixed and len(methods) > 1:
            runs += [(MIXED, a, k) for a in mixed_allocations if not causal_only(a, causal)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(runs) + 1, desc="sweep")
    rows = []
    t = time.perf_counter()
    base = evaluate(dense)
    rows.append(_row("dense", "—", 1.0, None, dense, base, latency and measure_latency(dense, seq_len),
                     time.perf_counter() - t, sl))
    log(_row_text(rows[-1]))
    if bar:
        bar.update(1)
    def meta() -> dict:
        return {"model": model_name, "dtype": str(dt).replace("torch.", ""), "device": _device_name(device),
                "quality": evaluate.what, "metric": evaluate.metric, "higher_is_better": evaluate.higher_is_better,
                "calibration": f"{calib_n} batches of {calib_text}" + (f" ({calib_n * seq_len:,} tokens)" if causal else ""),
                "options": options, "floor": floor, "minutes": (time.perf_counter() - t_start) / 60,
                "latency": bool(latency),
                "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"}

    cache: dict = {}
    for method, allocation, keep in runs:
        if method == MIXED:
            opts = {"methods": {m: options.get(m, {}) for m in methods}}
        else:
            opts = options.get(method, {})
        cfg = sl.CompressConfig(method=method, keep=keep, allocation=allocation, options=opts,
                                floor=floor if allocation != "uniform" else 0.0)
        model = copy.deepcopy(dense)
        t = time.perf_counter()
        report = sl.compress(model, cfg, calib=calib, cache=cache, progress=False)
        q = evaluate(model)
        lat = latency and measure_latency(model, seq_len)
        rows.append(_row(method, allocation, keep, report, model, q, lat, time.perf_counter() - t, sl))
        log(_row_text(rows[-1]))
        write(rows, meta(), Path(out), name, plots=False)   # an interrupted sweep keeps its rows
        if bar:
            bar.update(1)
        del model
    if bar:
        bar.close()
    write(rows, meta(), Path(out), name)
    return rows


def causal_only(allocation: str, causal: bool) -> bool:
    return allocation in ("fisher", "measured") and not causal


def write(rows: list[dict], meta: dict, out: Path, name: str, plots: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / f"{name}.md").write_text(to_markdown(rows, meta, name))
    if plots:
        plot(rows, meta, out / f"{name}_params.png", "model_params", "model parameters")
        plot(rows, meta, out / f"{name}_flops.png", "linear_flops", "linear FLOPs per token")


def _device_name(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.machine()})"


def _row(method, allocation, keep, report, model, quality, latency_ms, seconds, sl) -> dict:
    from .compress import linear_flops_per_token, model_size

    params, _ = model_size(model)
    counts = {}
    if report is not None:
        for r in report.rows:
            kind = r.structure.split()[0]
            counts[kind] = counts.get(kind, 0) + 1
    return {"method": method, "allocation": allocation, "keep": keep,
            "charged": 1.0 if report is None else report.achieved_keep,
            "model_params": params, "linear_flops": linear_flops_per_token(model), "quality": quality,
            "latency_ms": latency_ms if latency_ms not in (False, None) else None, "seconds": seconds,
            "structures": counts}


def _label(r) -> str:
    return r["method"] if r["method"] == "dense" else f"{r['method']} / {r['allocation']}"


def _row_text(r) -> str:
    lat = "" if r["latency_ms"] is None else f"  {r['latency_ms']:.2f} ms"
    return (f"{_label(r):<28} keep {r['keep']:.2f} (charged {r['charged']:.4f})  quality {r['quality']:.4g}"
            f"  {r['seconds']:.0f}s{lat}")


def _fmt(q: float) -> str:
    return f"{q:.4g}" if q < 1e5 else f"{q:.3e}"


def to_markdown(rows: list[dict], meta: dict, name: str) -> str:
    better = (lambda a, b: a > b) if meta["higher_is_better"] else (lambda a, b: a < b)
    dense = rows[0]["quality"]
    lines = [
        f"# structlin sweep: {meta['model']}",
        "",
        f"- Quality: {meta['quality']}. Dense: **{_fmt(dense)}**.",
        f"- Calibration: {meta['calibration']}. Compute dtype {meta['dtype']} on {meta['device']} "
        f"({meta['machine']}); whole sweep {meta['minutes']:.1f} min.",
        f"- Options: {json.dumps(meta['options'])}; floor {meta['floor']} (non-uniform allocations keep at least "
        f"floor × each layer's uniform share).",
        "- `keep` = fraction of the targeted linear params kept (all decoder/encoder linears, output head "
        "excluded); `charged` = the exact fraction the plan keeps after tile rounding (never above keep).",
        "",
        f"| structure | allocation | keep | charged | model params | linear FLOPs/token | {meta['metric']} "
        f"| × dense | latency ms | layers by structure |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lat = "—" if r["latency_ms"] is None else f"{r['latency_ms']:.2f}"
        ratio = r["quality"] / dense if dense else float("nan")
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(r["structures"].items()))
        lines.append(f"| {r['method']} | {r['allocation']} | {r['keep']:.2f} | {r['charged']:.4f} | "
                     f"{r['model_params']:,} | {r['linear_flops']:,} | {_fmt(r['quality'])} | {ratio:.3g} | {lat} | "
                     f"{kinds} |")
    lines += ["", "## Allocation and mixed structures, per keep", ""]
    lines += findings(rows, meta)
    lines += ["", f"![{meta['metric']} against params]({name}_params.png)", "",
              f"![{meta['metric']} against FLOPs]({name}_flops.png)", ""]
    return "\n".join(lines)


def findings(rows: list[dict], meta: dict) -> list[str]:
    """Per keep: each method's best allocation against its uniform one, and mixed against the best single."""
    hib = meta["higher_is_better"]
    best = max if hib else min
    out = []
    for keep in sorted({r["keep"] for r in rows if r["method"] != "dense"}, reverse=True):
        at = [r for r in rows if r["keep"] == keep and r["method"] != "dense"]
        singles = [r for r in at if r["method"] != MIXED]
        parts = []
        for m in dict.fromkeys(r["method"] for r in singles):
            mine = [r for r in singles if r["method"] == m]
            uni = next((r for r in mine if r["allocation"] == "uniform"), None)
            top = best(mine, key=lambda r: r["quality"])
            if uni is not None and top is not uni:
                gain = "better" if (top["quality"] > uni["quality"]) == hib else "worse"
                parts.append(f"{m}: {top['allocation']} {_fmt(top['quality'])} vs uniform {_fmt(uni['quality'])} "
                             f"({gain})")
            else:
                parts.append(f"{m}: uniform {_fmt(top['quality'])} is its best")
        line = f"- keep {keep:.2f}: " + "; ".join(parts)
        mixes = [r for r in at if r["method"] == MIXED]
        if mixes and singles:
            mb, sb = best(mixes, key=lambda r: r["quality"]), best(singles, key=lambda r: r["quality"])
            tol = 1e-6 * abs(sb["quality"])
            ok = mb["quality"] >= sb["quality"] - tol if hib else mb["quality"] <= sb["quality"] + tol
            line += (f". Mixed ({mb['allocation']}) {_fmt(mb['quality'])} vs best single ({_label(sb)}) "
                     f"{_fmt(sb['quality'])}: {'at least as good' if ok else 'worse'}")
        out.append(line + ".")
    return out


def plot(rows: list[dict], meta: dict, path: Path, x: str, xlabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    series = dict.fromkeys(_label(r) for r in rows if r["method"] != "dense")
    for lab in series:
        pts = sorted((r[x], r["quality"]) for r in rows if _label(r) == lab)
        style = "-" if "uniform" in lab else "--"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=lab,
                linewidth=2.5 if lab.startswith(MIXED) else 1.5)
    d = rows[0]
    ax.plot([d[x]], [d["quality"]], marker="*", markersize=14, color="black", linestyle="none", label="dense")
    ax.axhline(d["quality"], color="black", linestyle=":", linewidth=1)
    if not meta["higher_is_better"]:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(meta["metric"] + ("" if meta["higher_is_better"] else " (log scale)"))
    ax.set_title(f"{meta['model']}: {meta['metric']} vs {xlabel}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
