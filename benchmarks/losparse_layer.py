"""Exported LoSparse layer vs cuBLAS dense on Llama-7B shapes, bf16, side by side in one run.

    python benchmarks/losparse_layer.py --out DIR      # DIR/losparse_layer.{md,png,json}
    python benchmarks/losparse_layer.py --smoke        # tiny shapes on CPU (checks the script only)

Sizes come from structlin's own budget (`compress`'s uniform allocation at keep 0.22, rank_ratio 0.05: rank
and kept rows in multiples of 64). Weights are random (timing does not depend on values), kept rows a random
sorted subset. Variants, all inference (no grad):

* dense    — F.linear(x, W) (cuBLAS);
* scatter  — the released LoSparse export: x Rᵀ Lᵀ + scatter of x S_Iᵀ into a zero (M × N) buffer + add;
* stacked  — h = x [R; S_I]ᵀ, y = h[:, :r] Lᵀ + b (cuBLAS), y.index_add_(1, I, h[:, r:]) (torch);
* stk+tri  — the same with structlin's Triton column index-add (plain loads/stores, no atomics);
* fused-2k — cuBLAS for h, then one Triton kernel for the thin GEMM with the index-add as its epilogue (y
             written once, no atomics): the layer's path above 16 rows;
* decode   — (M ≤ 16) the single-launch decode kernel: split-K GEMV for h into an fp32 workspace, a grid-wide
             barrier, then the thin GEMM + index-add reading h from it;
* layer    — the layer as dispatched on CUDA: decode for M ≤ 16 when [R; S_I] holds ≥ 6M entries
             (`LoSparseLinear.decode_min_weights`), fused-2k otherwise.

Every timing is the median of `triton.testing.do_bench` (L2 flushed before each call) over CUDA-graph replays
(GPU time; M ≤ 16 is the decode regime the targets name); dense and the layer also get an eager column. Each
variant's output is checked against a float64 reference on fresh random inputs (relative Frobenius error).
`--check` first checks the decode kernel on small odd shapes (both launch modes, bitwise repeatability);
`--decode-sweep` times its tile configs at M ∈ {1, 16}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from structlin import budget
from structlin.bench.graphs import capture
from structlin.config import parse_options
from structlin.kernels import losparse as ops
from structlin.methods import losparse as lsp

SHAPES = {"q/k/v/o 4096→4096": (4096, 4096), "gate/up 4096→11008": (4096, 11008),
          "down 11008→4096": (11008, 4096)}
MS = [1, 16, 256, 4096]
VARIANTS = ["dense", "scatter", "stacked", "stk+tri", "fused-2k", "decode", "layer"]


def timer(fn, cuda: bool, graph: bool = True) -> float:
    """Median ms of fn(): CUDA-graph replays timed by do_bench (L2 flushed), or eager calls."""
    if not cuda:
        fn()
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
        return statistics.median(ts)
    from triton.testing import do_bench

    if graph:
        fn = capture(fn)[0].replay
    return do_bench(fn, warmup=10, rep=40, return_mode="median")


def roofline(dev):
    """(bf16 matmul TFLOP/s, copy GB/s counting read + write), measured here."""
    if dev != "cuda":
        return 1.0, 1.0
    from triton.testing import do_bench

    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ a, warmup=20, rep=100, return_mode="median")
    src = torch.randn(256 * 2**20, device=dev, dtype=torch.float32)
    dst = torch.empty_like(src)
    ms_c = do_bench(lambda: dst.copy_(src), warmup=20, rep=100, return_mode="median")
    return 2 * 8192**3 / ms / 1e9, 2 * src.numel() * 4 / ms_c / 1e6


def plan(K: int, N: int, keep: float, ratio: float) -> lsp.LoSparseSpec:
    m = lsp.LoSparse()
    opts = parse_options(lsp.LoSparseOptions, {"rank_ratio": ratio}, "losparse")
    p = budget.allocate_uniform({"l": (K, N, False)}, m, opts, keep)
    return p.specs["l"]


def rel(a, b) -> float:
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def bench_shape(name, K, N, spec, args, dev, dtype, rows, tflops, gbs):
    g = torch.Generator(device=dev).manual_seed(0)
    r, k = spec.rank, spec.kept
    layer = lsp.LoSparseLinear(spec, dtype=dtype, device=dev).eval().requires_grad_(False)
    with torch.no_grad():
        layer.right.copy_(torch.randn(r + k, K, generator=g, device=dev) / K ** 0.5)
        layer.left.copy_(torch.randn(N, r, generator=g, device=dev) / r ** 0.5)
        idx = torch.sort(torch.randperm(N, generator=g, device=dev)[:k]).values
        layer.index.copy_(idx)
    W = torch.randn(N, K, generator=g, device=dev, dtype=dtype) / K ** 0.5
    Wd = layer.to_dense().double()
    R, S_I, L = layer.right[:r], layer.right[r:], layer.left

    def scatter(x):
        lr = F.linear(F.linear(x, R), L)
        buf = torch.zeros(x.shape[0], N, dtype=x.dtype, device=x.device)
        buf[:, idx] = F.linear(x, S_I)
        return lr + buf

    def stacked(x):
        layer.path = "torch"
        try:
            return layer(x)
        finally:
            layer.path = "fused"

    def stk_tri(x):
        h = F.linear(x, layer.right)
        y = F.linear(h[:, :r], L)
        return ops.index_add_cols(y, h, idx, r)

    def two_kernels(x):
        layer.decode_max_m = 0
        try:
            return layer(x)
        finally:
            layer.decode_max_m = lsp.LoSparseLinear.decode_max_m

    inv = ops.inverse_index(idx, N)
    fns = {"dense": lambda x: F.linear(x, W), "scatter": scatter, "stacked": stacked, "stk+tri": stk_tri,
           "fused-2k": two_kernels, "decode": lambda x: ops.decode(x, layer.right, L, inv, None), "layer": layer}
    for M in args.ms:
        fns_m = {v: f for v, f in fns.items() if v != "decode" or M <= ops.DECODE_MAX_M}
        xs = [torch.randn(M, K, generator=g, device=dev, dtype=dtype) for _ in range(2)]
        errs = {}
        with torch.no_grad():
            for v, f in fns_m.items():
                ref = xs[1].double() @ (W.double() if v == "dense" else Wd).T
                errs[v] = rel(f(xs[1]), ref)
            times = {v: timer(lambda f=f: f(xs[0]), dev == "cuda") for v, f in fns_m.items()}
            eager = {v: timer(lambda f=fns[v]: f(xs[0]), dev == "cuda", graph=False) for v in ("dense", "layer")}
        flops = 2 * M * ((r + k) * K + N * r)
        by = 2 * (M * K + (r + k) * K + N * r + M * N + 2 * M * (r + k))   # + h written and read once
        ideal = max(flops / tflops / 1e9, by / gbs / 1e6)
        dense_ideal = max(2 * M * N * K / tflops / 1e9, 2 * (M * K + N * K + M * N) / gbs / 1e6)
        row = dict(shape=name, K=K, N=N, M=M, rank=r, kept=k, params=layer.num_params() / (N * K),
                   ms=times, eager_ms=eager, err=errs, ideal_ms=ideal, dense_ideal_ms=dense_ideal,
                   speedup={v: times["dense"] / t for v, t in times.items()})
        rows.append(row)
        print(f"{name:22s} M={M:5d} r={r} k={k} params={row['params']:.3f} | " +
              " ".join(f"{v}={times[v] * 1e3:7.1f}us({row['speedup'][v]:.2f}x,err {errs[v]:.1e})" for v in fns_m) +
              f" | ideal {ideal * 1e3:.1f}us ({dense_ideal / ideal:.2f}x)", flush=True)


def kt_default() -> str:
    from structlin.kernels import _losparse_triton as kt

    return "/".join(f"{k}{v}" for k, v in kt.DECODE_CONFIG.items())


def check(dev):
    """The decode kernel on small odd shapes vs float64: single launch (barrier) and two launches, bias or
    not, k = 0, repeated calls bitwise equal (the barrier counter keeps growing; the split sum is fixed)."""
    from structlin.kernels import _losparse_triton as kt

    g = torch.Generator(device=dev).manual_seed(3)
    worst, cases = 0.0, []
    for M, K, N, r, k, bias in [(1, 77, 53, 24, 13, True), (5, 300, 130, 16, 0, False), (16, 129, 70, 40, 21, True),
                                (3, 4099, 1031, 64, 200, True), (16, 11008, 4096, 128, 704, False)]:
        for dt in (torch.bfloat16, torch.float16):
            x = torch.randn(M, K, generator=g, device=dev).to(dt)
            W = (torch.randn(r + k, K, generator=g, device=dev) / K ** 0.5).to(dt)
            L = (torch.randn(N, r, generator=g, device=dev) / r ** 0.5).to(dt)
            b = torch.randn(N, generator=g, device=dev).to(dt) if bias else None
            idx = torch.sort(torch.randperm(N, generator=g, device=dev)[:k]).values
            h = x.double() @ W.double().T
            ref = h[:, :r] @ L.double().T + (b.double() if bias else 0)
            ref[:, idx] += h[:, r:]
            inv = ops.inverse_index(idx, N)
            outs = [kt.decode(x, W, L, inv, b) for _ in range(3)] + [kt.decode(x, W, L, inv, b, two_launches=True)]
            torch.cuda.synchronize()
            errs = [rel(y, ref) for y in outs]
            same = all(torch.equal(outs[0], y) for y in outs[1:])
            worst = max(worst, *errs)
            print(f"check M={M} K={K} N={N} r={r} k={k} bias={bias} {dt}: err {max(errs):.1e} repeat-equal {same}",
                  flush=True)
            assert max(errs) < 1e-2 and same, "decode kernel check failed"
            cases.append((x, W, L, inv, b, outs[0]))
    for _ in range(5):  # interleaved grids of different sizes (each has its own barrier counter)
        for x, W, L, inv, b, y0 in cases:
            assert torch.equal(kt.decode(x, W, L, inv, b), y0), "decode kernel not repeatable"
    print("check: interleaved repeats bitwise equal", flush=True)
    return worst


def decode_sweep(args, dev, dtype):
    """Decode kernel tile configs at M ∈ {1, 16} on the three shapes (graph replays, L2 flushed)."""
    from structlin.kernels import _losparse_triton as kt

    g = torch.Generator(device=dev).manual_seed(1)
    out = []
    cfgs = [dict(BJ=bj, BK=bk, warps=4, stages=st) for bj in (16, 32, 64) for bk in (128, 256) for st in (3, 4)
            if not (bj == 64 and bk == 256 and st == 4)] + [dict(BJ=64, BK=128, warps=8, stages=4)]
    for name, (K, N) in SHAPES.items():
        spec = plan(K, N, args.keep, args.rank_ratio)
        r, k = spec.rank, spec.kept
        right = (torch.randn(r + k, K, generator=g, device=dev) / K ** 0.5).to(dtype)
        left = (torch.randn(N, r, generator=g, device=dev) / r ** 0.5).to(dtype)
        W = torch.randn(N, K, generator=g, device=dev, dtype=dtype)
        inv = ops.inverse_index(torch.sort(torch.randperm(N, generator=g, device=dev)[:k]).values, N)
        for M in (1, 16):
            x = torch.randn(M, K, generator=g, device=dev, dtype=dtype)
            row = dict(shape=name, M=M, dense=timer(lambda: F.linear(x, W), True),
                       two_launch=timer(lambda: kt.decode(x, right, left, inv, None, two_launches=True), True))
            for c in cfgs:
                key = f"BJ{c['BJ']}/BK{c['BK']}/w{c['warps']}/s{c['stages']}"
                row[key] = timer(lambda c=c: kt.decode(x, right, left, inv, None, config=c), True)
            best = min((v, kk) for kk, v in row.items() if kk.startswith("BJ"))
            print(f"sweep {name} M={M}: dense {row['dense'] * 1e3:.1f}us two-launch {row['two_launch'] * 1e3:.1f}us "
                  f"best {best[1]} {best[0] * 1e3:.1f}us ({row['dense'] / best[0]:.2f}x) | " +
                  " ".join(f"{kk}={v * 1e3:.1f}" for kk, v in row.items() if kk.startswith("BJ")), flush=True)
            out.append(row)
    return out


def uses_decode(r) -> bool:
    """Whether the layer dispatches the single-launch decode kernel for this row (LoSparseLinear's rule)."""
    return r["M"] <= ops.DECODE_MAX_M and (r["rank"] + r["kept"]) * r["K"] >= lsp.LoSparseLinear.decode_min_weights


def normalize(r) -> dict:
    """Rows of the first decode-kernel run (variant "fused" = the layer with the decode kernel at every M ≤ 16)
    in today's names: "decode" = that kernel, "layer" = what the layer dispatches now (same measurements)."""
    for key in ("ms", "speedup", "err"):
        t = r[key]
        if "fused" in t and "layer" not in t:
            if r["M"] <= ops.DECODE_MAX_M:
                t["decode"] = t["fused"]
            t["layer"] = t["fused"] if uses_decode(r) else t["fused-2k"]
    e = r.get("eager_ms", {})
    if "fused" in e and "layer" not in e:
        r["eager_note"] = "decode kernel" if r["M"] <= ops.DECODE_MAX_M else "layer"
    return r


def write(rows, out: Path, device, tflops, gbs, args, sweep=None, worst=None):
    out.mkdir(parents=True, exist_ok=True)
    (out / "losparse_layer.json").write_text(json.dumps(dict(device=device, tflops=tflops, gbs=gbs, rows=rows,
                                                             decode_sweep=sweep, decode_check_err=worst,
                                                             keep=args.keep, rank_ratio=args.rank_ratio), indent=1))
    rows = [normalize(json.loads(json.dumps(r))) for r in rows]
    L = ["# Exported LoSparse layer vs dense (Llama-7B shapes, bf16)", "",
         f"Device: {device}; measured in the same run: {tflops:.0f} TFLOP/s bf16 matmul (8192³), {gbs:.0f} GB/s "
         "copy (read + write). Generated by `benchmarks/losparse_layer.py --check --decode-sweep`. Sizes from "
         f"structlin's budget at keep {args.keep}, rank_ratio {args.rank_ratio} (rank and kept rows in multiples "
         "of 64). Times are µs per call, median of `triton.testing.do_bench` over CUDA-graph replays (L2 flushed "
         "before each call); (×) = speed-up over dense measured in the same run. Columns: the released scatter "
         "export; stacked = cuBLAS h + cuBLAS thin GEMM + torch `index_add_`; + Triton add = the same with a "
         "plain Triton column add; 2 kernels = cuBLAS h + one Triton kernel for the thin GEMM with the index-add "
         "as its epilogue; decode = the single-launch decode kernel (M ≤ 16: split-K h into an fp32 workspace, "
         "grid-wide barrier, thin GEMM + index-add); **the layer** = what `LoSparseLinear` dispatches (decode at "
         f"M ≤ 16 when [R; S_I] holds ≥ {lsp.LoSparseLinear.decode_min_weights / 1e6:g}M entries, 2 kernels "
         "otherwise). eager = without a graph (host launch overhead included). ideal = max(FLOPs / matmul rate, "
         "bytes / bandwidth) of the two-GEMM form (h written and read once); its (×) is dense's ideal over it. "
         "Errors: relative Frobenius error of each variant's bf16 output against float64 on fresh inputs (all ≤ "
         f"{max(max(r['err'].values()) for r in rows):.1e}).", "",
         "| shape | M | r | k | params | dense | scatter | stacked | + Triton add | 2 kernels | decode | **the layer** | eager | ideal |",
         "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        t, s = r["ms"], r["speedup"]
        cell = lambda v: f"{t[v] * 1e3:.1f} ({s[v]:.2f}×)" if v in t else "—"
        e = r["eager_ms"]
        ev = "layer" if "layer" in e else "fused"
        eag = f"{e[ev] * 1e3:.1f} ({e['dense'] / e[ev]:.2f}×)" + (f" [{r['eager_note']}]" if r.get("eager_note") else "") \
            if e else "—"
        L.append(f"| {r['shape']} | {r['M']} | {r['rank']} | {r['kept']} | {r['params']:.3f} | {t['dense'] * 1e3:.1f} | "
                 f"{cell('scatter')} | {cell('stacked')} | {cell('stk+tri')} | {cell('fused-2k')} | {cell('decode')} | "
                 f"**{cell('layer')}** | {eag} | {r['ideal_ms'] * 1e3:.1f} ({r['dense_ideal_ms'] / r['ideal_ms']:.2f}×) |")
    if worst is not None:
        L += ["", f"Decode kernel check (`--check`, small odd shapes and 16 × 11008 → 4096, bf16 and fp16, single "
              f"launch and two launches, bias or not, interleaved grid sizes): max relative error vs float64 "
              f"{worst:.1e}; repeated calls bitwise equal."]
    if sweep:
        keys = [k for k in sweep[0] if k.startswith("BJ")]
        L += ["", "Decode kernel tile configs (`--decode-sweep`; µs, graph replays; the kernel's default is "
              f"{kt_default()}; two launches = phase 1 and phase 2 as two kernels, no barrier):", "",
              "| shape | M | dense | two launches | " + " | ".join(keys) + " |",
              "| --- | --- | --- | --- | " + " | ".join("---" for _ in keys) + " |"]
        for r in sweep:
            L.append(f"| {r['shape']} | {r['M']} | {r['dense'] * 1e3:.1f} | {r['two_launch'] * 1e3:.1f} | " +
                     " | ".join(f"{r[k] * 1e3:.1f}" for k in keys) + " |")
    (out / "losparse_layer.md").write_text("\n".join(L) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, len({r["shape"] for r in rows}), figsize=(15, 4), squeeze=False)
        for ax, shape in zip(axes[0], dict.fromkeys(r["shape"] for r in rows)):
            rs = [r for r in rows if r["shape"] == shape]
            for v in VARIANTS[1:]:
                pts = [(r["M"], r["speedup"][v]) for r in rs if v in r["speedup"]]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=v,
                        lw=2.5 if v == "layer" else 1.2)
            ax.plot([r["M"] for r in rs], [r["dense_ideal_ms"] / r["ideal_ms"] for r in rs], "k--", label="ideal")
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{shape} (≈{rs[0]['params']:.0%} params)")
            ax.set_xlabel("M (tokens)")
            ax.set_ylabel("speed-up over dense (CUDA graphs)")
        axes[0][0].legend()
        fig.suptitle(f"LoSparse exported layer, bf16, {device}")
        fig.tight_layout()
        fig.savefig(out / "losparse_layer.png", dpi=110)
    except ImportError:
        pass


def render(path: Path, out: Path, args):
    """Re-write the markdown and PNG from a run's JSON (no GPU)."""
    d = json.loads(path.read_text())
    args.keep, args.rank_ratio = d.get("keep", args.keep), d.get("rank_ratio", args.rank_ratio)
    write(d["rows"], out, d["device"], d["tflops"], d["gbs"], args, d.get("decode_sweep"), d.get("decode_check_err"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/benchmarks")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--keep", type=float, default=0.22)
    ap.add_argument("--rank-ratio", type=float, default=0.05)
    ap.add_argument("--ms", nargs="*", type=int, default=MS)
    ap.add_argument("--decompose", action="store_true", help="decode-time breakdown only (CUDA)")
    ap.add_argument("--check", action="store_true", help="decode kernel vs float64 on odd shapes first (CUDA)")
    ap.add_argument("--decode-sweep", action="store_true", help="time the decode kernel's tile configs (CUDA)")
    ap.add_argument("--render", default="", help="re-write md/png from this JSON of an earlier run")
    args = ap.parse_args()
    if args.decompose:
        return decompose(args)
    if args.render:
        return render(Path(args.render), Path(args.out), args)
    dev = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    shapes = {"tiny": (512, 640), "tiny2": (640, 512)} if args.smoke else SHAPES
    if args.smoke:
        args.ms = [1, 16, 40]
    device = torch.cuda.get_device_name() if dev == "cuda" else "CPU (smoke)"
    tflops, gbs = roofline(dev)
    print(f"{device}: {tflops:.0f} TFLOP/s, {gbs:.0f} GB/s", flush=True)
    worst = check(dev) if args.check and dev == "cuda" else None
    sweep = decode_sweep(args, dev, dtype) if args.decode_sweep and dev == "cuda" else None
    rows = []
    for name, (K, N) in shapes.items():
        spec = plan(K, N, args.keep, args.rank_ratio)
        bench_shape(name, K, N, spec, args, dev, dtype, rows, tflops, gbs)
        write(rows, Path(args.out), device, tflops, gbs, args, sweep, worst)


def decompose(args):
    """Where decode time goes: the h GEMM alone, the epilogue kernel alone (several tile configs)."""
    from structlin.kernels import _losparse_triton as kt

    dev, dtype = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(1)
    for name, (K, N) in SHAPES.items():
        spec = plan(K, N, args.keep, args.rank_ratio)
        r, k = spec.rank, spec.kept
        right = torch.randn(r + k, K, generator=g, device=dev, dtype=dtype) / K ** 0.5
        left = torch.randn(N, r, generator=g, device=dev, dtype=dtype) / r ** 0.5
        W = torch.randn(N, K, generator=g, device=dev, dtype=dtype)
        inv = ops.inverse_index(torch.sort(torch.randperm(N, generator=g, device=dev)[:k]).values, N)
        for M in (1, 16):
            x = torch.randn(M, K, generator=g, device=dev, dtype=dtype)
            h = F.linear(x, right)
            out = {"dense": timer(lambda: F.linear(x, W), True), "h": timer(lambda: F.linear(x, right), True),
                   "h_mv": timer(lambda: torch.mv(right, x[0]), True) if M == 1 else float("nan"),
                   "copy_right": timer(lambda: right.clone(), True)}
            for cfg in [(16, 64, 64, 1, 4, 4), (16, 128, 64, 1, 4, 3), (16, 32, 128, 1, 2, 2), (16, 64, 128, 1, 4, 2),
                        (16, 128, 128, 1, 4, 2)]:
                out[f"lr{cfg[:3]}"] = timer(lambda cfg=cfg: kt.lr_add(h, left, inv, None, cfg), True)
            print(f"{name} M={M}: " + " ".join(f"{a}={b * 1e3:.1f}us" for a, b in out.items()), flush=True)


if __name__ == "__main__":
    main()
