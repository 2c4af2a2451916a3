"""Serving preparation: fewer, wider kernels per block, for dense and structured models alike.

A compressed layer that is fast alone can leave the model no faster when the rest of each block is a
few dozen small pointwise kernels (HF's RMSNorm alone is six) and attention falls off FlashAttention.
`prepare_for_serving(model, example)` fixes what it can without changing what the model computes:

* sibling fusion (`structlin.fuse`): q/k/v and gate/up run as one wide layer;
* pointwise fusion: RMSNorm and the SiLU-gated MLP product run as single compiled (Triton) kernels
  (`torch.compile` on these small functions only, on CUDA; the plain code elsewhere);
* causal prefill on FlashAttention: under CUDA-graph capture transformers materialises the causal mask,
  which forces SDPA onto a slower masked kernel; with `unpadded=True` (the caller promises no padding
  in prefill batches) attention is called without the mask and `is_causal=True` when the query and key
  lengths are equal. Decode steps keep the mask.

It returns what it did. The model is for inference afterwards (fused siblings hold copies of the
weights; see `structlin.fuse`). Dense models take the same preparation, so speed-ups measured on
prepared models compare like with like.
"""
from __future__ import annotations

import types

import torch
from torch import nn

_COMPILED: dict = {}


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    dt = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(dt)


def _silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(g) * u


def _compiled(fn, device_type: str):
    if device_type != "cuda":
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


def _norm_forward(rms):
    def forward(self, hidden_states):
        shape = hidden_states.shape   # 2-D for the compiled kernel: one specialisation per (M == 1, M > 1)
        return rms(hidden_states.reshape(-1, shape[-1]), self.weight, self.variance_epsilon).reshape(shape)
    return forward


def _mlp_forward(silu_mul):
    def forward(self, x):
        g, u = self.gate_proj(x), self.up_proj(x)
        shape = g.shape
        h = silu_mul(g.reshape(-1, shape[-1]), u.reshape(-1, shape[-1])).reshape(shape)
        return self.down_proj(h)
    return forward


def _register_attention() -> str | None:
    try:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
    except ImportError:  # transformers < 4.48: leave attention as it is
        return None

    def structlin_sdpa(module, query, key, value, attention_mask, **kwargs):
        if query.shape[-2] == key.shape[-2] and query.shape[-2] > 1:
            attention_mask = None          # unpadded causal prefill: FlashAttention with is_causal
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("structlin_sdpa", structlin_sdpa)
    return "structlin_sdpa"


def prepare_for_serving(model: nn.Module, example: dict | None = None, *, fuse: bool = True,
                        pointwise: bool = True, unpadded: bool = False) -> dict:
    """Prepare `model` (dense or compressed, eval mode) for fast inference; returns a summary."""
    done: dict = {"fused": [], "norms": 0, "mlps": 0, "attention": None}
    device = next(model.parameters()).device
    if fuse:
        if example is None:
            raise ValueError("prepare_for_serving(fuse=True) needs `example` inputs to find the sibling layers")
        from .fuse import fuse_siblings

        done["fused"] = fuse_siblings(model, example)
    if pointwise:
        rms, silu_mul = _compiled(_rms, device.type), _compiled(_silu_mul, device.type)
        for mod in model.modules():
            name = type(mod).__name__
            if name.endswith("RMSNorm") and hasattr(mod, "variance_epsilon") and hasattr(mod, "weight"):
                mod.forward = types.MethodType(_norm_forward(rms), mod)
                done["norms"] += 1
            elif all(hasattr(mod, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")) \
                    and getattr(getattr(mod, "config", None), "hidden_act", "silu") in ("silu", "swish"):
                mod.forward = types.MethodType(_mlp_forward(silu_mul), mod)
                done["mlps"] += 1
    if unpadded:
        impl = _register_attention()
        if impl is not None and getattr(model.config, "_attn_implementation", None) in ("sdpa", impl):
            if hasattr(model, "set_attn_implementation"):
                model.set_attn_implementation(impl)
            else:
                model.config._attn_implementation = impl
            done["attention"] = impl
    return done


__all__ = ["prepare_for_serving"]
