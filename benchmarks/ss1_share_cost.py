"""Cost of SS1 data-aware sharing (`ss1.share_table`) on 7B-class layers, on the GPU, float64.

    PYTHONPATH=$PWD python3 benchmarks/ss1_share_cost.py [--out DIR]

Weights: random Gaussian W (N × K); calibration Gram C of synthetic activations with a decaying spectrum and
a few outlier channels (X = Z A, 8192 tokens), so the problem has the correlation structure sharing exploits.
Reports wall time of the whole projection (Gram damping, anchors, assignment, alternating least squares) and
the relative calibration output error of sharing, tied least squares at the same r, and whitened low-rank at
the same params, all from C.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from structlin.methods import ss1 as S
from structlin.methods.lowrank import factorize


class _Stats:
    def __init__(self, g):
        self.g = g

    def gram_mean(self):
        return self.g


def synthetic_gram(K, tokens, dev, seed):
    g = torch.Generator(device=dev).manual_seed(seed)
    A = torch.randn(K, K, generator=g, device=dev, dtype=torch.float64) / K ** 0.5
    A *= torch.logspace(0, -2, K, device=dev, dtype=torch.float64)[:, None]   # decaying latent spectrum
    Z = torch.randn(tokens, K, generator=g, device=dev, dtype=torch.float64)
    X = Z @ A
    X[:, torch.randperm(K, generator=g, device=dev)[:8]] *= 20.0                # outlier channels
    return X.T @ X / tokens


def rel_err(W, What, C):
    E = W - What
    return float(((E @ C) * E).sum() / ((W @ C) * W).sum())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096", help="KxN list")
    ap.add_argument("--r", default="2,4")
    a = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for shape in a.shapes.split(","):
        K, N = (int(v) for v in shape.split("x"))
        C = synthetic_gram(K, 8192, dev, 0)
        W = torch.randn(N, K, device=dev, dtype=torch.float64, generator=torch.Generator(device=dev).manual_seed(1))
        for r in (int(v) for v in a.r.split(",")):
            kc = -(-K // r)
            if dev == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            bucket, scale, W0, info = S.share_table(W, C, kc)
            if dev == "cuda":
                torch.cuda.synchronize()
            sec = time.perf_counter() - t
            used = int(torch.unique(bucket[scale != 0]).numel())
            e_share = rel_err(W, W0[:, bucket] * scale, C)          # Ŵ[:, i] = W0[:, bucket_i] · scale_i
            spec = S.SS1Spec(K, N, False, r=r, bk=32, scheme="tied")
            tb = S.tied_buckets(spec).to(dev)
            ts = torch.ones(K, dtype=torch.float64, device=dev)
            W0t = S.project_columns(W, tb, ts, spec.buckets, gram=C)
            e_tied = rel_err(W, W0t[:, tb] * ts, C)
            rank = max(1, (N * kc) // (N + K))
            u, v = factorize(W, rank, "whiten", _Stats(C))
            e_lr = rel_err(W, u @ v, C)
            row = {"K": K, "N": N, "r": r, "buckets": kc, "buckets_used": used, "seconds": sec,
                   "err_share": e_share, "err_tied_lstsq": e_tied, "err_whiten_lowrank": e_lr, "lowrank_rank": rank}
            rows.append(row)
            print(f"{K}->{N} r={r}: share {sec:.1f}s, buckets used {used}/{kc}, rel err share {e_share:.4f} "
                  f"tied-lstsq {e_tied:.4f} whiten-lowrank(rank {rank}) {e_lr:.4f}", flush=True)
    meta = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__}
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "ss1_share_cost.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
