"""Triton kernel of the GBLR chunk-list GEMM (see `structlin.kernels.gblr`). Imported lazily: Triton is
optional, and `TRITON_INTERPRET=1` must be set before this module is first imported to run on CPU tensors.

One program computes a (BM × BN) tile of one output block: it walks the block's entries (a flattened loop
over entries × D/BK steps, so Triton's software pipeliner overlaps the loads of consecutive entries), each
step one (BM × BK)·(BK × BN) tensor-core product accumulated in fp32. Tables are runtime arguments: one
binary per (dtype, tile configuration) serves every layer and structure. Programs are ordered with the
output block fastest, so the programs in flight share one row block of A (it stays in L2).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _chunk_gemm_kernel(a_ptr, bt_ptr, ptr_ptr, acol_ptr, brow_ptr, bias_ptr, out_ptr,
                       M, KA, KP, OUT_COLS, NB, NSUB, sam, sak, sbr, som,
                       W: tl.constexpr, DEPTH: tl.constexpr, HAS_BIAS: tl.constexpr, AFFINE_A: tl.constexpr,
                       EVEN_M: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Both stages keep the rows of Bt an entry reads contiguous (brow[e + 1] = brow[e] + DEPTH), so the B
    address is affine in the step. AFFINE_A (stage 1): a block's entries are consecutive tiles of A,
    cyclic over KP (the padded width), so the A address is affine too (one wrap); otherwise (stage 2) the
    A column of every entry is read from the table."""
    pid = tl.program_id(0)
    nblk = NB * NSUB
    pid_m = pid // nblk
    rest = pid % nblk
    b = rest // NSUB
    sub = rest % NSUB
    rm = pid_m * BM + tl.arange(0, BM)
    cn = sub * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    NK: tl.constexpr = DEPTH // BK
    start = tl.load(ptr_ptr + b)
    end = tl.load(ptr_ptr + b + 1)
    steps = (end - start) * NK
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    a_rows = a_ptr + rm[:, None] * sam
    b0 = tl.load(brow_ptr + start, mask=end > start, other=0)
    a0 = tl.load(acol_ptr + start, mask=end > start, other=0)
    for it in range(0, steps):
        if AFFINE_A:
            col0 = a0 + it * BK
            col0 = tl.where(col0 >= KP, col0 - KP, col0)
        else:
            col0 = tl.load(acol_ptr + start + it // NK) + (it % NK) * BK
        col0 = tl.multiple_of(col0, 16)
        cols = col0 + rk
        if EVEN_M and EVEN_K:
            av = tl.load(a_rows + cols[None, :] * sak)
        else:
            av = tl.load(a_rows + cols[None, :] * sak, mask=(rm < M)[:, None] & (cols < KA)[None, :], other=0.0)
        brows = tl.multiple_of(b0 + it * BK, 16) + rk
        if W % BN == 0:
            bv = tl.load(bt_ptr + brows[:, None] * sbr + cn[None, :])
        else:
            bv = tl.load(bt_ptr + brows[:, None] * sbr + cn[None, :], mask=(cn < W)[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(av, bv, input_precision="ieee")
        else:
            acc += tl.dot(av, bv)  # (the interpreter mishandles bf16 with an acc operand)
    oc = b * W + cn
    ok = (cn < W) & (oc < OUT_COLS)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + oc, mask=ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * som + oc[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rm < M)[:, None] & ok[None, :])


def _pow2_at_most(n: int, cap: int) -> int:
    p = 16
    while p * 2 <= min(n, cap):
        p *= 2
    return p


def default_config(M: int, depth: int, width: int) -> dict:
    """Tile sizes: BK the largest power of two ≤ 64 dividing depth, BN ≤ 128 covering the block width,
    BM 128 (64 for small M)."""
    bk = 16
    while bk * 2 <= 64 and depth % (bk * 2) == 0:
        bk *= 2
    return {"BM": 128 if M > 64 else (64 if M > 16 else 16), "BN": _pow2_at_most(width, 128), "BK": bk,
            "num_warps": 4, "num_stages": 3}


def chunk_gemm(a, bt, ptr, acol, brow, depth, out_cols, bias=None, config=None, affine_width=0):
    """affine_width > 0: the entries of every block are consecutive depth-chunks of A, cyclic over
    affine_width columns (stage 1), so the kernel computes A addresses instead of reading the table."""
    M, KA = a.shape
    W = bt.shape[1]
    nb = ptr.numel() - 1
    cfg = dict(default_config(M, depth, W))
    cfg.update(config or {})
    BM, BN, BK = cfg["BM"], min(cfg["BN"], _pow2_at_most(max(W, 16), 4096) * 2), cfg["BK"]
    while BK > 16 and depth % BK:  # a configuration tuned for a deeper chunk: the largest BK that divides
        BK //= 2
    if depth % BK:
        raise ValueError(f"chunk_gemm: depth {depth} is not a multiple of BK={BK}")
    a = a.contiguous()
    bt = bt.contiguous()
    nsub = triton.cdiv(W, BN)
    out = torch.empty(M, out_cols, dtype=a.dtype, device=a.device)
    if M == 0 or out_cols == 0:
        return out
    grid = (triton.cdiv(M, BM) * nb * nsub,)
    _chunk_gemm_kernel[grid](
        a, bt, ptr, acol, brow, bias if bias is not None else out, out,
        M, KA, affine_width or KA, out_cols, nb, nsub, a.stride(0), a.stride(1), bt.stride(0), out.stride(0),
        W=W, DEPTH=depth, HAS_BIAS=bias is not None, AFFINE_A=affine_width > 0, EVEN_M=M % BM == 0,
        EVEN_K=KA % depth == 0,  # tables only address whole depth-chunks inside ceil(KA/depth)·depth
        IEEE=a.dtype == torch.float32, BM=BM, BN=BN, BK=BK,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out
