"""SS1 operators: the input sketch, its transpose, and the fused sketch-in-A-load GEMM.

Notation: x is (M × K), a layer has Kc buckets. A sketch is given two ways (both derived from one
assignment `bucket[i] ∈ [0, Kc)`, `scale[i]` per input feature i):

* gather form (forward):    members (Kc × D) int32, coef (Kc × D); u[m, b] = Σ_d coef[b, d] · x[m, members[b, d]]
                            (members = -1 marks an empty slot; D = the largest bucket, r for the tied scheme);
* transposed form (backward): gx[m, i] = scale[i] · g[m, bucket[i]].

So u = x S with S[i, bucket[i]] = scale[i], and ∂L/∂x = (∂L/∂u) Sᵀ — both are gathers: deterministic, no
atomics. The fused op computes y = sketch_nb(x) W_nbᵀ with a rotation table rot[nb, g, c] (see
`_ss1_triton._fused_kernel`); its backward materialises the (N × K) virtual weight and uses plain GEMMs.

Every op is a `torch.library` custom op with a fake implementation (so `torch.compile` traces it) and an
autograd formula. CPU (and CUDA without Triton) runs the torch reference below; CUDA runs Triton.
"""
from __future__ import annotations

import importlib
import importlib.util

import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None
_HALF = (torch.float16, torch.bfloat16)


def triton_module():
    """The Triton kernels module (imported on first use; set TRITON_INTERPRET=1 before that for CPU)."""
    return importlib.import_module("structlin.kernels._ss1_triton")


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in _HALF else t


# ----------------------------------------------------------------------------- torch references

def sketch_ref(x, members, coef):
    """u (M × Kc) = Σ_d coef[:, d] · x[:, members[:, d]], accumulated in fp32 (fp64 for fp64 x)."""
    xa = _acc(x)
    xp = torch.nn.functional.pad(xa, (0, 1))                 # column K is zero: target of empty slots
    idx = torch.where(members < 0, x.shape[1], members).long()
    u = torch.zeros(x.shape[0], members.shape[0], dtype=xa.dtype, device=x.device)
    for d in range(members.shape[1]):
        u = u + xp[:, idx[:, d]] * coef[:, d].to(xa.dtype)
    return u.to(x.dtype)


def sketch_t_ref(g, bucket, scale, K: int):
    """gx (M × K) = scale · g[:, bucket]."""
    return (_acc(g)[:, bucket.long()] * scale.to(_acc(g).dtype)).to(g.dtype)


def rotation_index(rot, K: int, bk: int) -> torch.Tensor:
    """(NB × K) int64: for column block nb, the stored column read by input feature i.

    i = (g·r + c)·bk + j  ->  g·bk + ((j − rot[nb, g, c]) mod bk)."""
    NB, G, r = rot.shape
    i = torch.arange(K, device=rot.device)
    g, c, j = i // (bk * r), (i // bk) % r, i % bk
    return g * bk + torch.remainder(j - rot[:, g, c].long(), bk)


def fused_ref(x, weight, rot, bias, bk: int, bn: int):
    """y = x Wᵀ + b with W[n, i] = weight[n, rotation_index[n // bn, i]] materialised."""
    idx = rotation_index(rot, x.shape[1], bk)
    nb = torch.clamp(torch.arange(weight.shape[0], device=x.device) // bn, max=rot.shape[0] - 1)
    W = torch.gather(_acc(weight), 1, idx[nb])
    y = _acc(x) @ W.T
    if bias is not None:
        y = y + _acc(bias)
    return y.to(x.dtype)


def _use_triton(t: torch.Tensor) -> bool:
    return HAVE_TRITON and t.is_cuda and t.dtype != torch.float64


# ----------------------------------------------------------------------------- custom ops

@torch.library.custom_op("structlin::ss1_sketch", mutates_args=())
def ss1_sketch(x: torch.Tensor, members: torch.Tensor, coef: torch.Tensor, bucket: torch.Tensor,
               scale: torch.Tensor) -> torch.Tensor:
    """u = x S (M × Kc). bucket/scale are only used by the backward."""
    if _use_triton(x):
        return triton_module().sketch(x, members, coef)
    return sketch_ref(x, members, coef)


@ss1_sketch.register_fake
def _(x, members, coef, bucket, scale):
    return x.new_empty(x.shape[0], members.shape[0])


@torch.library.custom_op("structlin::ss1_sketch_t", mutates_args=())
def ss1_sketch_t(g: torch.Tensor, members: torch.Tensor, coef: torch.Tensor, bucket: torch.Tensor,
                 scale: torch.Tensor) -> torch.Tensor:
    """gx = g Sᵀ (M × K)."""
    if _use_triton(g):
        return triton_module().sketch_t(g, bucket, scale, bucket.shape[0])
    return sketch_t_ref(g, bucket, scale, bucket.shape[0])


@ss1_sketch_t.register_fake
def _(g, members, coef, bucket, scale):
    return g.new_empty(g.shape[0], bucket.shape[0])


def _tables_ctx(ctx, inputs, output):
    ctx.save_for_backward(*inputs[1:])


def _sketch_bwd(ctx, grad):
    members, coef, bucket, scale = ctx.saved_tensors
    return ss1_sketch_t(grad.contiguous(), members, coef, bucket, scale), None, None, None, None


def _sketch_t_bwd(ctx, grad):
    members, coef, bucket, scale = ctx.saved_tensors
    return ss1_sketch(grad.contiguous(), members, coef, bucket, scale), None, None, None, None


ss1_sketch.register_autograd(_sketch_bwd, setup_context=_tables_ctx)
ss1_sketch_t.register_autograd(_sketch_t_bwd, setup_context=_tables_ctx)


@torch.library.custom_op("structlin::ss1_fused", mutates_args=())
def ss1_fused(x: torch.Tensor, weight: torch.Tensor, rot: torch.Tensor, bias: torch.Tensor | None,
              bk: int, bn: int) -> torch.Tensor:
    """y (M × N) = sketch_nb(x) weight_nbᵀ + bias, one sketch per column block of width bn."""
    if _use_triton(x) and bk >= 16:
        return triton_module().fused(x, weight, rot, bias, bk, bn)
    return fused_ref(x, weight, rot, bias, bk, bn)


@ss1_fused.register_fake
def _(x, weight, rot, bias, bk, bn):
    return x.new_empty(x.shape[0], weight.shape[0])


def _fused_ctx(ctx, inputs, output):
    x, weight, rot, bias, bk, bn = inputs
    ctx.save_for_backward(x, weight, rot)
    ctx.bk, ctx.bn, ctx.has_bias = bk, bn, bias is not None


def _fused_bwd(ctx, gy):
    """Materialise W (N × K) from the rotation index, then GEMMs; grad_weight = scatter-sum of gyᵀ x."""
    x, weight, rot = ctx.saved_tensors
    idx = rotation_index(rot, x.shape[1], ctx.bk)
    nb = torch.clamp(torch.arange(weight.shape[0], device=x.device) // ctx.bn, max=rot.shape[0] - 1)
    idx = idx[nb]
    W = torch.gather(weight, 1, idx)
    gx = gy @ W
    gWfull = _acc(gy).T @ _acc(x)
    gw = torch.zeros(weight.shape, dtype=gWfull.dtype, device=x.device).scatter_add_(1, idx, gWfull)
    gb = _acc(gy).sum(0).to(gy.dtype) if ctx.has_bias else None
    return gx, gw.to(weight.dtype), None, gb, None, None


ss1_fused.register_autograd(_fused_bwd, setup_context=_fused_ctx)


# ----------------------------------------------------------------------------- tied scheme: specialised ops
#
# The tied sketch in closed form: with x padded to Kp = G·R·bk and viewed as (M, G, R, bk),
#     u[:, g, t] = Σ_c x[:, g, c, (t + δ_c) mod bk]          (δ = `rot`, (R,) int32)
#     gx[:, g, c, j] = g[:, g, (j − δ_c) mod bk]             (the transpose)
# Same function as the gather form built from `bucket` (scale 1), but every member is a contiguous run of
# bk (split in two at the rotation), so the Triton kernels load and store 16-byte vectors.

TIED_MAX_R = 16   # the Triton tied kernels unroll the R members; larger r runs the gather-form kernel
GEMV1_MAX_KC = 8192   # the one-shot M = 1 decode kernel holds BN × next_pow2(Kc) weights in registers
_WG16: list = []


def wg16_available() -> bool:
    """The 2 ≤ M ≤ 16 weight-streaming decode kernels (TMA + wgmma: Triton and an sm_90+ current device)."""
    if not _WG16:
        ok = HAVE_TRITON and torch.cuda.is_available()
        _WG16.append(bool(ok and torch.cuda.get_device_capability()[0] >= 9))
    return _WG16[0]


def tied_sketch_ref(x, rot, bk: int, kc: int):
    M, K = x.shape
    R = rot.shape[0]
    xa = torch.nn.functional.pad(_acc(x), (0, kc * R - K)).view(M, kc // bk, R, bk)
    u = torch.zeros(M, kc // bk, bk, dtype=xa.dtype, device=x.device)
    for c, d in enumerate(rot.tolist()):
        u = u + torch.roll(xa[:, :, c], -int(d), dims=-1)
    return u.reshape(M, kc).to(x.dtype)


def tied_sketch_t_ref(g, rot, bk: int, K: int):
    M, kc = g.shape
    gv = g.view(M, kc // bk, bk)
    gx = torch.stack([torch.roll(gv, int(d), dims=-1) for d in rot.tolist()], 2)   # (M, G, R, bk)
    return gx.reshape(M, -1)[:, :K].contiguous()


def _use_tied_triton(t: torch.Tensor, rot: torch.Tensor) -> bool:
    return _use_triton(t) and rot.shape[0] <= TIED_MAX_R


@torch.library.custom_op("structlin::ss1_tied_sketch", mutates_args=())
def ss1_tied_sketch(x: torch.Tensor, rot: torch.Tensor, bk: int, kc: int) -> torch.Tensor:
    """u = x S (M × kc) for the tied scheme; x (M × K) contiguous."""
    if _use_tied_triton(x, rot):
        return triton_module().tied_sketch(x, rot, bk, kc)
    return tied_sketch_ref(x, rot, bk, kc)


@ss1_tied_sketch.register_fake
def _(x, rot, bk, kc):
    return x.new_empty(x.shape[0], kc)


@torch.library.custom_op("structlin::ss1_tied_sketch_t", mutates_args=())
def ss1_tied_sketch_t(g: torch.Tensor, rot: torch.Tensor, bk: int, K: int) -> torch.Tensor:
    """gx = g Sᵀ (M × K) for the tied scheme; g (M × kc) contiguous."""
    if _use_tied_triton(g, rot):
        return triton_module().tied_sketch_t(g, rot, bk, K)
    return tied_sketch_t_ref(g, rot, bk, K)


@ss1_tied_sketch_t.register_fake
def _(g, rot, bk, K):
    return g.new_empty(g.shape[0], K)


def _tied_ctx(ctx, inputs, output):
    x, rot, bk, n = inputs
    ctx.save_for_backward(rot)
    ctx.bk, ctx.n_in = bk, x.shape[1]


def _tied_sketch_bwd(ctx, grad):
    (rot,) = ctx.saved_tensors
    return ss1_tied_sketch_t(grad.contiguous(), rot, ctx.bk, ctx.n_in), None, None, None


def _tied_sketch_t_bwd(ctx, grad):
    (rot,) = ctx.saved_tensors
    return ss1_tied_sketch(grad.contiguous(), rot, ctx.bk, ctx.n_in), None, None, None


ss1_tied_sketch.register_autograd(_tied_sketch_bwd, setup_context=_tied_ctx)
ss1_tied_sketch_t.register_autograd(_tied_sketch_t_bwd, setup_context=_tied_ctx)


@torch.library.custom_op("structlin::ss1_tied_decode", mutates_args=())
def ss1_tied_decode(x: torch.Tensor, rot: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    bk: int) -> torch.Tensor:
    """y = sketch(x) weightᵀ + bias in one launch (inference: no autograd formula). The sketch is summed in
    the operand load; M = 1 runs the one-shot GEMV, 2 ≤ M ≤ 16 on sm_90+ the weight-streaming TMA kernel
    (`_ss1_wgemm.decode16`, session 6), other M ≤ 16 the GEMV configurations, larger M the tiled fused GEMM. (The
    session-5 sketch-once kernels `_ss1_triton.tied_sk16` measured slower than sketch + cuBLAS on the H100: not
    routed here; see docs/benchmarks/NOTES.md.)"""
    if _use_tied_triton(x, rot):
        return triton_module().tied_mm(x, rot, weight, bias, bk)
    return tied_mm_ref(x, rot, weight, bias, bk)


def tied_mm_ref(x, rot, weight, bias, bk: int):
    u = tied_sketch_ref(x, rot, bk, weight.shape[1])
    y = _acc(u) @ _acc(weight).T
    if bias is not None:
        y = y + _acc(bias)
    return y.to(x.dtype)


@ss1_tied_decode.register_fake
def _(x, rot, weight, bias, bk):
    return x.new_empty(x.shape[0], weight.shape[0])
