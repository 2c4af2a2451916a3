"""Block-sparse "chunk list" GEMM for exported GBLR layers: the torch reference (also the CPU path) and the
dispatch to the Triton kernel.

One operation serves both stages of an exported layer:

    out[:, b·W : (b+1)·W] = Σ_{e = ptr[b]}^{ptr[b+1]−1}  A[:, acol[e] : acol[e] + D] @ Bt[brow[e] : brow[e] + D, :]

A is (M × ka), Bt is (R × W) (W = the output block width), D = `depth` (the rows of Bt one entry reads).
Columns of A at or beyond ka read as zero (a partial last tile); output columns at or beyond `out_cols` are
dropped. Each entry is one dense (M × D)·(D × W) product, so the work is exactly Σ_e 2·M·D·W FLOPs: the
cost follows the number of entries, i.e. the snapped structure.

* stage 1 (input side): A = x, W = s (rank of a component), block b = component, entries = its input tiles
  (D = tile), Bt = the packed input factor (Σ_k n_in,k·tile × s).
* stage 2 (output side): A = h (M × C·s), W = tile, block b = output tile, entries = the components whose
  output box covers the tile (D = s), Bt = the packed output factor, tile-major (s·Σ_k n_out,k × tile).

On Hopper (sm_90+) in fp16/bf16 the exported layer runs the two stages as two persistent, warp-specialised
launches (`gblr_forward_ws`, `_gblr_ws`): one program per SM walks a host-scheduled job list while a producer
warp streams the next job's tiles, so the short jobs of a block structure do not each pay a pipeline fill.
Each stage runs the Gluon kernel with explicit partitions (`_gblr_gws`) where Triton has Gluon's Hopper API,
otherwise (and under the CPU interpreter) the Triton kernel of `_gblr_ws`. With Gluon, stage 2 is by default
a dependent launch that starts on the SMs stage 1 leaves and waits per row block for the tiles it reads.
Elsewhere on CUDA it runs both stages in one launch (`gblr_forward`, the fused kernel in `_gblr_triton`):
stage-2 jobs of a row block wait on counters of that row block's stage-1 jobs. `chunk_gemm` is the one-stage
building block (and the CPU / torch reference path).
"""
from __future__ import annotations

import importlib
import importlib.util

import torch
import torch.nn.functional as F

HAVE_TRITON = importlib.util.find_spec("triton") is not None
_HALF = (torch.float16, torch.bfloat16)


def triton_module():
    """The Triton kernels (imported on first use; set TRITON_INTERPRET=1 before that for CPU)."""
    return importlib.import_module("structlin.kernels._gblr_triton")


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in _HALF else t


def block_of_entry(ptr: torch.Tensor) -> torch.Tensor:
    """(E,) int64: the output block of every entry of a chunk list."""
    nb = ptr.numel() - 1
    return torch.repeat_interleave(torch.arange(nb, device=ptr.device), (ptr[1:] - ptr[:-1]).long())


def chunk_gemm_ref(a: torch.Tensor, bt: torch.Tensor, ptr: torch.Tensor, acol: torch.Tensor,
                   brow: torch.Tensor, depth: int, out_cols: int, bias: torch.Tensor | None = None,
                   blk: torch.Tensor | None = None) -> torch.Tensor:
    """The chunk-list GEMM in torch: gathers every entry's (M × D) slice of A and (D × W) block of Bt, one
    batched product, and sums the products into their output blocks. Accumulates in fp32 for half inputs
    (fp64 for fp64); differentiable in a, bt and bias. Work and memory follow the number of entries."""
    M, W, nb = a.shape[0], bt.shape[1], ptr.numel() - 1
    aa = _acc(a)
    if acol.numel() == 0:
        out = aa.new_zeros(M, nb * W)
    else:
        if blk is None:
            blk = block_of_entry(ptr)
        ar = torch.arange(depth, device=a.device)
        need = int(acol.max()) + depth
        ap = F.pad(aa, (0, max(0, need - a.shape[1])))
        ag = ap[:, acol.long()[:, None] + ar].permute(1, 0, 2)          # (E, M, D)
        bg = _acc(bt)[brow.long()[:, None] + ar]                         # (E, D, W)
        prod = torch.bmm(ag, bg.to(ag.dtype))                            # (E, M, W)
        out = aa.new_zeros(nb, M, W).index_add(0, blk, prod.to(aa.dtype)).permute(1, 0, 2).reshape(M, nb * W)
    out = out[:, :out_cols]
    if bias is not None:
        out = out + _acc(bias)
    return out.to(a.dtype)


def triton_supported(a: torch.Tensor, depth: int, width: int) -> bool:
    """Whether the Triton kernel runs this call: CUDA (or the interpreter), fp16/bf16/fp32, depth and block
    width multiples of 16 (tensor-core tiles)."""
    return (HAVE_TRITON and a.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and depth % 16 == 0 and width % 16 == 0 and width <= 4096)


def chunk_gemm(a: torch.Tensor, bt: torch.Tensor, ptr: torch.Tensor, acol: torch.Tensor, brow: torch.Tensor,
               depth: int, out_cols: int, bias: torch.Tensor | None = None, *, use_triton: bool | None = None,
               config: dict | None = None, blk: torch.Tensor | None = None, affine_width: int = 0) -> torch.Tensor:
    """The chunk-list GEMM (see the module docstring). `use_triton`: None = Triton on CUDA tensors when
    supported, torch reference otherwise; True forces Triton (under TRITON_INTERPRET=1 also on CPU).
    Every block's entries must read consecutive rows of Bt (brow[e + 1] = brow[e] + depth); affine_width > 0
    promises that they also read consecutive depth-chunks of A, cyclic over affine_width columns."""
    if use_triton is None:
        use_triton = a.is_cuda and triton_supported(a, depth, bt.shape[1])
    if use_triton:
        return triton_module().chunk_gemm(a, bt, ptr, acol, brow, depth, out_cols, bias, config, affine_width)
    return chunk_gemm_ref(a, bt, ptr, acol, brow, depth, out_cols, bias, blk)


def fused_supported(dtype: torch.dtype, tile: int, rank: int) -> bool:
    """Whether the fused two-stage kernel runs a layer: Triton, fp16/bf16/fp32, tile and rank multiples of 16."""
    return HAVE_TRITON and dtype in (torch.float16, torch.bfloat16, torch.float32) and tile % 16 == 0 \
        and rank % 16 == 0


def ws_supported(x: torch.Tensor, tile: int, rank: int, n_out: int) -> bool:
    """Whether the persistent warp-specialised kernel (`_gblr_ws`) runs a layer: Triton, fp16/bf16, and on
    a GPU only Hopper or newer (TMA descriptors made in the kernel, warp specialisation); tile and rank
    shapes it takes, and 16-byte aligned rows of x, h and y (TMA)."""
    if not HAVE_TRITON or x.dtype not in _HALF or x.shape[1] % 8 or n_out % 8:
        return False
    if x.is_cuda and torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    return importlib.import_module("structlin.kernels._gblr_ws").supported(tile, rank)


def gblr_forward_ws(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, tabs: dict, tile: int, rank: int,
                    n_out: int, bias: torch.Tensor | None = None, config: dict | None = None,
                    cache: dict | None = None) -> torch.Tensor:
    """Both stages of an exported layer as two persistent, warp-specialised launches (CUDA sm_90+, or CPU
    under TRITON_INTERPRET=1); the same function as two `chunk_gemm` calls."""
    return importlib.import_module("structlin.kernels._gblr_ws").gblr_forward_ws(
        x, w_in, w_out, tabs, tile, rank, n_out, bias, config, cache)


def gblr_forward(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, tabs: dict, tile: int, rank: int,
                 n_out: int, bias: torch.Tensor | None = None, config: dict | None = None,
                 cache: dict | None = None) -> torch.Tensor:
    """Both stages of an exported layer in one Triton launch (CUDA, or CPU under TRITON_INTERPRET=1); the
    same function as two `chunk_gemm` calls (h rounded to x's dtype in between)."""
    return triton_module().gblr_forward(x, w_in, w_out, tabs, tile, rank, n_out, bias, config, cache)
