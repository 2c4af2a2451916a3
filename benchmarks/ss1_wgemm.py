"""SS1 decode at 2 ≤ M ≤ 16: the swap-AB weight-streaming GEMM (`kernels/_ss1_wgemm`, session 6) against
sketch + cuBLAS, cuBLAS dense and the ideal (cuBLAS GEMM of depth Kc = K/r), bf16, Llama-3-8B shapes.

    python benchmarks/ss1_wgemm.py --out DIR      # writes DIR/wgemm.json and DIR/wgemm.log

Every timing is a CUDA-graph replay (`do_bench` median, L2 flushed per replay): `one` = a graph holding one call
(what benchmarks/ss1_layer.py times), `chain` = 8 calls on 8 distinct weights per graph, divided by 8.
Per row: each tile configuration of the GEMM alone on a given u (picked by its one-call graph time), then
sk+wg = tied sketch + that GEMM, pdl = the same under programmatic dependent launch (± an L2 prefetch of the
first weight columns while the sketch runs). Weight GB/s = 2·N·Kc bytes / time. GPU correctness vs float64
(odd shapes, every dtype, split-K, bias) and bitwise determinism are printed first.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import structlin.methods.ss1 as ss1
from structlin.kernels import ss1 as ops
from structlin.kernels import _ss1_wgemm as WG

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ss1_probe import LOG, T, llama_weights, log, rel  # noqa: E402  (the probe's shapes, log and graph timing)

# name: (BK, STAGES, HOST descriptors, waves) — SPLIT = round(waves · SMs / tiles). (Session-6 run 1 also
# timed Triton's warp specialisation, k128s4ws / k64s8ws: 4–15% slower, and wrong with split-K / an N tail:
# each consumer warpgroup runs the epilogue, so the split-K counter moved twice per program. Dropped.)
CFGS = {"k128s4": (128, 4, True, 1), "k128s4d": (128, 4, False, 1), "k128s3x2": (128, 3, True, 2)}
# (run 1 also timed k64s6 / k64s6x2 (BK 64, 6 stages, 1 or 2 waves): never faster than k128s4 / k128s3x2 by > 0.1 µs)



def cfg_of(name, N, kc, sms, pref=0):
    BK, st, host, waves = CFGS[name]
    tiles = -(-N // 128)
    return {"BK": BK, "STAGES": st, "HOST": host, "SPLIT": max(1, round(waves * sms / tiles)), "PREF": pref}


def odd(res):
    dev = "cuda"
    for (K, N, r, M, split) in [(1000, 300, 4, 5, 1), (4104, 777, 2, 16, 3), (336, 64, 8, 3, 2), (4096, 520, 2, 2, 4),
                                (14336, 4096, 8, 16, 4)]:
        L = ss1.SS1Linear(ss1.SS1Spec(K, N, True, r=r), dtype=torch.float64, device=dev)
        with torch.no_grad():
            L.bias.normal_()
        for d in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(M, K, device=dev, dtype=d)
            w, b = L.weight.to(d), L.bias.to(d)
            ref = x.double() @ L.to_dense().T.double() + L.bias.double()
            e = {}
            for v in ("fused", "sk", "pdl"):
                for host in (True, False):
                    c = {"SPLIT": split, "HOST": host, "BK": 32 if d == torch.float32 else 64, "STAGES": 3,
                         "PREF": 256}
                    try:
                        y = WG.decode16(x, L.rot_tied, w, b, L.spec.bk, v, c)
                        y2 = WG.decode16(x, L.rot_tied, w, b, L.spec.bk, v, c)
                        e[f"{v}/h{int(host)}"] = (float(f"{rel(y, ref):.2e}"), bool(torch.equal(y, y2)))
                    except Exception as ex:   # noqa: BLE001 — a probe: record and go on
                        e[f"{v}/h{int(host)}"] = repr(ex)[:200]
            y = ops.ss1_tied_decode(x, L.rot_tied, w, b, L.spec.bk)   # the op (default tiles) = the layer's path
            e["op"] = (float(f"{rel(y, ref):.2e}"), bool(torch.equal(y, ops.ss1_tied_decode(x, L.rot_tied, w, b,
                                                                                          L.spec.bk))))
            log(f"ODD K={K} N={N} r={r} M={M} split={split} {d} err,det {e}")
            res.append(dict(part="odd", K=K, N=N, r=r, M=M, dtype=str(d), err=e))


def rows(res, chain=8, ms=(2, 8, 16)):
    dev, dt = "cuda", torch.bfloat16
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for name, K, N, r, L, rot, bk, kc, Wd, X, W0, gen in llama_weights(chain, dev, dt):
        for M in ms:
            x = X[:M].contiguous()
            u = ops.ss1_tied_sketch(x, rot, bk, kc)
            ref = x.double() @ W0[0].double()[:, L.bucket.long()].T
            t, err = {}, {}
            t["dense"] = T(lambda: F.linear(x, Wd[0]))
            t["ideal"] = T(lambda: F.linear(u, W0[0]))
            t["sk+cublas"] = T(lambda: F.linear(ops.ss1_tied_sketch(x, rot, bk, kc), W0[0]))
            err["sk+cublas"] = rel(F.linear(ops.ss1_tied_sketch(x, rot, bk, kc), W0[0]), ref)
            for cn in CFGS:
                c = cfg_of(cn, N, kc, sms)
                try:
                    t["wg:" + cn] = T(lambda: WG.wgemm(u, W0[0], None, c))
                except Exception as ex:   # noqa: BLE001
                    log(f"  {cn} failed: {ex!r}"[:300])
                    t["wg:" + cn] = float("inf")
                try:
                    t["fu:" + cn] = T(lambda: WG.fused(x, rot, W0[0], None, bk, c))
                except Exception as ex:   # noqa: BLE001
                    log(f"  fused {cn} failed: {ex!r}"[:300])
                    t["fu:" + cn] = float("inf")
            bf = min(CFGS, key=lambda cn: t["fu:" + cn])
            cf = cfg_of(bf, N, kc, sms)
            t["fused"] = t["fu:" + bf]
            err["fused"] = rel(WG.fused(x, rot, W0[0], None, bk, cf), ref)
            detf = bool(torch.equal(WG.fused(x, rot, W0[0], None, bk, cf), WG.fused(x, rot, W0[0], None, bk, cf)))
            t["op"] = T(lambda: ops.ss1_tied_decode(x, rot, W0[0], None, bk))
            best = min(CFGS, key=lambda cn: t["wg:" + cn])
            c = cfg_of(best, N, kc, sms)
            t["wg"] = t["wg:" + best]
            t["sk+wg"] = T(lambda: WG.sketch_wgemm(x, rot, W0[0], None, bk, c))
            err["sk+wg"] = rel(WG.sketch_wgemm(x, rot, W0[0], None, bk, c), ref)
            det = bool(torch.equal(WG.sketch_wgemm(x, rot, W0[0], None, bk, c),
                                   WG.sketch_wgemm(x, rot, W0[0], None, bk, c)))
            prefs = [0, 512]
            for p in prefs:
                cp = dict(c, PREF=p)
                try:
                    t[f"pdl{p}"] = T(lambda: WG.sketch_wgemm(x, rot, W0[0], None, bk, cp, True))
                    err[f"pdl{p}"] = rel(WG.sketch_wgemm(x, rot, W0[0], None, bk, cp, True), ref)
                except Exception as ex:   # noqa: BLE001
                    log(f"  pdl{p} failed: {ex!r}"[:300])
                    t[f"pdl{p}"] = float("inf")
            bp = min(prefs, key=lambda p: t[f"pdl{p}"])
            t["pdl"] = t[f"pdl{bp}"]
            cpb = dict(c, PREF=bp)
            t["dense.chain"] = T(lambda: [F.linear(x, Wd[i]) for i in range(chain)]) / chain
            t["sk+cublas.chain"] = T(lambda: [F.linear(ops.ss1_tied_sketch(x, rot, bk, kc), W0[i])
                                              for i in range(chain)]) / chain
            t["sk+wg.chain"] = T(lambda: [WG.sketch_wgemm(x, rot, W0[i], None, bk, c)
                                          for i in range(chain)]) / chain
            t["pdl.chain"] = T(lambda: [WG.sketch_wgemm(x, rot, W0[i], None, bk, cpb, True)
                                        for i in range(chain)]) / chain
            t["fused.chain"] = T(lambda: [WG.fused(x, rot, W0[i], None, bk, cf) for i in range(chain)]) / chain
            wb = 2 * N * kc / 1e6   # weight bytes / 1e6 -> GB/s when divided by ms
            d1, dc = t["dense"], t["dense.chain"]
            res.append(dict(part="rows", shape=name, K=K, N=N, r=r, M=M, kc=kc, best=best, cfg=c, pref=bp,
                            best_fused=bf, err=err, det=det, det_fused=detf, **t))
            log(f"ROW {name:5s} r={r} M={M:2d} | one us: dense {d1*1e3:5.1f} ideal {t['ideal']*1e3:5.1f} "
                f"sk+cublas {t['sk+cublas']*1e3:5.1f} wg {t['wg']*1e3:5.1f} sk+wg {t['sk+wg']*1e3:5.1f} "
                f"pdl {t['pdl']*1e3:5.1f} fused {t['fused']*1e3:5.1f} op {t['op']*1e3:5.1f} | x dense: "
                f"ideal {d1/t['ideal']:.2f} "
                f"sk+cublas {d1/t['sk+cublas']:.2f} sk+wg {d1/t['sk+wg']:.2f} pdl {d1/t['pdl']:.2f} fused "
                f"{d1/t['fused']:.2f} op {d1/t['op']:.2f} | chain x: sk+cublas {dc/t['sk+cublas.chain']:.2f} "
                f"sk+wg {dc/t['sk+wg.chain']:.2f} pdl {dc/t['pdl.chain']:.2f} fused {dc/t['fused.chain']:.2f} | "
                f"weight GB/s: cuBLAS(ideal) {wb/t['ideal']:.0f} wg {wb/t['wg']:.0f} fused {wb/t['fused']:.0f} | "
                f"{best} split {c['SPLIT']} pref {bp} fused {bf} | "
                + " ".join(f"{cn} {t['wg:' + cn]*1e3:.1f}/{t['fu:' + cn]*1e3:.1f}" for cn in CFGS)
                + " | err " + " ".join(f"{k} {v:.1e}" for k, v in err.items()) + f" det {det}/{detf}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--parts", nargs="*", default=["odd", "rows"])
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log(f"device {torch.cuda.get_device_name()} torch {torch.__version__} triton "
        f"{__import__('triton').__version__}")
    res = []
    for p in a.parts:
        {"odd": odd, "rows": rows}[p](res)
        (out / "wgemm.json").write_text(json.dumps(res, indent=1, default=str))
        (out / "wgemm.log").write_text("\n".join(LOG) + "\n")


if __name__ == "__main__":
    main()
