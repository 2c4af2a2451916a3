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


def _pow2_dividing(n: int, cap: int) -> int:
    """The largest power of two ≤ cap that divides n (n a multiple of 16)."""
    p = 16
    while p * 2 <= cap and n % (p * 2) == 0:
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


# ----------------------------------------------------------------------------- the fused two-stage kernel
#
# One launch computes both stages of an exported layer. Its programs take a ticket (an atomic counter, so a
# program's logical index follows the order in which programs actually started): the first n1 tickets are
# stage-1 jobs (row block m, component b, column block of s) and the rest stage-2 jobs (row block, output
# tile, column block). A stage-1 job writes its h tile and bumps the counter of its row block (release); a
# stage-2 job spins (acquire) until the counters of its row blocks show every component done. Jobs only wait
# on jobs with smaller tickets, which have all started, so this cannot deadlock, and the tail of stage 1
# (components have very different input boxes: up to 1.6× imbalance per wave) is filled by stage-2 jobs of
# earlier row blocks instead of idling. The last stage-2 job to pass its wait resets the counters for the
# next launch (CUDA-graph replays included). Under the interpreter the programs run in order, so every wait
# is already satisfied. Job orders are host-computed tables (groups of row blocks, longest jobs first).


@triton.jit
def _dot_factor(acc, av, w_ptr, w_desc, brow, off_n, rk, cn, sw, USE_TMA: tl.constexpr, IEEE: tl.constexpr):
    """acc + av @ the (BK × BN) tile of a packed factor at row brow, column off_n (TMA or pointer load)."""
    if USE_TMA:
        bv = w_desc.load([brow, off_n])
    else:
        bv = tl.load(w_ptr + (brow + rk)[:, None] * sw + cn[None, :])
    if IEEE:
        return acc + tl.dot(av, bv, input_precision="ieee")
    return acc + tl.dot(av, bv)


@triton.jit
def _stage1_acc(x_ptr, x_desc, w1_ptr, w1_desc, ptr1, acol1, brow1, b, off_m, off_n, M, K, KP, sxm, sw1,
                T: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_M: tl.constexpr,
                EVEN_K: tl.constexpr, USE_TMA: tl.constexpr, IEEE: tl.constexpr):
    start = tl.load(ptr1 + b)
    end = tl.load(ptr1 + b + 1)
    NK: tl.constexpr = T // BK
    steps = (end - start) * NK
    a0 = tl.load(acol1 + start)
    b0 = tl.load(brow1 + start)
    rm = off_m + tl.arange(0, BM)
    cn = off_n + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for it in range(0, steps):
        col0 = a0 + it * BK
        col0 = tl.where(col0 >= KP, col0 - KP, col0)
        col0 = tl.multiple_of(col0, 16)
        brow = tl.multiple_of(b0 + it * BK, 16)
        if USE_TMA:
            av = x_desc.load([off_m, col0])
        else:
            cols = col0 + rk
            if EVEN_M and EVEN_K:
                av = tl.load(x_ptr + rm[:, None] * sxm + cols[None, :])
            else:
                av = tl.load(x_ptr + rm[:, None] * sxm + cols[None, :],
                             mask=(rm < M)[:, None] & (cols < K)[None, :], other=0.0)
        acc = _dot_factor(acc, av, w1_ptr, w1_desc, brow, off_n, rk, cn, sw1, USE_TMA, IEEE)
    return acc


@triton.jit
def _stage2_acc(h_ptr, w2_ptr, w2_desc, ptr2, acol2, brow2, j, off_m, off_n, M, shm, sw2,
                S: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_M: tl.constexpr,
                USE_TMA: tl.constexpr, IEEE: tl.constexpr):
    start = tl.load(ptr2 + j)
    end = tl.load(ptr2 + j + 1)
    NK: tl.constexpr = S // BK
    steps = (end - start) * NK
    b0 = tl.load(brow2 + start, mask=end > start, other=0)
    rm = off_m + tl.arange(0, BM)
    cn = off_n + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for it in range(0, steps):
        col0 = tl.load(acol2 + start + it // NK) + (it % NK) * BK
        col0 = tl.multiple_of(col0, 16)
        brow = tl.multiple_of(b0 + it * BK, 16)
        cols = col0 + rk
        # h was written by other programs of this launch: read it past L1 (.cg)
        if EVEN_M:
            av = tl.load(h_ptr + rm[:, None] * shm + cols[None, :], cache_modifier=".cg")
        else:
            av = tl.load(h_ptr + rm[:, None] * shm + cols[None, :], mask=(rm < M)[:, None], other=0.0,
                         cache_modifier=".cg")
        acc = _dot_factor(acc, av, w2_ptr, w2_desc, brow, off_n, rk, cn, sw2, USE_TMA, IEEE)
    return acc


@triton.jit
def _gblr_fused_kernel(x_ptr, x_desc, w1_ptr, w1_desc, h_ptr, w2_ptr, w2_desc, bias_ptr, y_ptr,
                       ptr1, acol1, brow1, ptr2, acol2, brow2, order1, order2, sync_ptr,
                       M, K, KP, N, n1, n2, nm1, pid_base, NB1, NSUB1, NB2, NSUB2, sxm, sw1, shm, sw2, sym,
                       T: tl.constexpr, S: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_M: tl.constexpr,
                       EVEN_K: tl.constexpr, USE_TMA: tl.constexpr, FUSED: tl.constexpr, IEEE: tl.constexpr,
                       BM1: tl.constexpr, BN1: tl.constexpr, BM2: tl.constexpr, BN2: tl.constexpr,
                       BK: tl.constexpr):
    if FUSED:
        vid = tl.atomic_add(sync_ptr, 1)
    else:
        vid = tl.program_id(0) + pid_base
    # (names differ between the two branches: Triton merges same-named values of both branches of an if)
    if vid < n1:
        code1 = tl.load(order1 + vid)
        sub1 = code1 % NSUB1
        b1 = (code1 // NSUB1) % NB1
        mb1 = code1 // (NSUB1 * NB1)
        acc1 = _stage1_acc(x_ptr, x_desc, w1_ptr, w1_desc, ptr1, acol1, brow1, b1, mb1 * BM1, sub1 * BN1, M, K,
                           KP, sxm, sw1, T, BM1, BN1, BK, EVEN_M, EVEN_K, USE_TMA, IEEE)
        rm1 = mb1 * BM1 + tl.arange(0, BM1)
        hc1 = b1 * S + sub1 * BN1 + tl.arange(0, BN1)
        if EVEN_M:
            tl.store(h_ptr + rm1[:, None] * shm + hc1[None, :], acc1.to(h_ptr.dtype.element_ty))
        else:
            tl.store(h_ptr + rm1[:, None] * shm + hc1[None, :], acc1.to(h_ptr.dtype.element_ty),
                     mask=(rm1 < M)[:, None])
        if FUSED:
            tl.debug_barrier()          # every thread's h stores precede the release below
            tl.atomic_add(sync_ptr + 2 + mb1, 1, sem="release")
    else:
        code2 = tl.load(order2 + (vid - n1))
        sub2 = code2 % NSUB2
        j2 = (code2 // NSUB2) % NB2
        mb2 = code2 // (NSUB2 * NB2)
        if FUSED:
            R: tl.constexpr = BM2 // BM1
            need = NB1 * NSUB1
            for r in tl.static_range(R):
                mr = mb2 * R + r
                if mr < nm1:
                    c = tl.atomic_add(sync_ptr + 2 + mr, 0, sem="acquire")
                    while c < need:
                        c = tl.atomic_add(sync_ptr + 2 + mr, 0, sem="acquire")
            tl.debug_barrier()
            done = tl.atomic_add(sync_ptr + 1, 1)
            if done == n2 - 1:          # every job has passed its wait: reset for the next launch
                tl.store(sync_ptr, 0)
                tl.store(sync_ptr + 1, 0)
                for i in range(0, nm1, 256):
                    ri = i + tl.arange(0, 256)
                    tl.store(sync_ptr + 2 + ri, tl.zeros((256,), dtype=tl.int32), mask=ri < nm1)
        acc2 = _stage2_acc(h_ptr, w2_ptr, w2_desc, ptr2, acol2, brow2, j2, mb2 * BM2, sub2 * BN2, M, shm, sw2,
                           S, BM2, BN2, BK, EVEN_M, USE_TMA, IEEE)
        oc2 = j2 * T + sub2 * BN2 + tl.arange(0, BN2)
        rm2 = mb2 * BM2 + tl.arange(0, BM2)
        ok2 = oc2 < N
        if HAS_BIAS:
            acc2 += tl.load(bias_ptr + oc2, mask=ok2, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm2[:, None] * sym + oc2[None, :], acc2.to(y_ptr.dtype.element_ty),
                 mask=(rm2 < M)[:, None] & ok2[None, :])


def fused_default_config(M: int, tile: int, rank: int) -> dict:
    """Tiles of the fused kernel: stage 1 BM1 × BN1 (BN1 ≤ rank), stage 2 BM2 × BN2 (BN2 ≤ tile), common BK.
    128 × 128 everywhere with TMA, 3 stages, 8 warps was the fastest or within 4% of it on the three Llama-7B
    shapes on the H100 (docs/benchmarks/gblr_layer.md): 106 registers and 98 KB of shared memory, so two
    programs share an SM and hide each other's pipeline fill and epilogue (the 128 × 256 tiles, one program
    per SM, lost on 4096² and gate/up)."""
    bk = 64
    while bk > 16 and (tile % bk or rank % bk):
        bk //= 2
    bm = 128 if M > 64 else (64 if M > 16 else 16)
    return {"BM1": bm, "BN1": _pow2_dividing(rank, 128), "BM2": bm, "BN2": _pow2_dividing(tile, 128), "BK": bk,
            "num_warps": 8 if bm >= 128 else 4, "num_stages": 3, "TMA": True, "FUSED": True, "G": 8}


def job_orders(nm: int, lengths, nsub: int, group: int) -> torch.Tensor:
    """Job codes ((m·NB + b)·nsub + sub) in launch order: row blocks in groups of `group`, and inside a group
    the longest blocks (by `lengths`) first, so that the last wave holds the short jobs."""
    nb = len(lengths)
    codes = []
    for g0 in range(0, nm, max(1, group)):
        jobs = [(-int(lengths[b]), m, b, s) for m in range(g0, min(nm, g0 + max(1, group)))
                for b in range(nb) for s in range(nsub)]
        jobs.sort()
        codes += [(m * nb + b) * nsub + s for _, m, b, s in jobs]
    return torch.tensor(codes, dtype=torch.int32)


def _tma_ok(*ts) -> bool:
    """TMA descriptors need 16-byte aligned bases and row strides (else the pointer loads are used)."""
    return all(t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 for t in ts)


def _desc(t, block):
    from triton.tools.tensor_descriptor import TensorDescriptor
    return TensorDescriptor.from_tensor(t, block)


def gblr_forward(x, w_in, w_out, tabs: dict, tile: int, rank: int, n_out: int, bias=None, config=None,
                 cache: dict | None = None):
    """Both stages of an exported layer (see the block comment above). `tabs`: ptr1/acol1/brow1 (stage 1,
    entries = input tiles of each component, consecutive rows of w_in) and ptr2/acol2/brow2 (stage 2, entries
    = components covering each output tile). `cache` (a dict kept by the caller) holds the job orders and
    the counters per (M, tiles) so a CUDA graph can capture the call."""
    M, K = x.shape
    T, S = tile, rank
    nb1 = tabs["ptr1"].numel() - 1
    nb2 = tabs["ptr2"].numel() - 1
    HC = nb1 * S
    cfg = dict(fused_default_config(M, T, S))
    cfg.update(config or {})
    BM1, BN1, BM2, BN2, BK = cfg["BM1"], cfg["BN1"], cfg["BM2"], cfg["BN2"], cfg["BK"]
    if S % BN1 or T % BN2 or T % BK or S % BK or BM2 % BM1:
        raise ValueError(f"gblr_forward: tiles {cfg} do not divide tile {T} / rank {S} (or BM1 ∤ BM2)")
    x = x.contiguous()
    y = torch.empty(M, n_out, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    h = torch.empty(M, HC, dtype=x.dtype, device=x.device)
    nm1, nm2 = triton.cdiv(M, BM1), triton.cdiv(M, BM2)
    nsub1, nsub2 = S // BN1, T // BN2
    key = (M, BM1, BN1, BM2, BN2, cfg["G"], x.device)
    ent = None if cache is None else cache.get(key)
    if ent is None:
        p1, p2 = tabs["ptr1"].cpu(), tabs["ptr2"].cpu()
        o1 = job_orders(nm1, (p1[1:] - p1[:-1]).tolist(), nsub1, cfg["G"])
        o2 = job_orders(nm2, (p2[1:] - p2[:-1]).tolist(), nsub2, max(1, cfg["G"] * BM1 // BM2))
        ent = (o1.to(x.device), o2.to(x.device), torch.zeros(2 + nm1, dtype=torch.int32, device=x.device))
        if cache is not None:
            cache[key] = ent
    o1, o2, sync = ent
    n1, n2 = o1.numel(), o2.numel()
    tma = bool(cfg["TMA"]) and _tma_ok(x, w_in, w_out)
    if tma:
        xd, w1d, w2d = _desc(x, [BM1, BK]), _desc(w_in, [BK, BN1]), _desc(w_out, [BK, BN2])
    else:
        xd = w1d = w2d = None
    args = dict(T=T, S=S, HAS_BIAS=bias is not None, EVEN_M=M % BM2 == 0 and M % BM1 == 0, EVEN_K=K % T == 0,
                USE_TMA=tma, IEEE=x.dtype == torch.float32, BM1=BM1, BN1=BN1, BM2=BM2, BN2=BN2, BK=BK,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    common = (x, xd, w_in, w1d, h, w_out, w2d, bias if bias is not None else y, y,
              tabs["ptr1"], tabs["acol1"], tabs["brow1"], tabs["ptr2"], tabs["acol2"], tabs["brow2"], o1, o2, sync,
              M, K, triton.cdiv(K, T) * T, n_out, n1, n2, nm1)
    strides = (nb1, nsub1, nb2, nsub2, x.stride(0), w_in.stride(0), h.stride(0), w_out.stride(0), y.stride(0))
    if cfg["FUSED"]:
        _gblr_fused_kernel[(n1 + n2,)](*common, 0, *strides, FUSED=True, **args)
    else:
        _gblr_fused_kernel[(n1,)](*common, 0, *strides, FUSED=False, **args)
        _gblr_fused_kernel[(n2,)](*common, n1, *strides, FUSED=False, **args)
    return y
