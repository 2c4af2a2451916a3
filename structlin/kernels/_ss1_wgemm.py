"""Weight-streaming GEMM for SS1 decode at 2 ≤ M ≤ 16 (Hopper TMA + wgmma; session 6).

y (M × N) = u (M × Kc) · W0ᵀ (+ b) computed transposed, yᵀ (N × M) = W0 (N × Kc) · uᵀ, so the big dimension
N is the tile's M: a program owns BM = 128 rows of W0 and the whole (≤ 16-row) u, BN = 16 (u's rows past M
are zero-filled by the TMA box, never read from memory). The K loop over its Kc chunk loads W0 (and u) tiles
through TMA descriptors — host-made (kernel parameters; default, 1.5–2 µs faster on the H100) or made in the
kernel (`tl.make_tensor_descriptor`) — software-pipelined STAGES deep, wgmma on (128 × BK)·(BK × 16). FUSE (the
dispatched form, `fused`): no u at all; each K step sums u's (16 × BK) tile from the R rotated runs of x (fp32,
rounded to x's dtype like the two-pass u: bitwise the same result) right before the dot — one launch.
(Triton 3.6 warp specialisation of this loop measured slower and broke the split-K epilogue: not used.)

Split-K (SPLIT chunks of Kc; used where N / BM leaves SMs idle, e.g. N = 4096 → 32 tiles): every program
stores its fp32 partial to `ws` (SPLIT × N × 16), then bumps its column block's counter (acq_rel); the
program that arrives last sums the SPLIT partials in chunk order 0..SPLIT−1 (deterministic whoever arrives
last), adds the bias, stores y and resets the counter. No float atomics. PDL: wait in griddepcontrol.wait
for the preceding (sketch) grid before the first load — the launch and set-up overlap the sketch.
Imported lazily (Triton is optional); TMA needs 16-byte aligned rows (`supported`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from structlin.kernels import sm_count
from structlin.kernels._ss1_triton import _tied_cols, tied_vec


@triton.jit
def _l2_prefetch(ptrs):
    return tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                                     dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _wg_kernel(w_arg, u_arg, w_ptr, x_ptr, rot_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, KC, K, sxm, swn, sum_,
               sym, KCH, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
               HOST: tl.constexpr, FUSE: tl.constexpr, R: tl.constexpr, GBK: tl.constexpr, VEC: tl.constexpr,
               EVEN_K: tl.constexpr, STAGES: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               PREF: tl.constexpr, LINE: tl.constexpr):
    if HOST:   # descriptors made on the host (kernel parameters)
        w_desc = w_arg
        u_desc = u_arg
    else:      # made here (global scratch from Triton's allocator)
        w_desc = tl.make_tensor_descriptor(w_arg, shape=[N, KC], strides=[swn, 1], block_shape=[BM, BK])
        if FUSE:
            u_desc = w_desc
        else:
            u_desc = tl.make_tensor_descriptor(u_arg, shape=[M, KC], strides=[sum_, 1], block_shape=[BN, BK])
    pid = tl.program_id(0)
    nb = pid // SPLIT
    ks = pid % SPLIT
    row = nb * BM
    k0 = ks * KCH
    k1 = tl.minimum(k0 + KCH, KC)
    rm = tl.arange(0, BN)
    mm = rm < M
    xrow = x_ptr + rm.to(tl.int64)[:, None] * sxm
    if PDL:
        if PREF > 0:   # the first PREF weight columns of this program's block into L2 while the sketch runs
            rp = tl.minimum(row + tl.arange(0, BM), N - 1).to(tl.int64)
            cp = tl.minimum(k0 + tl.arange(0, PREF // LINE) * LINE, k1 - 1)
            _l2_prefetch(w_ptr + rp[:, None] * swn + cp[None, :])
        tl.extra.cuda.gdc_wait()
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in tl.range(k0, k1, BK, num_stages=STAGES):
        a = w_desc.load([row, k])
        if FUSE:   # u's (16 × BK) tile summed from the R rotated runs of x (fp32, rounded to x's dtype as u is)
            rk = k + tl.arange(0, BK)
            rk = tl.max_contiguous(tl.multiple_of(rk, BK), BK)
            bx = tl.zeros((BN, BK), dtype=tl.float32)
            for c in tl.static_range(R):
                col = _tied_cols(rk, rot_ptr, c, R, GBK, VEC)
                if EVEN_K:
                    msk = mm[:, None] & (rk < KC)[None, :]
                else:
                    msk = mm[:, None] & ((rk < KC) & (col < K))[None, :]
                bx += tl.load(xrow + col[None, :], mask=msk, other=0.0).to(tl.float32)
            b = bx.to(x_ptr.dtype.element_ty)
        else:
            b = u_desc.load([0, k])
        if IEEE:
            acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    rn = row + tl.arange(0, BM)
    mn = rn < N
    ymask = mn[:, None] & mm[None, :]
    yoff = rm[None, :].to(tl.int64) * sym + rn[:, None]
    if SPLIT > 1:
        tile = rn[:, None] * BN + rm[None, :]
        tl.store(ws_ptr + ks * N * BN + tile, acc, mask=mn[:, None])
        tl.debug_barrier()   # every thread's partial stored before the release below
        old = tl.atomic_add(cnt_ptr + nb, 1, sem="acq_rel")
        if old == SPLIT - 1:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for j in tl.static_range(SPLIT):
                acc += tl.load(ws_ptr + j * N * BN + tile, mask=mn[:, None], other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                acc += tl.load(b_ptr + rn, mask=mn, other=0.0).to(tl.float32)[:, None]
            tl.store(y_ptr + yoff, acc.to(y_ptr.dtype.element_ty), mask=ymask)
            tl.atomic_xchg(cnt_ptr + nb, 0)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=mn, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + yoff, acc.to(y_ptr.dtype.element_ty), mask=ymask)


def _scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda" if torch.cuda.is_available() else "cpu")


def _ensure_allocator():
    """Device-side tensor descriptors need global scratch from Triton's allocator: set one unless set."""
    from triton.runtime import _allocation as A
    if A._allocator.get() is A._NULL_ALLOCATOR:
        triton.set_allocator(_scratch)


def supported(src: torch.Tensor, weight: torch.Tensor, tma_src: bool = True) -> bool:
    """src = u (M × Kc, read through TMA) or x (M × K, tma_src False: gathered): M ≤ 16, one dtype, unit inner
    strides; the TMA operands' row strides and bases 16-byte aligned."""
    es = weight.element_size()
    al = lambda t: (t.stride(0) * es) % 16 == 0 and t.data_ptr() % 16 == 0
    return (src.dim() == 2 and src.shape[0] <= 16 and src.dtype == weight.dtype and weight.stride(1) == 1
            and src.stride(1) == 1 and al(weight) and (al(src) or not tma_src))


SMEM_BUDGET = 176 * 1024   # pipelined operand stages (Triton adds its epilogue scratch; the limit is 227 KB)


def default_config(M: int, N: int, kc: int, dtype, sms: int, R: int = 1) -> dict:
    """BM 128 × BN 16 × BK 128 (64 when the fused form gathers R ≥ 8 runs; 32 for fp32), 4 stages (fewer where
    they overflow SMEM_BUDGET); split-K so that the grid fills the SMs once: SPLIT = ⌊SMs / tiles⌋ (≥ 1), each
    chunk a multiple of BK; host-made descriptors."""
    BK = 32 if dtype == torch.float32 else (64 if R >= 8 else 128)
    tiles = triton.cdiv(N, 128)
    split = max(1, min(sms // tiles, triton.cdiv(kc, BK)))
    return {"BM": 128, "BK": BK, "STAGES": 4, "SPLIT": split, "HOST": True, "PREF": 0, "num_warps": 4}


_CNT: dict = {}


def _counters(dev, n: int):
    """One split-K counter per column block, one set per (device, stream) (calls on one stream are ordered)."""
    key = (dev, torch.cuda.current_stream(dev).cuda_stream if dev.type == "cuda" else 0)
    c = _CNT.get(key)
    if c is None or c.numel() < n:
        c = _CNT[key] = torch.zeros(max(n, 4096), dtype=torch.int32, device=dev)
    return c


def _launch(weight, bias, config, pdl, u=None, x=None, rot=None, bk=1):
    """One GEMM launch: on u (M × Kc), or FUSE (u is None): the sketch of x built in the B-operand load."""
    src = u if u is not None else x
    M = src.shape[0]
    N, kc = weight.shape
    dev = src.device
    if not supported(src, weight, u is not None):
        raise ValueError(f"ss1 wgemm: input {tuple(src.shape)} {src.dtype} / weight {tuple(weight.shape)} "
                         f"{weight.dtype} need M ≤ 16, one dtype, unit inner strides and 16-byte aligned rows (TMA)")
    y = torch.empty(M, N, dtype=src.dtype, device=dev)
    if M == 0 or N == 0:
        return y
    fuse = u is None
    R = rot.shape[0] if fuse else 1
    c = dict(default_config(M, N, kc, src.dtype, sm_count(dev, 4), R))
    c.update(config or {})
    BM, BK = c["BM"], c["BK"]
    # shared memory: Triton stages the W0 box and (FUSE) the R gathered x runs of each K step
    per_stage = (BM + 16 * R) * BK * src.element_size()
    stages = max(1, min(int(c["STAGES"]), SMEM_BUDGET // per_stage))
    split = max(1, min(int(c["SPLIT"]), triton.cdiv(kc, BK)))
    kch = triton.cdiv(triton.cdiv(kc, split), BK) * BK
    split = triton.cdiv(kc, kch)          # no empty chunk
    tiles = triton.cdiv(N, BM)
    ws = torch.empty(split, N, 16, dtype=torch.float32, device=dev) if split > 1 else y
    cnt = _counters(dev, tiles)
    host = bool(c["HOST"])
    if host:
        wa = TensorDescriptor.from_tensor(weight, [BM, BK])
        ua = wa if fuse else TensorDescriptor(u, [M, kc], [u.stride(0), 1], [16, BK])
    else:
        _ensure_allocator()
        wa, ua = weight, (weight if fuse else u)
    K = x.shape[1] if fuse else kc
    extra = {"launch_pdl": True} if pdl else {}
    _wg_kernel[(tiles * split,)](wa, ua, weight, x if fuse else weight, rot if fuse else cnt,
                                 bias if bias is not None else weight, y, ws, cnt, M, N, kc, K,
                                 x.stride(0) if fuse else 0, weight.stride(0), 0 if fuse else u.stride(0),
                                 y.stride(0), kch, SPLIT=split, HAS_BIAS=bias is not None,
                                 IEEE=src.dtype == torch.float32 or not src.is_cuda, PDL=bool(pdl), HOST=host,
                                 FUSE=fuse, R=R, GBK=bk, VEC=tied_vec(rot, bk) if fuse else 1,
                                 EVEN_K=K == kc * R, STAGES=stages, BM=BM, BN=16, BK=BK,
                                 PREF=int(c["PREF"]) if pdl else 0, LINE=128 // src.element_size(),
                                 num_warps=c["num_warps"], **extra)
    return y


def wgemm(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, config: dict | None = None,
          pdl: bool = False) -> torch.Tensor:
    """y (M × N) = u weightᵀ + bias for M ≤ 16 (u: M × Kc, weight: N × Kc, same dtype; see `supported`).
    fp32 accumulation (fp32: IEEE; on CPU, the interpreter, every dtype is summed as IEEE fp32: its bf16 dot is
    wrong in Triton 3.9's interpreter); the result does not depend on scheduling (fixed split-K summation order)."""
    return _launch(weight, bias, config, pdl, u=u)


def fused(x: torch.Tensor, rot: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, bk: int,
          config: dict | None = None) -> torch.Tensor:
    """y = sketch(x) weightᵀ + bias for M ≤ 16 in one launch: each program sums its (16 × BK) u tiles from the
    R rotated runs of x (fp32, rounded to x's dtype like the two-pass u) right before each dot."""
    return _launch(weight, bias, config, False, x=x, rot=rot, bk=bk)


def sketch_wgemm(x: torch.Tensor, rot: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, bk: int,
                 config: dict | None = None, pdl: bool = False) -> torch.Tensor:
    """y = sketch(x) weightᵀ + bias for M ≤ 16: the tied sketch kernel (u in x's dtype), then `wgemm`.
    pdl (CUDA, sm_90+): the sketch grid triggers its dependents at its start and the GEMM is launched with
    programmatic dependent launch (optionally prefetching config['PREF'] weight columns per row into L2
    before it waits for u)."""
    from structlin.kernels import _ss1_triton as tm
    M, K = x.shape
    kc = weight.shape[1]
    if not pdl:
        return wgemm(tm.tied_sketch(x, rot, bk, kc), weight, bias, config)
    R = rot.shape[0]
    u = torch.empty(M, kc, dtype=x.dtype, device=x.device)
    sync = tm._sk16_sync(x.device)
    S = triton.cdiv(kc, 256)
    tm._tied_sk16_kernel[(S,)](x, rot, u, weight, weight, u, sync, u, sync[4:], M, weight.shape[0], K, kc,
                               x.stride(0), weight.stride(0), u.stride(0), S, 0, 1, tm._mb(M), R, MODE=3,
                               HAS_BIAS=False, IEEE=False, EVEN_K=K == kc * R, BK=bk, VEC=tm.tied_vec(rot, bk),
                               LINE=128 // x.element_size(), EVEN_KC=True, SBC=256, BN=16, BC=16, PREF=0,
                               SHOT=False, num_warps=4, num_stages=1)
    return wgemm(u, weight, bias, config, pdl=True)


# ----------------------------------------------------------------------------- decode entry (2 ≤ M ≤ 16)

VARIANT = "fused"   # "fused" (one launch) | "sk" (sketch + wgemm) | "pdl" (the same under PDL); see NOTES


def available(dev) -> bool:
    """TMA + wgmma (sm_90+) and a Triton with device-side launch_pdl / tensor descriptors."""
    try:
        return torch.device(dev).type == "cuda" and torch.cuda.get_device_capability(dev)[0] >= 9
    except Exception:   # noqa: BLE001
        return False


def decode16(x, rot, weight, bias, bk, variant: str | None = None, config: dict | None = None):
    """y = sketch(x) weightᵀ + bias for 2 ≤ M ≤ 16 by the weight-streaming kernels (`VARIANT` unless given)."""
    v = variant or VARIANT
    if v == "fused":
        return fused(x, rot, weight, bias, bk, config)
    return sketch_wgemm(x, rot, weight, bias, bk, config, pdl=v == "pdl")
