"""What the MiniLM fine-tuning benchmarks (losparse_finetune.py, ss1_finetune.py) share: the targeted linears,
the frozen embedding table, the params count, and the dense fine-tune (the baseline and the teacher), cached
on disk because it is deterministic."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

FREEZE = ("word_embeddings",)  # the 11.7M-entry table: cheaper steps on 2 CPU cores, same for every run
TARGETS = r".*encoder\.layer\.\d+\..*"


def encoder_params(model) -> tuple[int, int]:
    """(params of the encoder linears now, their dense count)."""
    from structlin.methods.base import StructuredLinear

    kept = dense = 0
    for name, m in model.named_modules():
        if not name.startswith("bert.encoder.layer."):
            continue
        if isinstance(m, StructuredLinear):
            kept += m.num_params()
            dense += m.spec.in_features * m.spec.out_features + (m.spec.out_features if m.spec.bias else 0)
        elif isinstance(m, torch.nn.Linear):
            n = m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
            kept += n
            dense += n
    return kept, dense


def dense_finetune(dense, train, test, tok, *, dataset: str, steps: int, max_len: int, lr: float,
                   batch_size: int, amp, cache_dir=None, progress: bool = False) -> tuple[float, float]:
    """Fine-tune `dense` in place (seed 0) and return (test accuracy, minutes); with `cache_dir`, a run with
    the same data, steps, lr, batch size and dtype is loaded instead of recomputed."""
    from structlin.heal.classify import accuracy, finetune_classifier

    t0 = time.perf_counter()
    cached = None
    if cache_dir:
        key = f"{dataset}-n{len(train)}-s{steps}-lr{lr:g}-b{batch_size}-bf16{int(amp is not None)}"
        cached = Path(cache_dir) / key
    if cached is not None and (cached / "meta.json").exists():
        dense.load_state_dict(torch.load(cached / "model.pt"))
        meta = json.loads((cached / "meta.json").read_text())
        return meta["accuracy"], meta["minutes"]
    finetune_classifier(dense, train, tok, steps=steps, lr=lr, batch_size=batch_size, max_length=max_len, seed=0,
                        autocast_dtype=amp, progress=progress, freeze=FREEZE)
    acc = accuracy(dense, test, tok, max_length=max_len, autocast_dtype=amp)
    minutes = (time.perf_counter() - t0) / 60
    if cached is not None:
        cached.mkdir(parents=True, exist_ok=True)
        torch.save(dense.state_dict(), cached / "model.pt")
        (cached / "meta.json").write_text(json.dumps(dict(accuracy=acc, minutes=minutes)))
    return acc, minutes
