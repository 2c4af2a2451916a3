"""Perplexity by a stated protocol: the first N tokens of a text, non-overlapping windows of `seq_len`,
labels = inputs (each window predicts its tokens 2..seq_len), exp of the token-weighted mean NLL."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..calibrate.collect import model_device


@dataclass
class Perplexity:
    ppl: float
    nll: float           # mean negative log-likelihood per predicted token (nats)
    tokens: int          # tokens read (windows × seq_len)
    predicted: int       # tokens scored
    seq_len: int
    text: str            # which text
    seconds: float

    def __str__(self) -> str:
        return (f"perplexity {self.ppl:.3f} on {self.text} ({self.tokens:,} tokens, windows of "
                f"{self.seq_len}, {self.predicted:,} predictions)")


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, *, text: str = "?", batch_size: int = 1,
               progress: bool = False) -> Perplexity:
    """Perplexity of a causal LM over `windows` (n × seq_len token ids)."""
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (n, seq_len >= 2) token ids, got shape {tuple(windows.shape)}")
    t0 = time.perf_counter()
    device = model_device(model)
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    starts = range(0, windows.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"perplexity {text}", leave=False)
    for s in starts:
        ids = windows[s:s + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        target = ids[:, 1:]
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").item()
        count += target.numel()
    model.train(was_training)
    mean = nll / count
    return Perplexity(math.exp(mean), mean, windows.numel(), count, windows.shape[1], text,
                      time.perf_counter() - t0)
