"""Triton kernels for the exported LoSparse layer (imported lazily; see `structlin.kernels.losparse`).

All take the kept-row map as a runtime argument, so one compiled binary serves every layer.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from structlin.kernels import sm_count


@triton.jit
def _lr_add_kernel(h_ptr, l_ptr, b_ptr, inv_ptr, y_ptr, M, N, R,
                   shm, slm, sym, HAS_BIAS: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """y[m, n] = Σ_j h[m, j] L[n, j] (j < R) + (inv[n] ≥ 0 ? h[m, R + inv[n]] : 0) + b[n].

    The index-add of the sparse rows is the GEMM's epilogue: y is written once, no atomics."""
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BM)
    n_n = tl.cdiv(N, BN)
    group = GROUP_M * n_n
    gid = pid // group
    first_m = gid * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mm, mn = rm < M, rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, R, BK):
        rk = k0 + tl.arange(0, BK)
        mk = rk < R
        a = tl.load(h_ptr + rm[:, None] * shm + rk[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
        b = tl.load(l_ptr + rn[None, :] * slm + rk[:, None], mask=mn[None, :] & mk[:, None], other=0.0)
        acc += tl.dot(a, b)
    inv = tl.load(inv_ptr + rn, mask=mn, other=-1)
    has = inv >= 0
    s = tl.load(h_ptr + rm[:, None] * shm + (R + tl.where(has, inv, 0))[None, :],
                mask=mm[:, None] & (mn & has)[None, :], other=0.0)
    acc += s.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * sym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mm[:, None] & mn[None, :])


def _config(M: int, N: int):
    if M <= 16:
        return 16, 64, 64, 1, 4, 4      # BM, BN, BK, GROUP_M, warps, stages
    if M <= 256:
        return 64, 128, 64, 8, 4, 3
    return 128, 128, 64, 8, 8, 3


def lr_add(h: torch.Tensor, left: torch.Tensor, inv: torch.Tensor, bias: torch.Tensor | None,
           config: tuple | None = None) -> torch.Tensor:
    """y (M × N) = h[:, :r] leftᵀ + scatter(h[:, r:]) + bias, r = left.shape[1]; h (M × (r + k)) row-major."""
    M, N, R = h.shape[0], left.shape[0], left.shape[1]
    y = torch.empty(M, N, dtype=h.dtype, device=h.device)
    if M == 0:
        return y
    BM, BN, BK, GM, warps, stages = config or _config(M, N)
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
    _lr_add_kernel[grid](h, left, bias if bias is not None else h, inv, y, M, N, R,
                         h.stride(0), left.stride(0), y.stride(0), HAS_BIAS=bias is not None,
                         BM=BM, BN=BN, BK=BK, GROUP_M=GM, num_warps=warps, num_stages=stages)
    return y


@triton.jit
def _index_add_kernel(y_ptr, h_ptr, idx_ptr, M, K, R, sym, shm, BM: tl.constexpr, BK: tl.constexpr):
    """y[m, idx[j]] += h[m, R + j]   (idx unique: plain loads and stores, no atomics)."""
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rk = pid_k * BK + tl.arange(0, BK)
    msk = (rm < M)[:, None] & (rk < K)[None, :]
    idx = tl.load(idx_ptr + rk, mask=rk < K, other=0)
    hv = tl.load(h_ptr + rm[:, None] * shm + (R + rk)[None, :], mask=msk, other=0.0)
    yp = y_ptr + rm[:, None] * sym + idx[None, :]
    yv = tl.load(yp, mask=msk, other=0.0)
    tl.store(yp, (yv.to(tl.float32) + hv.to(tl.float32)).to(y_ptr.dtype.element_ty), mask=msk)


def index_add_cols(y: torch.Tensor, h: torch.Tensor, index: torch.Tensor, r: int) -> torch.Tensor:
    """In place: y[:, index] += h[:, r:]; index unique."""
    M, K = h.shape[0], index.shape[0]
    if M and K:
        BM, BK = (16, 128) if M <= 16 else (32, 128)
        grid = (triton.cdiv(M, BM), triton.cdiv(K, BK))
        _index_add_kernel[grid](y, h, index, M, K, r, y.stride(0), h.stride(0), BM=BM, BK=BK, num_warps=4)
    return y



# ---------------------------------------------------------------------------------------------------- decode
@triton.jit
def _decode_kernel(x_ptr, w_ptr, l_ptr, b_ptr, inv_ptr, ws_ptr, y_ptr, cnt_ptr,
                   M, K, J, N, R, KCHUNK, NSPLIT, NPROG, sxm, swj, slm, sym,
                   PHASE: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BJ: tl.constexpr,
                   BK: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr):
    """The whole decode step of the row-LoSparse layer (M ≤ BM tokens) in one persistent launch.

    phase 1: ws[s, m, j] = Σ_{k in split s} x[m, k] W[j, k]      (W = [R; S_I], J = r + k rows; fp32)
    grid-wide barrier (every program is resident: NPROG ≤ #SMs; an int64 counter that only grows, used by
                       launches of NPROG programs only, so it is a multiple of NPROG when one starts)
    phase 2: y[m, n] = Σ_j<R h[m, j] L[n, j] + (inv[n] ≥ 0 ? h[m, R + inv[n]] : 0) + b[n],  h = Σ_s ws[s]

    Splits are summed in a fixed order: the result does not depend on scheduling (deterministic).
    PHASE 1 / 2 run one phase only (two launches: the interpreter, which runs programs one by one)."""
    pid = tl.program_id(0)
    rm = tl.arange(0, BM)
    mm = rm < M
    if PHASE != 2:
        n_j = tl.cdiv(J, BJ)
        for t in range(pid, n_j * NSPLIT, NPROG):
            jb = t % n_j
            s = t // n_j
            rj = jb * BJ + tl.arange(0, BJ)
            mj = rj < J
            acc = tl.zeros((BM, BJ), dtype=tl.float32)
            k_lo = s * KCHUNK
            for k0 in range(k_lo, k_lo + KCHUNK, BK):
                rk = k0 + tl.arange(0, BK)
                mk = rk < K
                a = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
                w = tl.load(w_ptr + rj[:, None] * swj + rk[None, :], mask=mj[:, None] & mk[None, :], other=0.0)
                acc += tl.dot(a, tl.trans(w))
            tl.store(ws_ptr + (s * M + rm[:, None]) * J + rj[None, :], acc, mask=mm[:, None] & mj[None, :])
    late = pid < 0          # the barrier gave up waiting (never when every program is resident)
    if PHASE == 0:
        tl.debug_barrier()  # the whole program's stores precede its arrival (release, GPU scope)
        old = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
        target = (old // NPROG + 1) * NPROG
        cur = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
        spins = 0
        while (cur < target) & (spins < 16777216):  # a safety cap (seconds), never reached when all are resident
            cur = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
            spins += 1
        late = cur < target
        tl.debug_barrier()
    if PHASE != 1:
        for t in range(pid, tl.cdiv(N, BN), NPROG):
            rn = t * BN + tl.arange(0, BN)
            mn = rn < N
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for r0 in range(0, R, BR):
                rr = r0 + tl.arange(0, BR)
                mr = rr < R
                h = tl.zeros((BM, BR), dtype=tl.float32)
                for s in range(0, NSPLIT):
                    h += tl.load(ws_ptr + (s * M + rm[:, None]) * J + rr[None, :], mask=mm[:, None] & mr[None, :],
                                 other=0.0, cache_modifier=".cg")
                lt = tl.load(l_ptr + rn[None, :] * slm + rr[:, None], mask=mn[None, :] & mr[:, None], other=0.0)
                acc += tl.dot(h.to(lt.dtype), lt)
            inv = tl.load(inv_ptr + rn, mask=mn, other=-1)
            has = inv >= 0
            col = R + tl.where(has, inv, 0)
            for s in range(0, NSPLIT):
                acc += tl.load(ws_ptr + (s * M + rm[:, None]) * J + col[None, :], mask=mm[:, None] & (mn & has)[None, :],
                               other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                acc += tl.load(b_ptr + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
            acc = tl.where(late, float("nan"), acc)   # a barrier that gave up poisons its outputs, never silent
            tl.store(y_ptr + rm[:, None] * sym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                     mask=mm[:, None] & mn[None, :])


DECODE_MAX_M = 16
DECODE_CONFIG = dict(BJ=32, BK=256, warps=4, stages=4)  # phase-1 rows per tile, K step, warps, pipeline depth
_COUNTERS: dict = {}
def _counter(device: torch.device, nprog: int) -> torch.Tensor:
    """The barrier's arrival counter, one per (device, stream, grid size): launches on one stream never
    overlap, and a launch of P programs adds exactly P, so the count is a multiple of P at every launch."""
    key = (str(device), torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0, nprog)
    c = _COUNTERS.get(key)
    if c is None:
        c = _COUNTERS[key] = torch.zeros(1, dtype=torch.int64, device=device)
    return c


@functools.lru_cache(maxsize=4096)
def decode_plan(M: int, K: int, J: int, N: int, R: int, programs: int, BJ: int = 32, BK: int = 256):
    """(KCHUNK, NSPLIT, NPROG, BN): K split so that the J/BJ × NSPLIT phase-1 tiles fill `programs` best."""
    n_j = triton.cdiv(J, BJ)
    best = None
    for s in range(1, 33):
        kchunk = triton.cdiv(triton.cdiv(K, s), BK) * BK
        ns = triton.cdiv(K, kchunk)
        tiles = n_j * ns
        eff = tiles / (triton.cdiv(tiles, programs) * programs)
        if best is None or eff > best[0] + 0.02:
            best = (eff, kchunk, ns, tiles)
    _, kchunk, ns, tiles = best
    BN = max(16, min(128, triton.next_power_of_2(triton.cdiv(N, programs))))
    nprog = max(1, min(programs, max(tiles, triton.cdiv(N, BN))))
    return kchunk, ns, nprog, BN


def decode(x: torch.Tensor, right: torch.Tensor, left: torch.Tensor, inv: torch.Tensor,
           bias: torch.Tensor | None, config: dict | None = None, two_launches: bool | None = None) -> torch.Tensor:
    """y = (x rightᵀ)[:, :r] leftᵀ + scatter((x rightᵀ)[:, r:]) + bias for M ≤ 16 rows of x, in one launch."""
    M, K = x.shape
    J, N, R = right.shape[0], left.shape[0], left.shape[1]
    if M > DECODE_MAX_M:
        raise ValueError(f"losparse decode kernel: at most {DECODE_MAX_M} rows, got {M}")
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    cfg = dict(DECODE_CONFIG)
    cfg.update(config or {})
    kchunk, ns, nprog, BN = decode_plan(M, K, J, N, R, sm_count(x.device, 8), cfg["BJ"], cfg["BK"])
    ws = torch.empty(ns * M * J, dtype=torch.float32, device=x.device)
    interp = x.device.type != "cuda"
    two = interp if two_launches is None else two_launches
    cnt = _counter(x.device, nprog) if not two else ws
    BR = min(128, max(16, triton.next_power_of_2(R)))
    args = (x, right, left, bias if bias is not None else x, inv, ws, y, cnt, M, K, J, N, R, kchunk, ns, nprog,
            x.stride(0), right.stride(0), left.stride(0), y.stride(0))
    kw = dict(HAS_BIAS=bias is not None, BM=16, BJ=cfg["BJ"], BK=cfg["BK"], BN=BN, BR=BR,
              num_warps=cfg["warps"], num_stages=cfg["stages"])
    for phase in ((1, 2) if two else (0,)):
        _decode_kernel[(nprog,)](*args, PHASE=phase, **kw)
    return y
