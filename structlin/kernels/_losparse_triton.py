"""Triton kernels for the exported LoSparse layer (imported lazily; see `structlin.kernels.losparse`).

Both take the kept-row map as a runtime argument, so one compiled binary serves every layer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


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

