"""A plain Triton GEMM (pointer loads or TMA descriptors), the calibration baseline of gblr_layer.py."""
import torch
import triton
import triton.language as tl

from structlin.kernels._tiles import grouped_tile


@triton.jit
def _mm(a_ptr, b_ptr, c_ptr, a_desc, b_desc, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        TMA: tl.constexpr, GROUP: tl.constexpr):
    pm, pn = grouped_tile(tl.program_id(0), M, N, BM, BN, GROUP)
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K, BK):
        if TMA:
            a = a_desc.load([pm * BM, k])
            b = b_desc.load([k, pn * BN])
        else:
            a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :])
            b = tl.load(b_ptr + (k + rk)[:, None] * N + rn[None, :])
        acc += tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc.to(c_ptr.dtype.element_ty))


def matmul(a, b, BM, BN, BK, num_warps, num_stages, tma):
    from triton.tools.tensor_descriptor import TensorDescriptor

    M, K = a.shape
    N = b.shape[1]
    c = torch.empty(M, N, device=a.device, dtype=a.dtype)
    ad = TensorDescriptor.from_tensor(a, [BM, BK]) if tma else None
    bd = TensorDescriptor.from_tensor(b, [BK, BN]) if tma else None
    _mm[(triton.cdiv(M, BM) * triton.cdiv(N, BN),)](a, b, c, ad, bd, M, N, K, BM=BM, BN=BN, BK=BK, TMA=tma,
                                                     GROUP=8, num_warps=num_warps, num_stages=num_stages)
    return c


@triton.jit
def _mm_ws(a_ptr, b_ptr, c_ptr, M, N, K, NPROG: tl.constexpr, WS: tl.constexpr, BM: tl.constexpr,
           BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
    """Persistent, warp-specialised (Hopper) form with descriptors made in the kernel: the loop structure of
    the GBLR `_gblr_ws` kernel on a plain GEMM."""
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[N, 1], block_shape=[BK, BN])
    c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, BN])
    nt = tl.cdiv(M, BM) * tl.cdiv(N, BN)
    for tile in tl.range(tl.program_id(0), nt, NPROG, flatten=False, warp_specialize=WS):
        pm, pn = grouped_tile(tile, M, N, BM, BN, GROUP)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            acc = tl.dot(a_desc.load([pm * BM, k]), b_desc.load([k, pn * BN]), acc)
        c_desc.store([pm * BM, pn * BN], acc.to(tl.bfloat16))


def matmul_ws(a, b, BM, BN, BK, num_warps, num_stages, ws=True):
    from structlin.kernels import sm_count
    from structlin.kernels._gblr_ws import _ensure_allocator

    _ensure_allocator()
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty(M, N, device=a.device, dtype=a.dtype)
    nprog = sm_count(a.device, 4)
    _mm_ws[(nprog,)](a, b, c, M, N, K, NPROG=nprog, WS=ws, BM=BM, BN=BN, BK=BK, GROUP=8,
                     num_warps=num_warps, num_stages=num_stages)
    return c
