"""Triton kernels for SS1 (imported lazily: Triton is optional, and `TRITON_INTERPRET=1` must be set before
this module is first imported for the interpreter to be used on CPU tensors).

Every table (bucket members, scales, rotations) is a runtime argument: one compiled binary per
dtype / tile configuration serves every layer. Accumulation is fp32; results are cast to the input dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tiles import grouped_tile


@triton.jit
def _sketch_kernel(x_ptr, mem_ptr, coef_ptr, u_ptr, M, KC, D,
                   sxm, sxk, sum_, suk, BM: tl.constexpr, BB: tl.constexpr):
    """u[m, b] = Σ_d coef[b, d] · x[m, mem[b, d]]   (mem = -1: empty slot)."""
    pid_m, pid_b = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rb = pid_b * BB + tl.arange(0, BB)
    mm, mb = rm < M, rb < KC
    acc = tl.zeros((BM, BB), dtype=tl.float32)
    for d in range(0, D):
        idx = tl.load(mem_ptr + rb * D + d, mask=mb, other=-1)
        c = tl.load(coef_ptr + rb * D + d, mask=mb, other=0.0)
        ok = idx >= 0
        xv = tl.load(x_ptr + rm[:, None] * sxm + tl.where(ok, idx, 0)[None, :] * sxk,
                     mask=mm[:, None] & (mb & ok)[None, :], other=0.0)
        acc += xv.to(tl.float32) * c.to(tl.float32)[None, :]
    tl.store(u_ptr + rm[:, None] * sum_ + rb[None, :] * suk, acc.to(u_ptr.dtype.element_ty),
             mask=mm[:, None] & mb[None, :])


@triton.jit
def _sketch_t_kernel(g_ptr, bkt_ptr, scale_ptr, gx_ptr, M, K,
                     sgm, sgb, sxm, sxk, BM: tl.constexpr, BK: tl.constexpr):
    """gx[m, i] = scale[i] · g[m, bucket[i]]   (the transposed sketch: a gather, no atomics)."""
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rk = pid_k * BK + tl.arange(0, BK)
    mm, mk = rm < M, rk < K
    b = tl.load(bkt_ptr + rk, mask=mk, other=0)
    s = tl.load(scale_ptr + rk, mask=mk, other=0.0)
    gv = tl.load(g_ptr + rm[:, None] * sgm + b[None, :] * sgb, mask=mm[:, None] & mk[None, :], other=0.0)
    out = gv.to(tl.float32) * s.to(tl.float32)[None, :]
    tl.store(gx_ptr + rm[:, None] * sxm + rk[None, :] * sxk, out.to(gx_ptr.dtype.element_ty),
             mask=mm[:, None] & mk[None, :])


@triton.jit
def _fused_kernel(x_ptr, w_ptr, rot_ptr, b_ptr, y_ptr, M, N, K, G, R, BN_H,
                  sxm, sxk, swn, swk, srn, srg, src, sym, syn,
                  HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """y = sketch_nb(x) @ w[nb-block]ᵀ (+ b), the sketch built while loading A tiles.

    For group g and member c the A tile is x[:, (g·R + c)·BK + ((p + rot[nb, g, c]) mod BK)], p ∈ [0, BK),
    summed over c (fp32), then one BK-deep dot with w[n, g·BK : (g+1)·BK]. rot has stride srn = 0 over
    the column block for the row-tied scheme. BK is the hash block; BN divides the hash column block BN_H.
    """
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    mm, mn = rm < M, rn < N
    nb = (pid_n * BN) // BN_H
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for g in range(0, G):
        a = tl.zeros((BM, BK), dtype=tl.float32)
        for c in range(0, R):
            rot = tl.load(rot_ptr + nb * srn + g * srg + c * src)
            cols = (g * R + c) * BK + (rk + rot) % BK
            a += tl.load(x_ptr + rm[:, None] * sxm + cols[None, :] * sxk,
                         mask=mm[:, None] & (cols < K)[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rn[None, :] * swn + (g * BK + rk)[:, None] * swk, mask=mn[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(a, w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a.to(w.dtype), w)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * sym + rn[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
             mask=mm[:, None] & mn[None, :])


_TILES = [triton.Config({"BM": bm, "BB": bb}, num_warps=w) for bm, bb, w in
          [(16, 128, 4), (32, 128, 4), (64, 128, 4), (64, 256, 8), (128, 128, 8), (128, 64, 4), (32, 256, 4),
           (256, 64, 8)]]
# tile choice is cached per (M, K, D) and never changes the result: each output sums its slots in order d
_sketch_tuned = triton.autotune([triton.Config({"BM": c.kwargs["BM"], "BB": c.kwargs["BB"]}, num_warps=c.num_warps)
                                 for c in _TILES], key=["M", "KC", "D"])(_sketch_kernel)
_sketch_t_tuned = triton.autotune([triton.Config({"BM": c.kwargs["BM"], "BK": c.kwargs["BB"]},
                                                 num_warps=c.num_warps) for c in _TILES],
                                  key=["M", "K"])(_sketch_t_kernel)


def sketch(x, members, coef):
    M, Kc, D = x.shape[0], members.shape[0], members.shape[1]
    u = torch.empty(M, Kc, dtype=x.dtype, device=x.device)
    args = (x, members, coef, u, M, Kc, D, x.stride(0), x.stride(1), u.stride(0), u.stride(1))
    if x.is_cuda:
        _sketch_tuned[lambda m: (triton.cdiv(M, m["BM"]), triton.cdiv(Kc, m["BB"]))](*args)
    else:
        _sketch_kernel[(triton.cdiv(M, 16), triton.cdiv(Kc, 32))](*args, BM=16, BB=32)
    return u


def sketch_t(g, bucket, scale, K):
    M = g.shape[0]
    gx = torch.empty(M, K, dtype=g.dtype, device=g.device)
    args = (g, bucket, scale, gx, M, K, g.stride(0), g.stride(1), gx.stride(0), gx.stride(1))
    if g.is_cuda:
        _sketch_t_tuned[lambda m: (triton.cdiv(M, m["BM"]), triton.cdiv(K, m["BK"]))](*args)
    else:
        _sketch_t_kernel[(triton.cdiv(M, 16), triton.cdiv(K, 32))](*args, BM=16, BK=32)
    return gx


def fused(x, weight, rot, bias, bk, bn_h):
    """rot: (NB or 1, G, r) int32; NB = 1 means the same rotations for every column block."""
    M, K = x.shape
    N = weight.shape[0]
    G, R = rot.shape[1], rot.shape[2]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    BM = 128 if M > 64 else max(16, triton.next_power_of_2(M))
    BN = 128 if rot.shape[0] == 1 else min(128, bn_h & -bn_h)
    if x.device.type == "cpu":
        BM, BN = min(BM, 16), min(BN, 16)
    srn = 0 if rot.shape[0] == 1 else rot.stride(0)
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
    _fused_kernel[grid](x, weight, rot, bias if bias is not None else weight, y, M, N, K, G, R, bn_h,
                        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
                        srn, rot.stride(1), rot.stride(2), y.stride(0), y.stride(1),
                        HAS_BIAS=bias is not None,  # the interpreter mis-handles bf16 dots: fp32 there
                        IEEE=x.dtype == torch.float32 or x.device.type == "cpu",
                        BM=BM, BN=BN, BK=bk, GROUP_M=8, num_warps=8 if BM >= 128 else 4, num_stages=3)
    return y


# ----------------------------------------------------------------------------- tied scheme (contiguous runs)
#
# Tied: feature i = (g·R + c)·BK + j goes to bucket g·BK + ((j − δ_c) mod BK), δ_c a multiple of VEC. So the
# u column k = g·BK + VEC·a + e (a < BK/VEC, e < VEC) reads, for member c, the x column
#     col(k, c) = (g·R + c)·BK + VEC·((a + δ_c/VEC) mod (BK/VEC)) + e,
# runs of VEC consecutive columns starting at multiples of VEC: 16-byte vector loads for bf16 with VEC = 8.
# The same index map, read backwards, is the transposed sketch (a bijection: every gx column written once).

@triton.jit
def _tied_cols(k, rot_ptr, c, R: tl.constexpr, BK: tl.constexpr, VEC: tl.constexpr):
    A: tl.constexpr = BK // VEC
    s = tl.load(rot_ptr + c) // VEC
    g = k // BK
    a = (k % BK) // VEC
    col = (g * R + c) * BK + ((a + s) % A) * VEC + k % VEC
    return tl.max_contiguous(tl.multiple_of(col, VEC), VEC)


@triton.jit
def _tied_mask(mm, mk, col, K, EVEN_K: tl.constexpr):
    """Rows mm × buckets mk, and (unless K is a multiple of the hash block) the member columns inside K."""
    if EVEN_K:
        return mm[:, None] & mk[None, :]
    return mm[:, None] & (mk & (col < K))[None, :]


@triton.jit
def _tied_sketch_tile(x_ptr, rot_ptr, rm, rk, mm, mk, sxm, K, R: tl.constexpr, BK: tl.constexpr, VEC: tl.constexpr,
                      EVEN_K: tl.constexpr):
    """u[rm, rk] of the tied sketch in fp32: the sum of x's R rotated columns of every bucket (rows rm, buckets
    rk; mm / mk their masks; columns at or beyond K read as zero)."""
    xrow = x_ptr + rm.to(tl.int64)[:, None] * sxm
    acc = tl.zeros((rm.shape[0], rk.shape[0]), dtype=tl.float32)
    for c in tl.static_range(R):
        col = _tied_cols(rk, rot_ptr, c, R, BK, VEC)
        acc += tl.load(xrow + col[None, :], mask=_tied_mask(mm, mk, col, K, EVEN_K), other=0.0).to(tl.float32)
    return acc


@triton.jit
def _tied_sketch_kernel(x_ptr, rot_ptr, u_ptr, M, K, KC, sxm, sum_, MB, R: tl.constexpr,
                        BK: tl.constexpr, VEC: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr,
                        EVEN_K: tl.constexpr):
    """u[m, k] = Σ_c x[m, col(k, c)] (fp32 accumulation, members in order c = 0..R-1)."""
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rk = pid_k * BC + tl.arange(0, BC)
    rk = tl.max_contiguous(tl.multiple_of(rk, BC), BC)
    mm, mk = rm < M, rk < KC
    acc = _tied_sketch_tile(x_ptr, rot_ptr, rm, rk, mm, mk, sxm, K, R, BK, VEC, EVEN_K)
    tl.store(u_ptr + rm.to(tl.int64)[:, None] * sum_ + rk[None, :], acc.to(u_ptr.dtype.element_ty),
             mask=mm[:, None] & mk[None, :])


@triton.jit
def _tied_sketch_t_kernel(g_ptr, rot_ptr, gx_ptr, M, K, KC, sgm, sxm, MB, R: tl.constexpr,
                          BK: tl.constexpr, VEC: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr,
                          EVEN_K: tl.constexpr):
    """gx[m, col(k, c)] = g[m, k] for every member c: one read of g, R vectorised writes."""
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rk = pid_k * BC + tl.arange(0, BC)
    rk = tl.max_contiguous(tl.multiple_of(rk, BC), BC)
    mm, mk = rm < M, rk < KC
    gv = tl.load(g_ptr + rm.to(tl.int64)[:, None] * sgm + rk[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
    gv = gv.to(gx_ptr.dtype.element_ty)
    xrow = gx_ptr + rm.to(tl.int64)[:, None] * sxm
    for c in tl.static_range(R):
        col = _tied_cols(rk, rot_ptr, c, R, BK, VEC)
        tl.store(xrow + col[None, :], gv, mask=_tied_mask(mm, mk, col, K, EVEN_K))


@triton.jit
def _tied_mm_kernel(x_ptr, rot_ptr, w_ptr, b_ptr, y_ptr, M, N, K, KC, sxm, swn, sym, MB, R: tl.constexpr,
                    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, EVEN_K: tl.constexpr, EVEN_KC: tl.constexpr,
                    BK: tl.constexpr, VEC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr,
                    DOT: tl.constexpr, GROUP_M: tl.constexpr):
    """y = sketch(x) W0ᵀ (+ b) in one launch: the (BM × BC) A tile is the fp32 sum of the R rotated x runs
    (16-byte loads; x is small or L2-resident), W0 streams once in (BN × BC) tiles, fp32 accumulation, no
    split-K (deterministic). DOT: tensor-core dot (A padded to BM ≥ 16 rows); else BM = 1 and a CUDA-core
    broadcast-multiply-sum (the GEMV form for M = 1). Tiles are grouped GROUP_M row-blocks at a time."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mm, mn = rm < M, rn < N
    xrow = x_ptr + rm.to(tl.int64)[:, None] * sxm
    wrow = w_ptr + rn.to(tl.int64)[:, None] * swn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, KC, BC):
        rk = k0 + tl.arange(0, BC)
        rk = tl.max_contiguous(tl.multiple_of(rk, BC), BC)
        mk = rk < KC
        if EVEN_KC:
            w = tl.load(wrow + rk[None, :], mask=tl.broadcast_to(mn[:, None], (BN, BC)), other=0.0)
        else:
            w = tl.load(wrow + rk[None, :], mask=mn[:, None] & mk[None, :], other=0.0)
        if R == 1 and DOT:   # plain GEMM/GEMV of u: the operand goes straight to the dot (pipelined like W)
            if EVEN_K and EVEN_KC:
                a = tl.load(xrow + rk[None, :], mask=tl.broadcast_to(mm[:, None], (BM, BC)), other=0.0)
            else:
                a = tl.load(xrow + rk[None, :], mask=mm[:, None] & (mk & (rk < K))[None, :], other=0.0)
        else:
            a = tl.zeros((BM, BC), dtype=tl.float32)
            for c in tl.static_range(R):
                col = _tied_cols(rk, rot_ptr, c, R, BK, VEC)
                if EVEN_K and EVEN_KC:
                    msk = tl.broadcast_to(mm[:, None], (BM, BC))
                else:
                    msk = mm[:, None] & (mk & (col < K))[None, :]
                a += tl.load(xrow + col[None, :], mask=msk, other=0.0).to(tl.float32)
        if DOT:
            if IEEE:
                acc += tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            else:
                acc += tl.dot(a.to(w.dtype), tl.trans(w))
        else:
            acc += tl.sum(a[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm.to(tl.int64)[:, None] * sym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mm[:, None] & mn[None, :])


@triton.jit
def _tied_gemv1_kernel(x_ptr, rot_ptr, w_ptr, b_ptr, y_ptr, N, K, KC, swn, R: tl.constexpr,
                       HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BK: tl.constexpr, VEC: tl.constexpr,
                       BN: tl.constexpr, KCP: tl.constexpr):
    """y[n] = Σ_k u[k] W0[n, k] for one input row, no loop: each program builds the whole sketch u (KCP ≥ Kc
    columns, fp32, from x in L2) and loads its BN full rows of W0 at once, so every byte it needs is in flight
    together (memory-level parallelism instead of a pipelined K loop); then one fp32 multiply-reduce."""
    pid = tl.program_id(0)
    rn = pid * BN + tl.arange(0, BN)
    mn = rn < N
    rk = tl.max_contiguous(tl.multiple_of(tl.arange(0, KCP), KCP), KCP)
    mk = rk < KC
    w = tl.load(w_ptr + rn.to(tl.int64)[:, None] * swn + rk[None, :], mask=mn[:, None] & mk[None, :], other=0.0)
    u = tl.zeros((KCP,), dtype=tl.float32)
    for c in tl.static_range(R):
        col = _tied_cols(rk, rot_ptr, c, R, BK, VEC)
        if EVEN_K:
            msk = mk
        else:
            msk = mk & (col < K)
        u += tl.load(x_ptr + col, mask=msk, other=0.0).to(tl.float32)
    acc = tl.sum(w.to(tl.float32) * u[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=mn, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, acc.to(y_ptr.dtype.element_ty), mask=mn)


from .ss1 import GEMV1_MAX_KC  # noqa: E402  (the one-shot kernel holds BN × next_pow2(Kc) weights in registers)


def _tied_vec(rot, bk: int) -> int:
    """Largest power of two ≤ 8 dividing bk and every rotation: the run length of contiguous columns."""
    import math
    v = bk
    for d in rot.tolist() if rot.device.type == "cpu" else rot.cpu().tolist():
        v = math.gcd(v, int(d))
    return min(8, v & -v)


_VEC_CACHE: dict = {}


def tied_vec(rot, bk: int) -> int:
    key = (rot.data_ptr(), rot._version, rot.numel(), bk)
    v = _VEC_CACHE.get(key)
    if v is None:
        v = _VEC_CACHE[key] = _tied_vec(rot, bk)
    return v


# (BM rows, BC u-columns, warps); MB = M rounded up to a power of two is the tuning key (not M itself).
_SK_CONFIGS = [triton.Config({"BM": bm, "BC": bc}, num_warps=w) for bm, bc, w in
               [(1, 256, 1), (4, 256, 2), (16, 256, 4), (32, 128, 4), (32, 256, 8), (64, 128, 8), (16, 512, 8),
                (64, 256, 8), (32, 512, 8)]]


def _quick_bench(fn, quantiles=None):   # autotuning: short runs (the kernels take µs), median
    from triton.testing import do_bench
    return do_bench(fn, warmup=5, rep=15, quantiles=quantiles)


def _autotune(configs, key, prune=None):
    extra = {"prune_configs_by": {"early_config_prune": prune}} if prune else {}
    try:
        return triton.autotune(configs, key=key, do_bench=_quick_bench, **extra)
    except TypeError:   # older Triton: no do_bench argument
        return triton.autotune(configs, key=key, warmup=5, rep=15, **extra)


_tied_sketch_tuned = _autotune(_SK_CONFIGS, ["MB", "KC", "K", "R"])(_tied_sketch_kernel)
_tied_sketch_t_tuned = _autotune(_SK_CONFIGS, ["MB", "KC", "K", "R"])(_tied_sketch_t_kernel)
def _mm_config(bm, bn, bc, dot, w, s, gm=1):
    return triton.Config({"BM": bm, "BN": bn, "BC": bc, "DOT": dot, "GROUP_M": gm}, num_warps=w, num_stages=s)


# decode (M ≤ 16): one row tile; BN small enough that N / BN fills the SMs without split-K. The CUDA-core form
# (DOT False, BM = 1) only for M = 1; the tensor-core form pads the rows to 16.
_DEC_CONFIGS = [_mm_config(*c) for c in
                [(1, 16, 512, False, 4, 3), (1, 32, 256, False, 4, 3), (1, 32, 512, False, 8, 3),
                 (1, 64, 256, False, 8, 2),
                 (16, 16, 256, True, 4, 3), (16, 32, 256, True, 4, 3), (16, 64, 256, True, 4, 3),
                 (16, 64, 128, True, 4, 4), (16, 128, 128, True, 8, 3)]]
# M > 16: a tiled GEMM whose A operand is the sketch built from x tiles (one pass over x, no u in memory)
_FUSED_CONFIGS = [_mm_config(*c, gm=8) for c in
                  [(128, 256, 64, True, 8, 3), (128, 128, 64, True, 8, 4), (128, 128, 32, True, 4, 4),
                   (64, 256, 64, True, 8, 3), (256, 128, 64, True, 8, 3)]]


def _prune_dec(configs, named_args, **kw):
    mb = named_args["MB"]
    return [c for c in configs if c.kwargs["DOT"] or mb == 1] or configs


# one-shot M = 1: BN rows × KCP columns per program, 8K or 16K elements (4 or 8 warps)
_G1_CONFIGS = [triton.Config({"BN": bn}, num_warps=w) for bn, w in
               [(1, 4), (2, 4), (4, 4), (8, 4), (16, 4), (32, 4), (64, 4), (2, 8), (4, 8), (8, 8), (16, 8), (32, 8),
                (64, 8), (128, 8)]]


G1_PER_THREAD = (32, 64, 128)   # weights per thread the one-shot kernel's configurations may hold


def _prune_g1(configs, named_args, **kw):
    kcp = kw.get("KCP") or named_args.get("KCP")
    keep = [c for c in configs if c.kwargs["BN"] * kcp // (32 * c.num_warps) in G1_PER_THREAD]
    return keep or configs[:1]


_tied_gemv1_tuned = _autotune(_G1_CONFIGS, ["N", "KC", "K", "R"], _prune_g1)(_tied_gemv1_kernel)
_tied_decode_tuned = _autotune(_DEC_CONFIGS, ["MB", "N", "KC", "K", "R"], _prune_dec)(_tied_mm_kernel)
_tied_fused_tuned = _autotune(_FUSED_CONFIGS, ["MB", "N", "KC", "K", "R"])(_tied_mm_kernel)


def _mb(M):
    return triton.next_power_of_2(max(int(M), 1))


def _tied_launch(plain, tuned, src, out, rot, bk, M, K, kc):
    """Run a tied sketch kernel (forward or transposed) from `src` into `out`; autotuned on CUDA."""
    R = rot.shape[0]
    args = (src, rot, out, M, K, kc, src.stride(0), out.stride(0), _mb(M), R)
    meta = dict(BK=bk, VEC=tied_vec(rot, bk), EVEN_K=K == kc * R)
    if src.is_cuda:
        tuned[lambda m: (triton.cdiv(M, m["BM"]), triton.cdiv(kc, m["BC"]))](*args, **meta)
    else:
        plain[(triton.cdiv(M, 4), triton.cdiv(kc, 16))](*args, **meta, BM=4, BC=16)
    return out


def tied_sketch(x, rot, bk, kc):
    """u (M × kc) = x S for the tied scheme; x (M × K) with unit column stride, rot (R,) int32 = δ_c."""
    M, K = x.shape
    u = torch.empty(M, kc, dtype=x.dtype, device=x.device)
    return _tied_launch(_tied_sketch_kernel, _tied_sketch_tuned, x, u, rot, bk, M, K, kc)


def tied_sketch_t(g, rot, bk, K):
    """gx (M × K) = g Sᵀ for the tied scheme; g (M × kc) with unit column stride."""
    M, kc = g.shape
    gx = torch.empty(M, K, dtype=g.dtype, device=g.device)
    return _tied_launch(_tied_sketch_t_kernel, _tied_sketch_t_tuned, g, gx, rot, bk, M, K, kc)


def tied_mm(x, rot, weight, bias, bk, config=None, gemv1=True, wg16=True):
    """y (M × N) = sketch(x) weightᵀ + bias in one launch. M ≤ 16: the decode configurations (one row tile);
    larger M: the tiled fused GEMM. `config` (a dict of BM, BN, BC, DOT, GROUP_M, num_warps, num_stages)
    bypasses the autotuner. R = 1 with rot = [0] is a plain GEMV/GEMM of x (already a sketch) with weight.
    M = 1 on CUDA (Kc ≤ GEMV1_MAX_KC) runs the one-shot GEMV kernel unless gemv1 is False; 2 ≤ M ≤ 16 on sm_90+
    runs the weight-streaming TMA kernel (`_ss1_wgemm.decode16`, session 6) unless wg16 is False."""
    M, K = x.shape
    N, kc = weight.shape
    R = rot.shape[0]
    assert weight.stride(1) == 1 and x.stride(1) == 1
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    args = (x, rot, weight, bias if bias is not None else weight, y, M, N, K, kc, x.stride(0),
            weight.stride(0), y.stride(0), _mb(M), R)
    meta = dict(HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32 or x.device.type == "cpu",
                EVEN_K=K == kc * R, BK=bk, VEC=tied_vec(rot, bk))
    grid = lambda m: (triton.cdiv(M, m["BM"]) * triton.cdiv(N, m["BN"]),)
    if M == 1 and config is None and x.is_cuda and kc <= GEMV1_MAX_KC and gemv1:
        return tied_gemv1(x, rot, weight, bias, bk, out=y)
    if 2 <= M <= 16 and config is None and x.is_cuda and wg16:
        from structlin.kernels import _ss1_wgemm as wg
        if wg.available(x.device) and wg.supported(x, weight, False):
            return wg.decode16(x, rot, weight, bias, bk)
    if not x.is_cuda:   # interpreter: small tiles, both forms
        cfg = dict(BM=1, BN=16, BC=16, DOT=False, GROUP_M=1) if M == 1 else \
            dict(BM=16, BN=16, BC=16, DOT=True, GROUP_M=2)
        config = {**cfg, **(config or {})}
    if config is not None:
        c = dict(config)
        _tied_mm_kernel[grid(c)](*args, **meta, EVEN_KC=kc % c["BC"] == 0, **c)
    else:
        tuned = _tied_decode_tuned if M <= 16 else _tied_fused_tuned
        cfgs = _DEC_CONFIGS if M <= 16 else _FUSED_CONFIGS
        tuned[grid](*args, **meta, EVEN_KC=all(kc % c.kwargs["BC"] == 0 for c in cfgs))
    return y


def tied_gemv1(x, rot, weight, bias, bk, out=None, BN=None):
    """y (1 × N) = sketch(x) weightᵀ + bias, the one-shot kernel (autotuned on CUDA; BN given: that tile)."""
    assert x.shape[0] == 1 and weight.stride(1) == 1 and x.stride(1) == 1
    K, (N, kc), R = x.shape[1], weight.shape, rot.shape[0]
    y = out if out is not None else torch.empty(1, N, dtype=x.dtype, device=x.device)
    args = (x, rot, weight, bias if bias is not None else weight, y, N, K, kc, weight.stride(0), R)
    meta = dict(HAS_BIAS=bias is not None, EVEN_K=K == kc * R, BK=bk, VEC=tied_vec(rot, bk),
                KCP=triton.next_power_of_2(kc))
    if BN is None and x.is_cuda:
        _tied_gemv1_tuned[lambda m: (triton.cdiv(N, m["BN"]),)](*args, **meta)
    else:
        BN = BN or 4
        _tied_gemv1_kernel[(triton.cdiv(N, BN),)](*args, **meta, BN=BN)
    return y


def tied_decode(x, rot, weight, bias, bk):
    """y (M × N) = sketch(x) weightᵀ + bias in one launch; M ≤ 16 (one row tile)."""
    assert x.shape[0] <= 16
    return tied_mm(x, rot, weight, bias, bk)


# ----------------------------------------------------------------------------- decode 2 ≤ M ≤ 16: sketch once, then GEMM
#
# sketch + cuBLAS pays two kernels' fixed cost (launch + first-byte latency + tail, ~2 µs each back to back);
# the K-looped fused kernel rebuilds u = x S per program (M·r/BN × the weight in L2 traffic). The kernel below
# builds u once per call and removes the second launch's fixed cost, in one of two ways (MODE):
#   1  one launch: every program draws a ticket (atomic counter); tickets < S build u (S column chunks, all M
#      rows, stored to a small u buffer in x's dtype — the same rounding as the two-pass path) and release a
#      `ready` counter; the other programs prefetch their first PREF weight columns into L2, spin (acquire) until
#      ready == S, then run the GEMM on u. Roles come from tickets, not program ids, so every sketch program is
#      already running when a GEMM program waits (no deadlock whatever the block scheduling order). The last
#      GEMM program past the wait resets the counters (the next call starts from zero).
#   3 + 2  programmatic dependent launch: MODE 3 = the sketch alone (calls griddepcontrol.launch_dependents
#      first), MODE 2 = the GEMM launched with launch_pdl=True: it prefetches its weight into L2, then waits in
#      griddepcontrol.wait for the sketch grid to complete.
#   0  the GEMM alone on a given u (no synchronisation).
# fp32 accumulation, fixed summation order, no split-K: deterministic. M ≤ 16 rows in one 16-row tile.

@triton.jit
def _l2_prefetch(ptrs):
    return tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                                     dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _sk16_sketch(x_ptr, rot_ptr, u_ptr, M, K, KC, sxm, pid, R: tl.constexpr, EVEN_K: tl.constexpr,
                 BK: tl.constexpr, VEC: tl.constexpr, SBC: tl.constexpr):
    rm = tl.arange(0, 16)
    mm = rm < M
    rk = pid * SBC + tl.arange(0, SBC)
    rk = tl.max_contiguous(tl.multiple_of(rk, SBC), SBC)
    mk = rk < KC
    acc = _tied_sketch_tile(x_ptr, rot_ptr, rm, rk, mm, mk, sxm, K, R, BK, VEC, EVEN_K)
    tl.store(u_ptr + rm[:, None] * KC + rk[None, :], acc.to(u_ptr.dtype.element_ty), mask=mm[:, None] & mk[None, :])


@triton.jit
def _sk16_gemm(u_ptr, w_ptr, b_ptr, y_ptr, sync_ptr, M, N, KC, swn, sym, S, G, pid, MODE: tl.constexpr,
               HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, EVEN_KC: tl.constexpr, BN: tl.constexpr,
               BC: tl.constexpr, PREF: tl.constexpr, LINE: tl.constexpr):
    rm = tl.arange(0, 16)
    mm = rm < M
    rn = pid * BN + tl.arange(0, BN)
    mn = rn < N
    wrow = w_ptr + rn.to(tl.int64)[:, None] * swn
    urow = u_ptr + rm[:, None] * KC
    # register double-buffering: tile k + 1 is loaded before tile k's dot (the loop is not software-pipelined
    # by Triton here); the first weight tile is loaded before the wait, it does not depend on u
    rk = tl.max_contiguous(tl.multiple_of(tl.arange(0, BC), BC), BC)
    if EVEN_KC:
        w_nx = tl.load(wrow + rk[None, :], mask=tl.broadcast_to(mn[:, None], (BN, BC)), other=0.0)
    else:
        w_nx = tl.load(wrow + rk[None, :], mask=mn[:, None] & (rk < KC)[None, :], other=0.0)
    if PREF > 0:   # the next PREF weight columns of this program's rows, into L2, while u is being built
        rl = tl.minimum(BC + tl.arange(0, PREF // LINE) * LINE, KC - 1)
        _l2_prefetch(w_ptr + tl.minimum(rn, N - 1).to(tl.int64)[:, None] * swn + rl[None, :])
    _sk16_wait(sync_ptr, S, G, MODE)
    a_nx = tl.load(urow + rk[None, :], mask=mm[:, None] & (rk < KC)[None, :], other=0.0, cache_modifier=".cg")
    acc = tl.zeros((16, BN), dtype=tl.float32)
    for k0 in range(0, KC, BC):
        w = w_nx
        a = a_nx
        rk = k0 + BC + tl.arange(0, BC)
        rk = tl.max_contiguous(tl.multiple_of(rk, BC), BC)
        mk = rk < KC
        w_nx = tl.load(wrow + rk[None, :], mask=mn[:, None] & mk[None, :], other=0.0)
        a_nx = tl.load(urow + rk[None, :], mask=mm[:, None] & mk[None, :], other=0.0, cache_modifier=".cg")
        if IEEE:
            acc += tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(a.to(w.dtype), tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm.to(tl.int64)[:, None] * sym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mm[:, None] & mn[None, :])


@triton.jit
def _sk16_wait(sync_ptr, S, G, MODE: tl.constexpr):
    if MODE == 1:
        ready = tl.atomic_add(sync_ptr + 1, 0, sem="acquire")
        spins = 0
        while (ready < S) & (spins < 20000000):
            ready = tl.atomic_add(sync_ptr + 1, 0, sem="acquire")
            spins += 1
        if ready < S:   # never expected: flag it for the host instead of hanging the GPU
            tl.atomic_xchg(sync_ptr + 3, 1)
        done = tl.atomic_add(sync_ptr + 2, 1, sem="relaxed")
        if done == G - 1:   # every ticket drawn and every GEMM program past the wait: reset for the next call
            tl.atomic_xchg(sync_ptr, 0)
            tl.atomic_xchg(sync_ptr + 1, 0)
            tl.atomic_xchg(sync_ptr + 2, 0)
    if MODE == 2:
        tl.extra.cuda.gdc_wait()


@triton.jit
def _sk16_gemm_shot(u_ptr, w_ptr, b_ptr, y_ptr, sync_ptr, ws_ptr, cnt_ptr, M, N, KC, swn, sym, S, G, SPLIT, pid,
                    MODE: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, EVEN_KC: tl.constexpr,
                    BN: tl.constexpr, BC: tl.constexpr):
    """One-shot form: program (column block nb, K chunk ks) loads its whole BN × BC weight block at once, before
    the wait (all its bytes in flight together, like the M = 1 kernel), then one BC-deep dot with u's chunk.
    SPLIT > 1: fp32 partials to `ws`; the last program of a column block (per-block counter, acq_rel) sums
    them in chunk order 0..SPLIT-1 (deterministic whoever arrives last) and resets the counter."""
    nb = pid // SPLIT
    ks = pid % SPLIT
    rm = tl.arange(0, 16)
    mm = rm < M
    rn = nb * BN + tl.arange(0, BN)
    mn = rn < N
    rk = ks * BC + tl.arange(0, BC)
    rk = tl.max_contiguous(tl.multiple_of(rk, BC), BC)
    mk = rk < KC
    if EVEN_KC:
        w = tl.load(w_ptr + rn.to(tl.int64)[:, None] * swn + rk[None, :],
                    mask=tl.broadcast_to(mn[:, None], (BN, BC)), other=0.0)
    else:
        w = tl.load(w_ptr + rn.to(tl.int64)[:, None] * swn + rk[None, :], mask=mn[:, None] & mk[None, :], other=0.0)
    _sk16_wait(sync_ptr, S, G, MODE)
    a = tl.load(u_ptr + rm[:, None] * KC + rk[None, :], mask=mm[:, None] & mk[None, :], other=0.0,
                cache_modifier=".cg")
    if IEEE:
        acc = tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
    else:
        acc = tl.dot(a.to(w.dtype), tl.trans(w))
    ymask = mm[:, None] & mn[None, :]
    if SPLIT > 1:
        tile = rm[:, None] * N + rn[None, :]
        tl.store(ws_ptr + ks * 16 * N + tile, acc, mask=ymask)
        tl.debug_barrier()
        old = tl.atomic_add(cnt_ptr + nb, 1, sem="acq_rel")
        if old == SPLIT - 1:
            acc = tl.zeros((16, BN), dtype=tl.float32)
            for j in range(0, SPLIT):
                acc += tl.load(ws_ptr + j * 16 * N + tile, mask=ymask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                acc += tl.load(b_ptr + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + rm.to(tl.int64)[:, None] * sym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=ymask)
            tl.atomic_xchg(cnt_ptr + nb, 0)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm.to(tl.int64)[:, None] * sym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=ymask)


@triton.jit
def _tied_sk16_kernel(x_ptr, rot_ptr, u_ptr, w_ptr, b_ptr, y_ptr, sync_ptr, ws_ptr, cnt_ptr, M, N, K, KC, sxm, swn,
                      sym, S, G, SPLIT, MB, R: tl.constexpr, MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
                      IEEE: tl.constexpr, EVEN_K: tl.constexpr, EVEN_KC: tl.constexpr, BK: tl.constexpr,
                      VEC: tl.constexpr, LINE: tl.constexpr, SBC: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr,
                      PREF: tl.constexpr, SHOT: tl.constexpr):
    """y = sketch(x) W0ᵀ (+ b) for M ≤ 16; MODE as described above; SHOT: the one-shot split-K GEMM body
    (_sk16_gemm_shot) instead of the K loop (_sk16_gemm)."""
    if MODE == 3:
        tl.extra.cuda.gdc_launch_dependents()
        _sk16_sketch(x_ptr, rot_ptr, u_ptr, M, K, KC, sxm, tl.program_id(0), R, EVEN_K, BK, VEC, SBC)
    else:
        if MODE == 1:
            t = tl.atomic_add(sync_ptr, 1, sem="relaxed")
        else:
            t = tl.program_id(0) + S
        if t < S:
            _sk16_sketch(x_ptr, rot_ptr, u_ptr, M, K, KC, sxm, t, R, EVEN_K, BK, VEC, SBC)
            tl.debug_barrier()   # every thread's u stores before the release below
            tl.atomic_add(sync_ptr + 1, 1, sem="release")
        elif SHOT:
            _sk16_gemm_shot(u_ptr, w_ptr, b_ptr, y_ptr, sync_ptr, ws_ptr, cnt_ptr, M, N, KC, swn, sym, S, G, SPLIT,
                            t - S, MODE, HAS_BIAS, IEEE, EVEN_KC, BN, BC)
        else:
            _sk16_gemm(u_ptr, w_ptr, b_ptr, y_ptr, sync_ptr, M, N, KC, swn, sym, S, G, t - S, MODE, HAS_BIAS,
                       IEEE, EVEN_KC, BN, BC, PREF, LINE)


def _sk16_config(bn, bc, pref, w=4, shot=False, sbc=256):
    return triton.Config({"BN": bn, "BC": bc, "SBC": sbc, "PREF": pref, "SHOT": shot}, num_warps=w, num_stages=1)


# K-loop body: N / BN programs over the whole Kc. One-shot body (SHOT): (N / BN) × (Kc / BC) programs, each with
# its whole BN × BC weight block in flight at once (BC = the K chunk), deterministic split-K reduction.
_SK16_CONFIGS = [_sk16_config(*c) for c in
                 [(32, 256, 1024), (16, 512, 2048),
                  (16, 512, 0, 4, True), (16, 1024, 0, 4, True), (32, 512, 0, 4, True), (16, 2048, 0, 8, True),
                  (32, 1024, 0, 8, True)]]
_SK16_SYNC: dict = {}


def _sk16_sync(dev):
    """The counters of the one-launch form (ticket, ready, done, timeout flag) then one split-K counter per
    column block, one set per (device, stream): calls on one stream run one after another, so they share it."""
    dev = torch.device(dev)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    key = (dev, torch.cuda.current_stream(dev).cuda_stream if dev.type == "cuda" else 0)
    s = _SK16_SYNC.get(key)
    if s is None:
        s = _SK16_SYNC[key] = torch.zeros(4 + 65536, dtype=torch.int32, device=dev)
    return s


def _sk16_pdl_ok():
    try:
        return torch.cuda.get_device_capability()[0] >= 9 and hasattr(tl.extra.cuda, "gdc_wait")
    except Exception:   # noqa: BLE001
        return False


def tied_sk16(x, rot, weight, bias, bk, mode="one", config=None, u=None):
    """y (M × N) = sketch(x) weightᵀ + bias for M ≤ 16. mode "one": one launch (tickets; see above); "pdl": the
    sketch then the GEMM under programmatic dependent launch (CUDA, sm_90+); "gemm": the GEMM alone on the
    given sketch `u` (M × Kc); "auto": the faster of "one" and "pdl", timed once per shape. `config` (BN, BC, SBC, PREF, num_warps, num_stages) bypasses the tile choice."""
    M, K = x.shape
    N, kc = weight.shape
    R = rot.shape[0]
    assert M <= 16 and weight.stride(1) == 1 and x.stride(1) == 1
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if u is None:
        u = torch.empty(M, kc, dtype=x.dtype, device=x.device)
    cuda = x.is_cuda
    sync = _sk16_sync(x.device)
    meta = dict(HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32 or not cuda, EVEN_K=K == kc * R,
                BK=bk, VEC=tied_vec(rot, bk), LINE=128 // x.element_size())
    if not cuda:   # interpreter: small tiles, no inline PTX (PREF = 0)
        config = {"BN": 16, "BC": 16, "SBC": 16, "SHOT": False, **(config or {}), "PREF": 0}
    if config is None and cuda:
        mode, config = _sk16_pick(mode, x, rot, weight, bias, bk, u)
    elif mode == "auto":
        mode = "one"
    c = {"SHOT": False, "PREF": 0, **config}
    opts = {k: c.pop(k) for k in ("num_warps", "num_stages") if k in c}
    split = triton.cdiv(kc, c["BC"]) if c["SHOT"] else 1
    S, G = triton.cdiv(kc, c["SBC"]), triton.cdiv(N, c["BN"]) * split
    assert triton.cdiv(N, c["BN"]) <= sync.numel() - 4, "more column blocks than split-K counters"
    ws = torch.empty(split, 16, N, dtype=torch.float32, device=x.device) if split > 1 else y

    def launch(mode_id, grid, S, **extra):
        _tied_sk16_kernel[(grid,)](x, rot, u, weight, bias if bias is not None else weight, y, sync, ws, sync[4:],
                                   M, N, K, kc, x.stride(0), weight.stride(0), y.stride(0), S, G, split, _mb(M), R,
                                   MODE=mode_id, **meta, EVEN_KC=kc % c["BC"] == 0, **c, **opts, **extra)
    if mode == "one":
        launch(1, S + G, S)
    elif mode == "pdl":   # the sketch grid's GEMM-tile constexprs are unused: fixed, so it compiles once per R
        _tied_sk16_kernel[(S,)](x, rot, u, weight, weight, y, sync, ws, sync[4:], M, N, K, kc, x.stride(0),
                                weight.stride(0), y.stride(0), S, G, split, _mb(M), R, MODE=3, **meta, EVEN_KC=True,
                                SBC=c["SBC"], BN=16, BC=16, PREF=0, SHOT=False, num_warps=4, num_stages=1)
        launch(2, G, 0, launch_pdl=True)
    else:
        launch(0, G, 0)
    return y


def sk16_timeouts(dev=None) -> int:
    """How many one-launch calls hit the spin limit so far on this stream (0 = all synchronised; a test hook)."""
    return int(_sk16_sync(dev or "cuda").cpu()[3])


_SK16_PICK: dict = {}


def _sk16_pick(mode, x, rot, weight, bias, bk, u):
    """(mode, tile) choice per (mode, M pow2, N, Kc, K, R, dtype, bias), timed once (short runs, median); cached.
    mode "auto" tries "one" and (sm_90+) "pdl". The choice never changes the result beyond fp32 summation order."""
    M, K = x.shape
    N, kc = weight.shape
    key = (mode, _mb(M), N, kc, K, rot.shape[0], x.dtype, bias is not None)
    best = _SK16_PICK.get(key)
    if best is None:
        modes = [mode] if mode != "auto" else ["one"] + (["pdl"] if _sk16_pdl_ok() else [])
        times = []
        for md in modes:
            for c in _SK16_CONFIGS:
                cfg = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
                try:
                    t = _quick_bench(lambda: tied_sk16(x, rot, weight, bias, bk, md, cfg, u))
                except Exception:   # noqa: BLE001 — a configuration that does not compile or fit: skip it
                    t = float("inf")
                times.append((t, md, cfg))
        t, md, cfg = min(times, key=lambda tc: tc[0])
        best = _SK16_PICK[key] = (md, cfg)
    return best
