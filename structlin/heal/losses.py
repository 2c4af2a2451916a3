"""Distillation losses against a dense teacher.

    KL term:     T² · mean over tokens of KL(softmax(z_t / T) ‖ softmax(z_s / T))
    hidden term: mean over layers of mean((h_s − h_t)²)    (hidden states of matching layers)

Token means are over positions where `mask` is 1 (all positions without a mask). The T² factor keeps
the gradient scale independent of the temperature (Hinton et al.).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp_min(1)


def kl_distill(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """T² · KL(teacher ‖ student) per token (summed over the vocabulary), averaged over tokens.
    Computed in float32 whatever the logits' dtype."""
    if temperature <= 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_token = (t.exp() * (t - s)).sum(-1)
    return temperature ** 2 * _masked_mean(per_token, mask)


def hidden_mse(student_hidden, teacher_hidden, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the given layers of the per-token mean squared difference of hidden states."""
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"{len(student_hidden)} student hidden states vs {len(teacher_hidden)} teacher")
    terms = [_masked_mean(((hs.float() - ht.float()) ** 2).mean(-1), mask)
             for hs, ht in zip(student_hidden, teacher_hidden)]
    return torch.stack(terms).mean()
