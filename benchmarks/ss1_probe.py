"""SS1 probe: the one-launch fused GEMV for decode and the forward options at M ≥ 4096, on the Llama-3-8B shapes,
bf16, with cuBLAS dense and the ideal (cuBLAS GEMM of depth Kc = K/r) timed in the same run.

    python benchmarks/ss1_probe.py --out DIR        # writes DIR/probe.json, prints the tables
    python benchmarks/ss1_probe.py --out DIR --parts decode16   # 2 ≤ M ≤ 16: the sketch-once kernels (session 5)

Decode (M = 1, 16): per variant two timings, both CUDA-graph replays (`do_bench` median, L2 flushed per replay):
  `one` = a graph holding one call (what benchmarks/ss1_layer.py times; includes the ~5 µs replay floor),
  `chain` = a graph of 8 calls on 8 distinct weights, divided by 8 (a decode step: kernels back to back).
Variants: dense (cuBLAS, N × K), ideal (cuBLAS, N × Kc), sk+gemm (tied sketch + cuBLAS), decode (the one-launch
fused kernel), sk+gemv (tied sketch + the same Triton kernel with R = 1 on u).
Forward (M = 4096): dense, ideal, sk+gemm (two-pass), sketch alone, fused (one-pass tiled Triton GEMM, A = the
sketch built from x tiles), and overlap (M in n chunks: sketch of chunk i+1 on a second stream while cuBLAS
runs chunk i; optionally with cuBLAS's SM carve-out so the sketch has SMs to run on).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import structlin.methods.ss1 as ss1
from structlin.bench.graphs import capture
from structlin.kernels import ss1 as ops

SH = {"qo": (4096, 4096), "up": (4096, 14336), "down": (14336, 4096)}
LOG = []


def log(s):
    print(s, flush=True)
    LOG.append(s)


def T(fn):
    return do_bench(capture(fn)[0].replay, warmup=5, rep=25, return_mode="median")


def rel(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def llama_weights(chain, dev, dt):
    """Per shape of SH and r ∈ {2, 4, 8}: the SS1 layer, its tied constants (rot, bk, Kc), `chain` distinct dense
    and SS1 weights, 16 input rows and the generator (seeded; dense weights and inputs shared by a shape's r)."""
    for name, (K, N) in SH.items():
        gen = torch.Generator(device=dev).manual_seed(0)
        Wd = [torch.randn(N, K, device=dev, dtype=dt, generator=gen) * K ** -0.5 for _ in range(chain)]
        X = torch.randn(16, K, device=dev, dtype=dt, generator=gen)
        for r in (2, 4, 8):
            L = ss1.SS1Linear(ss1.SS1Spec(K, N, False, r=r), dtype=dt, device=dev)
            W0 = [torch.randn(N, L.spec.buckets, device=dev, dtype=dt, generator=gen) * L.spec.buckets ** -0.5
                  for _ in range(chain)]
            yield name, K, N, r, L, L.rot_tied, L.spec.bk, L.spec.buckets, Wd, X, W0, gen
        del Wd


def decode(res, chain=8):
    dev, dt = "cuda", torch.bfloat16
    zrot = torch.zeros(1, dtype=torch.int32, device=dev)
    tm = ops.triton_module()
    for name, K, N, r, L, rot, bk, kc, Wd, X, W0, gen in llama_weights(chain, dev, dt):
        for M in (1, 16):
            x = X[:M].contiguous()
            xs = torch.randn(M, kc, device=dev, dtype=dt, generator=gen)
            ref = x.double() @ W0[0].double()[:, L.bucket.long()].T
            e_dec = rel(ops.ss1_tied_decode(x, rot, W0[0], None, bk), ref)
            e_loop = rel(tm.tied_mm(x, rot, W0[0], None, bk, gemv1=False), ref)
            e_sg = rel(ops.ss1_tied_decode(ops.ss1_tied_sketch(x, rot, bk, kc), zrot, W0[0], None, bk), ref)
            e_sk = rel(F.linear(ops.ss1_tied_sketch(x, rot, bk, kc), W0[0]), ref)
            fns = {
                "dense": lambda w, i: F.linear(x, Wd[i]),
                "ideal": lambda w, i: F.linear(xs, w),
                "sk+gemm": lambda w, i: F.linear(ops.ss1_tied_sketch(x, rot, bk, kc), w),
                "decode": lambda w, i: ops.ss1_tied_decode(x, rot, w, None, bk),
                "loop": lambda w, i: tm.tied_mm(x, rot, w, None, bk, gemv1=False),
                "sk+gemv": lambda w, i: ops.ss1_tied_decode(ops.ss1_tied_sketch(x, rot, bk, kc), zrot, w, None, bk),
            }
            t = {}
            for k, f in fns.items():
                t[k + ".one"] = T(lambda: f(W0[0], 0))
                t[k + ".chain"] = T(lambda: [f(W0[i], i) for i in range(chain)]) / chain
            cfg = {str(k): str(v) for k, v in tm._tied_decode_tuned.cache.items()
                   if k[0] == M and k[1] == N and k[2] == kc}
            cfg.update({"gemv1" + str(k): str(v) for k, v in tm._tied_gemv1_tuned.cache.items()
                        if k[0] == N and k[1] == kc and M == 1})
            row = dict(part="decode", shape=name, K=K, N=N, r=r, M=M, kc=kc, err_decode=e_dec, err_loop=e_loop, err_skgemv=e_sg,
                       err_skgemm=e_sk, cfg=cfg, **t)
            res.append(row)
            d1, dc = t["dense.one"], t["dense.chain"]
            log(f"DEC {name:5s} r={r} M={M:2d} | one: dense {d1*1e3:6.1f}us ideal {d1/t['ideal.one']:.2f}x "
                f"sk+gemm {d1/t['sk+gemm.one']:.2f}x decode {d1/t['decode.one']:.2f}x sk+gemv "
                f"{d1/t['sk+gemv.one']:.2f}x loop {d1/t['loop.one']:.2f}x | chain: dense {dc*1e3:6.1f}us ideal {dc/t['ideal.chain']:.2f}x "
                f"sk+gemm {dc/t['sk+gemm.chain']:.2f}x decode {dc/t['decode.chain']:.2f}x sk+gemv "
                f"{dc/t['sk+gemv.chain']:.2f}x loop {dc/t['loop.chain']:.2f}x | decode {t['decode.chain']*1e3:.1f}us = "
                f"{2*N*kc/t['decode.chain']/1e6:.0f} GB/s weight, ideal {2*N*kc/t['ideal.chain']/1e6:.0f}, dense "
                f"{2*N*K/t['dense.chain']/1e6:.0f} | err {e_dec:.1e}/{e_loop:.1e}/{e_sg:.1e}/{e_sk:.1e} | {cfg}")


def decode16(res, chain=8, ms=(2, 16)):
    """2 ≤ M ≤ 16: the sketch-once kernels (kernels/_ss1_triton.tied_sk16) against sketch + cuBLAS, dense and the
    ideal: `one` = one launch (tickets), `pdl` = sketch then GEMM under programmatic dependent launch, `sk+tg` =
    the same two kernels without PDL (each picks the fastest tile: K-loop or one-shot split-K GEMM body).
    Errors vs float64; `det` = two calls bitwise equal; the spin-limit flag."""
    dev, dt = "cuda", torch.bfloat16
    tm = ops.triton_module()
    cfg = dict(BN=32, BC=256, SBC=256, PREF=1024, num_warps=4)
    shot = dict(BN=16, BC=512, SBC=256, SHOT=True, num_warps=4)   # split-K over 2–9 chunks here
    for (K, N, r, M) in [(1000, 300, 4, 5), (4100, 777, 2, 16), (333, 64, 8, 3)]:   # odd shapes, every dtype
        L = ss1.SS1Linear(ss1.SS1Spec(K, N, True, r=r), dtype=torch.float64, device=dev)
        for d in (torch.float32, torch.bfloat16) + ((torch.float16,) if r == 4 else ()):
            x = torch.randn(M, K, device=dev, dtype=d)
            ref = x.double() @ L.to_dense().T.double() + L.bias.double()
            e = {m + ("/shot" if c.get("SHOT") else "/loop"): rel(tm.tied_sk16(x, L.rot_tied, L.weight.to(d),
                                                                             L.bias.to(d), L.spec.bk, m, c), ref)
                 for m in ("one", "pdl") for c in (cfg, shot)}
            log(f"ODD K={K} N={N} r={r} M={M} {d} err {e} timeouts {tm.sk16_timeouts()}")
            res.append(dict(part="odd", K=K, N=N, r=r, M=M, dtype=str(d), err=e))
    for name, K, N, r, L, rot, bk, kc, Wd, X, W0, gen in llama_weights(chain, dev, dt):
        b = None   # no bias, as in benchmarks/ss1_layer.py (the same compiled kernels serve both)
        for M in ms:
            x = X[:M].contiguous()
            xs = torch.randn(M, kc, device=dev, dtype=dt, generator=gen)
            ref = x.double() @ W0[0].double()[:, L.bucket.long()].T
            fns = {
                "dense": lambda w, i: F.linear(x, Wd[i], b),
                "ideal": lambda w, i: F.linear(xs, w, b),
                "sk+gemm": lambda w, i: F.linear(ops.ss1_tied_sketch(x, rot, bk, kc), w, b),
                "one": lambda w, i: tm.tied_sk16(x, rot, w, b, bk, "one"),
                "sk+tg": lambda w, i: tm.tied_sk16(x, rot, w, b, bk, "gemm",
                                                   u=ops.ss1_tied_sketch(x, rot, bk, kc)),
                "pdl": lambda w, i: tm.tied_sk16(x, rot, w, b, bk, "pdl"),
            }
            t, err = {}, {}
            for k, f in fns.items():
                try:
                    if k not in ("dense", "ideal"):
                        err[k] = rel(f(W0[0], 0), ref)
                    t[k + ".one"] = T(lambda: f(W0[0], 0))
                    t[k + ".chain"] = T(lambda: [f(W0[i], i) for i in range(chain)]) / chain
                except Exception as e:  # noqa: BLE001 — a probe: record and go on
                    log(f"  {k} failed: {e!r}"[:400])
                    t[k + ".one"] = t[k + ".chain"] = float("nan")
            det = bool(torch.equal(tm.tied_sk16(x, rot, W0[0], b, bk, "one"), tm.tied_sk16(x, rot, W0[0], b, bk, "one")))
            flag = tm.sk16_timeouts()
            cfg = {str(k): str(v) for k, v in tm._SK16_PICK.items() if k[2] == N and k[3] == kc and k[1] == tm._mb(M)}
            res.append(dict(part="decode16", shape=name, K=K, N=N, r=r, M=M, kc=kc, err=err, det=det,
                            timeouts=flag, cfg=cfg, **t))
            d1, dc = t["dense.one"], t["dense.chain"]
            log(f"D16 {name:5s} r={r} M={M:2d} | one: dense {d1*1e3:5.1f}us " + " ".join(
                f"{k} {d1 / t[k + '.one']:.2f}x" for k in fns if k != "dense") + f" | chain: dense {dc*1e3:5.1f}us "
                + " ".join(f"{k} {dc / t[k + '.chain']:.2f}x" for k in fns if k != "dense")
                + " | us chain: " + " ".join(f"{k} {t[k + '.chain']*1e3:.1f}" for k in fns)
                + " | err " + " ".join(f"{k} {v:.1e}" for k, v in err.items()) + f" | det {det} timeouts {flag} | {cfg}")


def overlap_fn(x, rot, bk, kc, W, n, s2, u, y):
    tm = ops.triton_module()
    M, K = x.shape
    ch = M // n
    evs = [torch.cuda.Event() for _ in range(n)]

    def fn():
        cur = torch.cuda.current_stream()
        s2.wait_stream(cur)
        with torch.cuda.stream(s2):
            for i in range(n):
                tm._tied_launch(tm._tied_sketch_kernel, tm._tied_sketch_tuned, x[i * ch:(i + 1) * ch],
                                u[i * ch:(i + 1) * ch], rot, bk, ch, K, kc)
                evs[i].record(s2)
        for i in range(n):
            cur.wait_event(evs[i])
            torch.mm(u[i * ch:(i + 1) * ch], W.T, out=y[i * ch:(i + 1) * ch])
        cur.wait_stream(s2)
        return y
    return fn


def forward(res, M=4096):
    dev, dt = "cuda", torch.bfloat16
    s2 = torch.cuda.Stream()
    for name, (K, N) in SH.items():
        gen = torch.Generator(device=dev).manual_seed(1)
        x = torch.randn(M, K, device=dev, dtype=dt, generator=gen)
        Wd = torch.randn(N, K, device=dev, dtype=dt, generator=gen) * K ** -0.5
        dense = T(lambda: F.linear(x, Wd))
        for r in (2, 4, 8):
            L = ss1.SS1Linear(ss1.SS1Spec(K, N, False, r=r), dtype=dt, device=dev)
            rot, bk, kc = L.rot_tied, L.spec.bk, L.spec.buckets
            W = torch.randn(N, kc, device=dev, dtype=dt, generator=gen) * kc ** -0.5
            xs = torch.randn(M, kc, device=dev, dtype=dt, generator=gen)
            ref = x[:256].double() @ W.double()[:, L.bucket.long()].T
            t = dict(dense=dense, ideal=T(lambda: F.linear(xs, W)),
                     two=T(lambda: F.linear(ops.ss1_tied_sketch(x, rot, bk, kc), W)),
                     sk=T(lambda: ops.ss1_tied_sketch(x, rot, bk, kc)))
            err = dict(two=rel(F.linear(ops.ss1_tied_sketch(x, rot, bk, kc), W)[:256], ref))
            if r in (4, 8) and name in ("qo", "down"):
                t["fused"] = T(lambda: ops.ss1_tied_decode(x, rot, W, None, bk))
                err["fused"] = rel(ops.ss1_tied_decode(x, rot, W, None, bk)[:256], ref)
            u = torch.empty(M, kc, device=dev, dtype=dt)
            y = torch.empty(M, N, device=dev, dtype=dt)
            for n in (2, 4):
                for carve in (None, 12, 24):
                    key = f"ov{n}" + (f"c{carve}" if carve else "")
                    if carve:
                        torch._C._set_sm_carveout_experimental(carve)
                        torch.backends.cuda.preferred_blas_library("cublaslt")
                    try:
                        fn = overlap_fn(x, rot, bk, kc, W, n, s2, u, y)
                        t[key] = T(fn)
                        err[key] = rel(fn()[:256], ref)
                        if carve and n == 2:
                            t[f"ideal_c{carve}"] = T(lambda: F.linear(xs, W))
                    except Exception as e:  # noqa: BLE001 — a probe: record and go on
                        log(f"  {key} failed: {e!r}")
                    finally:
                        torch._C._set_sm_carveout_experimental(None)
                        torch.backends.cuda.preferred_blas_library("default")
            torch.cuda.synchronize()
            sk_floor = 2 * M * (K + kc) / 2.95e12 * 1e3
            res.append(dict(part="forward", shape=name, K=K, N=N, r=r, M=M, kc=kc, err=err, sk_floor=sk_floor, **t))
            log(f"FWD {name:5s} r={r} M={M} dense {dense:.4f} ideal {t['ideal']:.4f} ({dense/t['ideal']:.2f}x) | "
                + " ".join(f"{k} {v:.4f} ({t['ideal']/v:.2f})" for k, v in t.items() if k not in ("dense", "ideal"))
                + f" | sketch floor {sk_floor:.4f} | err " + " ".join(f"{k} {v:.1e}" for k, v in err.items()))


def sketch_bw(res):
    """The sketch pass against torch ops moving the same bytes (read M·K, write M·Kc), M = 4096 / 16384."""
    dev, dt = "cuda", torch.bfloat16
    for M in (4096, 16384):
        for name, (K, N) in SH.items():
            if name == "up":
                continue
            x = torch.randn(M, K, device=dev, dtype=dt)
            for r in (2, 4, 8):
                L = ss1.SS1Linear(ss1.SS1Spec(K, N, False, r=r), dtype=dt, device=dev)
                rot, bk, kc = L.rot_tied, L.spec.bk, L.spec.buckets
                half = M * (K + kc) // 2
                a, b = torch.empty(half, device=dev, dtype=dt), torch.empty(half, device=dev, dtype=dt)
                t = dict(sk=T(lambda: ops.ss1_tied_sketch(x, rot, bk, kc)),
                         rsum=T(lambda: x.view(M, kc, r).sum(-1)),
                         copy=T(lambda: b.copy_(a)), empty=T(lambda: torch.empty(0, device=dev).add_(1)))
                byt = 2 * M * (K + kc)
                res.append(dict(part="sketch_bw", shape=name, M=M, r=r, bytes=byt, **t))
                log(f"SKBW {name:5s} M={M:5d} r={r} bytes {byt/1e6:.0f} MB | " + " ".join(
                    f"{k} {v*1e3:.1f}us ({byt/v/1e9:.2f} TB/s)" for k, v in t.items()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/ss1_probe")
    ap.add_argument("--parts", nargs="*", default=["decode", "forward"])
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = []
    log(f"{torch.cuda.get_device_name()} torch {torch.__version__}")
    t0 = time.time()
    for p in a.parts:
        try:
            {"decode": decode, "decode16": decode16, "forward": forward, "sketch_bw": sketch_bw}[p](res)
        finally:
            (out / "probe.json").write_text(json.dumps(res, indent=1))
            (out / "probe.log").write_text("\n".join(LOG))
        log(f"[{p} done at {time.time() - t0:.0f} s]")


if __name__ == "__main__":
    main()
