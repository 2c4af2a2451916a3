"""Operators of the exported LoSparse layer (inference): the thin GEMM with the sparse rows' index-add as its
epilogue, and a plain index-add of columns. Torch references are the CPU path; CUDA runs Triton.

    h (M × (r + k)) = x [R; S_I]ᵀ                  (cuBLAS, by the layer)
    y (M × N)       = h[:, :r] Lᵀ + b,  y[:, I] += h[:, r:]

Decode (M ≤ 16 rows): `decode` does both lines in one persistent launch (split-K GEMV for h into an fp32
workspace, a grid-wide barrier, then the thin GEMM + index-add reading h from it; deterministic).

`inv` (N, int32) maps an output row n to its position in I, or -1: the epilogue reads h[m, r + inv[n]].
Both ops are `torch.library` custom ops with fake implementations; they carry no autograd (the layer uses
them only when no gradient is needed).
"""
from __future__ import annotations

import importlib
import importlib.util

import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None
DECODE_MAX_M = 16  # the fused decode kernel's row limit (one 16-row tensor-core tile)


def triton_module():
    return importlib.import_module("structlin.kernels._losparse_triton")


def _use_triton(t: torch.Tensor) -> bool:
    return HAVE_TRITON and t.is_cuda and t.dtype in (torch.float16, torch.bfloat16)


def inverse_index(index: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) int32: position of each row in `index`, -1 where absent."""
    inv = torch.full((n,), -1, dtype=torch.int32, device=index.device)
    inv[index] = torch.arange(index.numel(), dtype=torch.int32, device=index.device)
    return inv


def lr_add_ref(h, left, inv, bias):
    r = left.shape[1]
    y = torch.nn.functional.linear(h[:, :r], left, bias)
    present = inv >= 0
    if bool(present.any()):
        rows = present.nonzero().flatten()
        y[:, rows] += h[:, r + inv[rows].long()]
    return y


@torch.library.custom_op("structlin::losparse_lr_add", mutates_args=())
def lr_add(h: torch.Tensor, left: torch.Tensor, inv: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = h[:, :r] leftᵀ (+ bias), then y[:, n] += h[:, r + inv[n]] where inv[n] ≥ 0."""
    if _use_triton(h):
        return triton_module().lr_add(h.contiguous(), left.contiguous(), inv, bias)
    return lr_add_ref(h, left, inv, bias)


@lr_add.register_fake
def _(h, left, inv, bias):
    return h.new_empty(h.shape[0], left.shape[0])


@torch.library.custom_op("structlin::losparse_decode", mutates_args=())
def decode(x: torch.Tensor, right: torch.Tensor, left: torch.Tensor, inv: torch.Tensor,
           bias: torch.Tensor | None) -> torch.Tensor:
    """The whole row-LoSparse layer for M ≤ 16 rows of x: h = x rightᵀ, y = h[:, :r] leftᵀ + b,
    y[:, n] += h[:, r + inv[n]] (inv[n] ≥ 0). One Triton launch on CUDA (bf16/fp16), torch elsewhere."""
    if _use_triton(x) and x.shape[0] <= DECODE_MAX_M:
        return triton_module().decode(x.contiguous(), right.contiguous(), left.contiguous(), inv, bias)
    return lr_add_ref(torch.nn.functional.linear(x, right), left, inv, bias)


@decode.register_fake
def _(x, right, left, inv, bias):
    return x.new_empty(x.shape[0], left.shape[0])


def index_add_cols(y: torch.Tensor, h: torch.Tensor, index: torch.Tensor, r: int) -> torch.Tensor:
    """In place y[:, index] += h[:, r:] (index unique); Triton on CUDA, torch's index_add_ elsewhere."""
    if _use_triton(y) and y.is_contiguous() and h.is_contiguous():
        return triton_module().index_add_cols(y, h, index, r)
    return y.index_add_(1, index, h[:, r:])

